"""Sessions: lint, tests (one per backend, each in its own environment), integrations, demo, bench.

    python -m nox                   # what CI runs: lint, tests, integrations
    python -m nox -s demo           # yoso demo on the NumPy reference
    python -m nox -s bench -- --quick --out DIR   # yoso bench (posargs go to it; default: full CPU grid)
    python -m nox -s "tests(backend='reference')"

torch is pinned (its CPU wheel is on this machine's disk; an unpinned torch pulls a multi-GB CUDA
build). Override with YOSO_TORCH_SPEC, e.g. YOSO_TORCH_SPEC="torch==2.14.1".
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.sessions = ["lint", "tests", "integrations"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("YOSO_TORCH_SPEC", "torch==2.13.0")
JAX = "jax==0.10.2"  # Pallas changes between releases: the kernels are tested against this one
API = "packages/yoso-api"
REFERENCE = "packages/yoso-reference"
BENCH = "packages/yoso-bench"  # yoso bench and yoso demo (subcommands through the yoso.commands entry points)
MODELS = "packages/yoso-models"  # yoso_models.nn, .nnx, .transformers
# The Hugging Face integrations are tested against this version, installed in the integrations session only.
TRANSFORMERS = os.environ.get("YOSO_TRANSFORMERS_SPEC", "transformers==5.23.0")
FLAX = "flax==0.12.8"  # yoso_models.nnx is tested against this release (with JAX above)


def _no_gpu_reason() -> str | None:
    """None when nvidia-smi lists a GPU, else why the GPU conformance run is left out."""
    if os.environ.get("YOSO_CUDA_CONFORMANCE") in ("0", "1"):
        return None if os.environ["YOSO_CUDA_CONFORMANCE"] == "1" else "YOSO_CUDA_CONFORMANCE=0"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi on this machine"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout
    return None if "GPU " in listed else "nvidia-smi lists no GPU"


TRITON = "triton==3.7.1"  # the release torch 2.13 is built against

# Per backend: what to install besides the API and the reference (the oracle every backend is
# compared with), which tests to run besides the conformance suite, and optionally:
#   "env"    -- variables for every command of the session ("{tmp}": the session's tmp dir);
#   "runs"   -- a list of extra variables, one conformance run each (the backend's own tests then
#               run once more with "env" alone);
#   "checks" -- commands to run before the tests;
#   "needs"  -- a function saying why the conformance suite cannot run on this machine (None: it can).
BACKENDS = {
    "reference": {"install": [], "tests": [f"{REFERENCE}/tests"]},
    "jax": {
        "install": ["-e", "packages/yoso-jax", JAX],
        "tests": ["packages/yoso-jax/tests"],
        # float64 (x64: the tight tolerances), then float32; the backend's own tests (jit/vmap/grad, both
        # of the package's backends) in JAX's default setting.
        "runs": [{"JAX_ENABLE_X64": "1"}, {"JAX_ENABLE_X64": "1", "YOSO_TEST_DTYPE": "float32"}],
        "env": {
            "JAX_COMPILATION_CACHE_DIR": "{tmp}/jax-compilation-cache",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        },
    },
    # The Pallas kernels, interpreted on the CPU: the suite in float64.
    "pallas": {
        "install": ["-e", "packages/yoso-jax", JAX],
        "tests": [],
        "runs": [{"JAX_ENABLE_X64": "1"}],
    },
    # No GPU in CI: Triton's interpreter runs the kernels on CPU tensors. It issues many tiny NumPy
    # products, which multithreaded BLAS makes ~100x slower on a busy machine.
    "triton": {
        "install": [TRITON, "-e", "packages/yoso-triton"],
        "tests": ["packages/yoso-triton/tests"],
        "env": {"TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    },
    # Without a GPU: the NVRTC build check of every kernel and the no-GPU tests. With one (nvidia-smi
    # lists a GPU, or YOSO_CUDA_CONFORMANCE=1), the conformance suite too, with --require-backend; the
    # session's torch must then be a CUDA build (YOSO_TORCH_SPEC; the default pin is a CPU wheel).
    "cuda": {
        "install": ["-e", "packages/yoso-cuda"],
        "tests": ["packages/yoso-cuda/tests"],
        "checks": [["python", "-m", "yoso_cuda.build", "--arch", "sm_80", "--arch", "sm_90"]],
        "needs": _no_gpu_reason,
    },
}


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    spec = BACKENDS[backend]
    session.install(TORCH, "pytest", "-e", REFERENCE, "-e", API, *spec["install"])
    tmp = session.create_tmp()
    env = {"YOSO_TEST_BACKENDS": backend, "YOSO_TEST_REQUIRE": "1"}
    env.update({name: value.format(tmp=tmp) for name, value in spec.get("env", {}).items()})
    session.run("yoso", "info", env=env)
    for command in spec.get("checks", []):
        session.run(*command, env=env)
    reason = spec["needs"]() if "needs" in spec else None
    if reason is not None:
        session.log(f"conformance suite for {backend!r} not run: {reason} (it runs where a GPU is present)")
        session.run("pytest", *spec["tests"], *session.posargs, env=env)
        return
    if "runs" not in spec:
        session.run("pytest", "conformance", *spec["tests"], *session.posargs, env=env)
        return
    for extra in spec["runs"]:
        session.run("yoso", "info", env={**env, **extra})
        session.run("pytest", "conformance", *session.posargs, env={**env, **extra})
    if spec["tests"]:
        session.run("pytest", *spec["tests"], *session.posargs, env=env)


@nox.session
def integrations(session: nox.Session) -> None:
    """yoso-api's own tests (selection, errors, the yoso command), yoso-bench's (yoso bench on a tiny grid, yoso
    demo) and yoso-models' (yoso_models.nn, yoso_models.transformers on tiny random models without downloads,
    yoso_models.nnx on the jax backend, a smoke run of examples/listops.py)."""
    packages = ["-e", REFERENCE, "-e", "packages/yoso-jax", "-e", API, "-e", f"{BENCH}[plot]"]
    session.install(TORCH, TRANSFORMERS, FLAX, JAX, "pytest", *packages, "-e", f"{MODELS}[torch,flax,transformers]")
    env = {"YOSO_TEST_REQUIRE_TRANSFORMERS": "1", "YOSO_TEST_REQUIRE_FLAX": "1", "HF_HUB_OFFLINE": "1"}
    session.run("pytest", f"{API}/tests", f"{BENCH}/tests", f"{MODELS}/tests", *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", REFERENCE, "-e", API, "-e", f"{BENCH}[plot]")
    session.run("yoso", "info")
    session.run("yoso", "demo", "--backend", "reference", *(session.posargs or ["--out", "yoso-demo"]))


@nox.session
def bench(session: nox.Session) -> None:
    """yoso bench over every backend in BACKENDS that can run here; ``nox -s bench -- --quick --out DIR``."""
    backends = [arg for spec in BACKENDS.values() for arg in spec["install"]]
    session.install(TORCH, "-e", REFERENCE, "-e", API, "-e", f"{BENCH}[plot]", *backends)
    session.run("yoso", "info")
    session.run("yoso", "bench", *(session.posargs or ["--out", "bench-out"]))
