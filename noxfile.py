"""Sessions: lint, tests (one per backend, each in its own environment), demo.

    python -m nox -s lint tests     # what CI runs
    python -m nox -s demo           # yoso demo on the NumPy reference
    python -m nox -s "tests(backend='reference')"

torch is pinned (its CPU wheel is on this machine's disk; an unpinned torch pulls a multi-GB CUDA
build). Override with YOSO_TORCH_SPEC, e.g. YOSO_TORCH_SPEC="torch==2.14.1".
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("YOSO_TORCH_SPEC", "torch==2.13.0")
JAX = "jax==0.10.2"  # Pallas changes between releases: the kernels are tested against this one
API = "packages/yoso-api"
REFERENCE = "packages/yoso-reference"

# Per backend: what to install besides the API and the reference (the oracle every backend is
# compared with), which tests to run besides the conformance suite, and optionally "env": a list of
# environments, one run of the conformance suite each (the backend's own tests then run once more in
# the plain environment), and "shared_env": variables for every run ("{tmp}": the session's tmp dir).
BACKENDS = {
    "reference": {"install": [], "tests": [f"{REFERENCE}/tests"]},
    "jax": {
        "install": ["-e", "packages/yoso-jax", JAX],
        "tests": ["packages/yoso-jax/tests"],
        # Both implementation levels in float64 (x64: the tight tolerances), the default level in
        # float32; the backend's own tests (jit/vmap/grad, both levels) in JAX's default setting.
        "env": [
            {"YOSO_JAX_IMPL": "xla", "JAX_ENABLE_X64": "1"},
            {"YOSO_JAX_IMPL": "pallas", "JAX_ENABLE_X64": "1"},
            {"YOSO_JAX_IMPL": "xla", "JAX_ENABLE_X64": "1", "YOSO_TEST_DTYPE": "float32"},
        ],
        # JAX's persistent compilation cache across those runs: programs that do not depend on the
        # run's setting (YOSO-E and the pairwise gradients at both levels, ...) compile once. Measured:
        # the Pallas run takes 70 s after the XLA run instead of 125 s.
        "shared_env": {
            "JAX_COMPILATION_CACHE_DIR": "{tmp}/jax-compilation-cache",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        },
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
    session.install(TORCH, "pytest", "-e", REFERENCE, "-e", f"{API}[plot]", *spec["install"])
    shared = {name: value.format(tmp=session.create_tmp()) for name, value in spec.get("shared_env", {}).items()}
    base = {"YOSO_TEST_BACKENDS": backend, "YOSO_TEST_REQUIRE": "1", **shared}
    if "env" not in spec:
        session.run("yoso", "info")
        session.run("pytest", "conformance", *spec["tests"], *session.posargs, env=base)
        return
    for extra in spec["env"]:
        session.run("yoso", "info", env={**base, **extra})
        session.run("pytest", "conformance", *session.posargs, env={**base, **extra})
    session.run("pytest", *spec["tests"], *session.posargs, env=base)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", REFERENCE, "-e", f"{API}[plot]")
    session.run("yoso", "info")
    session.run("yoso", "demo", "--backend", "reference", *(session.posargs or ["--out", "yoso-demo"]))
