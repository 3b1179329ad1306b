"""Sessions: lint, api, tests (one per backend, each in its own environment), models, demo, bench.

The api session also runs yoso-parallel's and yoso-bench's tests (one environment with torch and JAX).

    python -m nox                   # what CI runs: lint, api, tests, models
    python -m nox -s demo           # yoso demo on the NumPy reference
    python -m nox -s bench -- --quick --out DIR   # yoso bench (posargs go to it; default: full CPU grid)
    python -m nox -s "tests(backend='reference')"

Environments are made with uv where it is installed (hard-linked packages: one copy of torch on disk for
every session, seconds per install), else with virtualenv and pip. Tests run on two processes
(pytest-xdist; YOSO_TEST_WORKERS overrides). torch is pinned (its CPU wheel is on this machine's disk;
an unpinned torch pulls a multi-GB CUDA build). Override with YOSO_TORCH_SPEC, e.g.
YOSO_TORCH_SPEC="torch==2.14.1".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nox

nox.options.sessions = ["lint", "api", "tests", "models"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "uv|virtualenv"

TORCH = os.environ.get("YOSO_TORCH_SPEC", "torch==2.13.0")
JAX = "jax==0.10.2"  # Pallas changes between releases: the kernels are tested against this one
TRITON = "triton==3.7.1"  # the release torch 2.13 is built against
# The Hugging Face integrations and the Flax module are tested against these, in the models session.
TRANSFORMERS = os.environ.get("YOSO_TRANSFORMERS_SPEC", "transformers==5.23.0")
FLAX = "flax==0.12.8"
TEST_TOOLS = ("pytest", "pytest-xdist")

API = "packages/yoso-api"
REFERENCE = "packages/yoso-reference"
JAX_BACKENDS = "packages/yoso-jax"
BENCH = "packages/yoso-bench"  # yoso bench and yoso demo (subcommands through the yoso.commands entry points)
MODELS = "packages/yoso-models"  # yoso_models.nn, .nnx, .transformers
PARALLEL = "packages/yoso-parallel"  # group= / axis_name= (engines through the yoso.parallel entry points)


def _pip_find_links() -> None:
    """Let uv see the wheel directories pip is configured with (this is where the CPU torch wheel lies on
    machines that carry one: uv does not read pip's configuration)."""
    if "UV_FIND_LINKS" in os.environ:
        return
    found = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    links = [line.split("=", 1)[1].strip("'\" ") for line in found.splitlines() if ".find-links=" in line]
    links = [path for entry in links for path in entry.split() if os.path.isdir(path)]
    if links:
        os.environ["UV_FIND_LINKS"] = " ".join(dict.fromkeys(links))


_pip_find_links()

# Bytecode: uv installs no .pyc files, and a machine that sets PYTHONDONTWRITEBYTECODE (this project's CI
# machines do) then has every Python process compile torch's and JAX's sources again: ~2.6 s more per
# process that imports both (5.1 s instead of 2.5 s), and the sessions start dozens (pytest workers, the
# sequence-parallel ranks, the CLI subprocesses). Written lazily into the session's environment, the
# bytecode is compiled once per environment, for the modules imported (the api session's tests: 111 ->
# 81 s); compiling all of site-packages at install (uv --compile-bytecode) costs ~25 s per environment.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


# XLA's LLVM backend at its lowest optimisation level: the tests compile thousands of tiny programs, whose
# compilation, not their run time, is most of the JAX sessions' time (20-30% less with this). The same
# programs are compiled, less optimised (rounding may differ, as between machines: the tolerances allow it);
# benchmarks and users get the default level. A caller's own XLA_FLAGS win.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _pytest(session: nox.Session, *args: str, env: dict | None = None) -> None:
    workers = os.environ.get("YOSO_TEST_WORKERS", "2")
    env = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", TEST_XLA_FLAGS), **(env or {})}
    session.run("pytest", "-n", workers, "-q", *args, *session.posargs, env=env)


def _no_gpu_reason() -> str | None:
    """None when nvidia-smi lists a GPU, else why the GPU conformance run is left out."""
    if os.environ.get("YOSO_CUDA_CONFORMANCE") in ("0", "1"):
        return None if os.environ["YOSO_CUDA_CONFORMANCE"] == "1" else "YOSO_CUDA_CONFORMANCE=0"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi on this machine"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout
    return None if "GPU " in listed else "nvidia-smi lists no GPU"


# Per backend: what to install besides the API and the reference (the oracle every backend is
# compared with), which tests to run besides the conformance suite, and optionally:
#   "env"    -- variables for every command of the session ("{tmp}": the session's tmp dir);
#   "runs"   -- one conformance run each: "env", extra variables, and "files", the test files (default: one
#               run of the whole suite with "env" alone);
#   "checks" -- commands to run before the tests;
#   "needs"  -- a function saying why the conformance suite cannot run on this machine (None: it can).
BACKENDS = {
    "reference": {"install": [], "tests": [f"{REFERENCE}/tests"]},
    "jax": {
        "install": ["-e", JAX_BACKENDS, JAX],
        "tests": [f"{JAX_BACKENDS}/tests"],
        # float64 (x64: the tight tolerances) from every caller framework; float32 from JAX arrays (NumPy
        # and torch reach the same compiled core, which the first run checked); the package's own tests
        # (jit/vmap/grad, both of its backends) in JAX's default setting.
        # float32 runs the files whose tolerances depend on the dtype end to end (the kernel-level files,
        # given the codes, compute the same programs in the other dtype: the first run checks their math).
        "runs": [
            {"env": {"JAX_ENABLE_X64": "1"}},
            {
                "env": {"JAX_ENABLE_X64": "1", "YOSO_TEST_DTYPE": "float32", "YOSO_TEST_FRAMEWORKS": "jax"},
                # (not the statistics and the catalogue: their properties do not depend on the dtype, and
                # the first run checks them)
                "files": [f"conformance/test_{name}.py" for name in ("attention", "gradients", "hashing")],
            },
        ],
        # JAX's persistent compilation cache across the runs: programs that do not depend on the run's
        # setting compile once.
        "env": {
            "JAX_COMPILATION_CACHE_DIR": "{tmp}/jax-compilation-cache",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        },
    },
    # The Pallas kernels, interpreted on the CPU, in float64 from JAX arrays (the glue that serves NumPy
    # and torch callers is the jax backend's, tested above).
    "pallas": {
        "install": ["-e", JAX_BACKENDS, JAX],
        "tests": [],
        # Not the kernel-level bucket-table file: pallas's bucket_tables/read_buckets/add_to_tables are the jax
        # backend's (yoso_jax.buckets), checked in the jax session. (test_state runs: chunks use its kernels.)
        "runs": [
            {
                "env": {"JAX_ENABLE_X64": "1", "YOSO_TEST_FRAMEWORKS": "jax"},
                "files": ["conformance", "--ignore=conformance/test_tables.py"],
            }
        ],
        # the catalogue's result properties are decided in the glue, checked in the jax session
        "env": {"YOSO_TEST_CATALOGUE": "refusals"},
    },
    # No GPU in CI: Triton's interpreter runs the kernels on CPU tensors. It issues many tiny NumPy
    # products, which multithreaded BLAS makes ~100x slower on a busy machine.
    "triton": {
        "install": [TRITON, "-e", "packages/yoso-triton"],
        "tests": ["packages/yoso-triton/tests"],
        "env": {
            "TRITON_INTERPRET": "1",
            "TRITON_CACHE_DIR": "{tmp}/triton-cache",  # the GPU-compile check compiles, not reuses, the kernels
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "YOSO_TEST_CATALOGUE": "refusals",  # result properties: the glue's, checked in the reference session
        },
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
def api(session: nox.Session) -> None:
    """yoso-api's own tests, once (selection, plugins, the yoso command, bad input from NumPy, torch and JAX
    callers), yoso-parallel's (sequence parallelism over gloo processes and a 4-device jax.shard_map, each in
    processes of their own) and yoso-bench's (yoso bench on a tiny grid, --sequence-parallel 2, yoso demo):
    one environment with torch and JAX for the three."""
    packages = ["-e", REFERENCE, "-e", API, "-e", JAX_BACKENDS, "-e", PARALLEL, "-e", f"{BENCH}[plot]"]
    session.install(TORCH, JAX, *TEST_TOOLS, *packages)
    _pytest(session, f"{API}/tests", f"{PARALLEL}/tests", f"{BENCH}/tests")


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The conformance suite (and the backend's own tests) for one backend."""
    spec = BACKENDS[backend]
    session.install(TORCH, *TEST_TOOLS, "-e", REFERENCE, "-e", API, *spec["install"])
    tmp = session.create_tmp()
    env = {"YOSO_TEST_BACKENDS": backend, "YOSO_TEST_REQUIRE": "1"}
    env.update({name: value.format(tmp=tmp) for name, value in spec.get("env", {}).items()})
    session.run("yoso", "info", env=env)
    for command in spec.get("checks", []):
        session.run(*command, env=env)
    reason = spec["needs"]() if "needs" in spec else None
    if reason is not None:
        session.log(f"conformance suite for {backend!r} not run: {reason} (it runs where a GPU is present)")
    else:
        for run in spec.get("runs", [{}]):
            _pytest(session, *run.get("files", ["conformance"]), env={**env, **run.get("env", {})})
    if spec["tests"]:
        _pytest(session, *spec["tests"], env=env)


@nox.session
def models(session: nox.Session) -> None:
    """yoso-models' tests: yoso_models.nn, yoso_models.transformers (tiny random models, no downloads),
    yoso_models.nnx (Flax NNX, on the jax backend), a smoke run of examples/listops.py; and the layer cases
    of the conformance catalogue."""
    packages = ["-e", REFERENCE, "-e", API, "-e", JAX_BACKENDS, "-e", f"{MODELS}[torch,flax,transformers]"]
    session.install(TORCH, TRANSFORMERS, FLAX, JAX, *TEST_TOOLS, *packages)
    env = {"YOSO_TEST_REQUIRE_TRANSFORMERS": "1", "YOSO_TEST_REQUIRE_FLAX": "1", "HF_HUB_OFFLINE": "1"}
    _pytest(session, f"{MODELS}/tests", env=env)
    # The conformance catalogue's layer cases need yoso-models, which only this session installs (the
    # backend sessions skip them, saying so): here they run on both backends, and must.
    catalogue = {"YOSO_TEST_BACKENDS": "reference,jax", "YOSO_TEST_REQUIRE": "1", "YOSO_TEST_REQUIRE_MODELS": "1"}
    _pytest(session, "conformance/test_catalogue.py", "-k", "test_layer_case", env={**env, **catalogue})


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", REFERENCE, "-e", API, "-e", f"{BENCH}[plot]")
    session.run("yoso", "info")
    session.run("yoso", "demo", "--backend", "reference", *(session.posargs or ["--out", "yoso-demo"]))


@nox.session
def bench(session: nox.Session) -> None:
    """yoso bench over every backend in BACKENDS that can run here; ``nox -s bench -- --quick --out DIR``."""
    backends = []
    for spec in BACKENDS.values():
        args = iter(spec["install"])
        for arg in args:
            item = [arg, next(args)] if arg == "-e" else [arg]
            backends += [] if item[-1] in backends else item
    session.install(TORCH, "-e", REFERENCE, "-e", API, "-e", PARALLEL, "-e", f"{BENCH}[plot]", *backends)
    session.run("yoso", "info")
    session.run("yoso", "bench", *(session.posargs or ["--out", "bench-out"]))
