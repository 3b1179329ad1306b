"""Sessions: lint, tests (one per backend, each in its own environment), demo, bench.

    python -m nox -s lint tests     # what CI runs
    python -m nox -s demo           # yoso demo on the NumPy reference
    python -m nox -s bench -- --quick --out DIR   # yoso bench (posargs go to it; default: full CPU grid)
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

# Per backend: what to install besides the API and the reference (the oracle every backend is
# compared with), and which tests to run besides the conformance suite.
BACKENDS = {
    # yoso-api's own tests (yoso bench) need only the reference, so they run once, here.
    "reference": {"install": [], "tests": [f"{REFERENCE}/tests", f"{API}/tests"]},
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
    session.run("yoso", "info")
    env = {"YOSO_TEST_BACKENDS": backend, "YOSO_TEST_REQUIRE": "1"}
    session.run("pytest", "conformance", *spec["tests"], *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", REFERENCE, "-e", f"{API}[plot]")
    session.run("yoso", "info")
    session.run("yoso", "demo", "--backend", "reference", *(session.posargs or ["--out", "yoso-demo"]))


@nox.session
def bench(session: nox.Session) -> None:
    """yoso bench over every backend in BACKENDS that can run here; ``nox -s bench -- --quick --out DIR``."""
    backends = [arg for spec in BACKENDS.values() for arg in spec["install"]]
    session.install(TORCH, "-e", REFERENCE, "-e", f"{API}[plot]", *backends)
    session.run("yoso", "info")
    session.run("yoso", "bench", *(session.posargs or ["--out", "bench-out"]))
