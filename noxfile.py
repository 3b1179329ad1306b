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
API = "packages/yoso-api"
REFERENCE = "packages/yoso-reference"

TRITON = "triton==3.7.1"  # the release torch 2.13 is built against

# Per backend: what to install besides the API and the reference (the oracle every backend is
# compared with), which tests to run besides the conformance suite, and environment variables for
# `yoso info` and the tests.
BACKENDS = {
    "reference": {"install": [], "tests": [f"{REFERENCE}/tests"], "env": {}},
    # No GPU in CI: Triton's interpreter runs the kernels on CPU tensors. It issues many tiny NumPy
    # products, which multithreaded BLAS makes ~100x slower on a busy machine.
    "triton": {
        "install": [TRITON, "-e", "packages/yoso-triton"],
        "tests": ["packages/yoso-triton/tests"],
        "env": {"TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
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
    session.run("yoso", "info", env=spec["env"])
    env = {"YOSO_TEST_BACKENDS": backend, "YOSO_TEST_REQUIRE": "1", **spec["env"]}
    session.run("pytest", "conformance", *spec["tests"], *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", REFERENCE, "-e", f"{API}[plot]")
    session.run("yoso", "info")
    session.run("yoso", "demo", "--backend", "reference", *(session.posargs or ["--out", "yoso-demo"]))
