"""The ``yoso`` command: --version, bare ``yoso``, ``python -m yoso``, subcommands from entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import yoso
from yoso import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"yoso {yoso.__version__}\n"


def test_bare_yoso_prints_the_help(capsys):
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: yoso") and "info" in out and "--version" in out
    assert err == ""


def test_python_dash_m_yoso():
    run = lambda *args: subprocess.run([sys.executable, "-m", "yoso", *args], capture_output=True, text=True)
    info = run("info")
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"yoso {yoso.__version__}") and "backends:" in info.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"yoso {yoso.__version__}"


def test_building_the_parser_imports_no_framework():
    # Every installed yoso.commands entry point is loaded to print the help: none may pull in torch or JAX.
    code = (
        "import sys\n"
        "from yoso import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print([m for m in sys.modules if m.startswith(('torch', 'jax', 'matplotlib', 'rich'))])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


class _EntryPoint:
    """What ``importlib.metadata`` hands out: a name, the object's path, ``load()``."""

    def __init__(self, name, target, value="fake_pkg.commands:obj"):
        self.name, self.value, self._target = name, value, target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


class _Hello:
    help = "say hello (a test command)"

    def __init__(self):
        self.seen = None

    def add_arguments(self, parser):
        parser.add_argument("--name", default="world")

    def run(self, args):
        self.seen = args
        if args.name == "bad":
            raise ValueError("--name must not be 'bad'")
        print(f"hello {args.name}")
        return None


@pytest.fixture
def commands(monkeypatch):
    """Replace the entry points of ``yoso.commands`` with the list this fixture returns."""
    found = []
    monkeypatch.setattr(cli, "command_entry_points", lambda: list(found))
    return found


def test_subcommands_come_from_entry_points(commands, capsys):
    hello = _Hello()
    commands += [_EntryPoint("hello", hello), _EntryPoint("info", _Hello())]  # info cannot be replaced
    assert cli.main([]) == 0
    assert "say hello (a test command)" in capsys.readouterr().out

    assert cli.main(["hello", "--name", "yoso"]) == 0
    assert capsys.readouterr().out == "hello yoso\n"
    assert hello.seen.argv == ["hello", "--name", "yoso"] and hello.seen.command == "hello"

    assert cli.main(["hello", "--name", "bad"]) == 2
    assert capsys.readouterr().err == "yoso hello: error: --name must not be 'bad'\n"

    assert cli.main(["info", "--json"]) == 0  # still yoso's own
    assert '"backends"' in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_:
        cli.main(["hello", "--nope"])
    assert exit_.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_a_broken_command_is_reported_not_raised(commands, capsys):
    commands += [_EntryPoint("hello", ImportError("No module named 'fake_pkg' (100%)")), _EntryPoint("half", object())]
    assert cli.main([]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    assert "(broken: fake_pkg.commands:obj: ImportError: No module named 'fake_pkg' (100%))" in out
    assert "lacks help, add_arguments, run" in out
    assert cli.main(["info"]) == 0  # the rest of the command works
    capsys.readouterr()
    assert cli.main(["hello", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "yoso hello: error: the command failed to load: fake_pkg.commands:obj: ImportError: No module "
        "named 'fake_pkg' (100%)\n"
    )


def test_a_command_whose_options_fail_is_unusable_alone(commands, capsys):
    class Clashing(_Hello):
        def add_arguments(self, parser):
            parser.add_argument("--name")
            parser.add_argument("--name")  # argparse.ArgumentError: conflicting option string

    commands += [_EntryPoint("clash", Clashing()), _EntryPoint("hello", _Hello())]
    assert cli.main(["hello"]) == 0 and capsys.readouterr().out == "hello world\n"
    assert cli.main(["clash"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoso clash: error: the command failed to set up its options: fake_pkg.commands:obj: ")
    assert "conflicting option string: --name" in err


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_missing_yoso_bench_names_the_package(commands, capsys, command):
    assert cli.main([command, "--quick", "--out", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"yoso {command}: error: 'yoso {command}' comes with the yoso-bench package")
    assert "pip install yoso-bench" in err and "pip install -e 'packages/yoso-bench[plot]'" in err
    assert cli.main([command, "--help"]) == 2  # no help to show for a command that is not there
    capsys.readouterr()
    assert cli.main([]) == 0
    assert "(not installed: pip install yoso-bench)" in capsys.readouterr().out


def test_info_says_which_backend_serves_each_array_type(capsys):
    assert cli.main(["info", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["automatic_choice"]
    numpy_f64 = next(r for r in rows if r["framework"] == "numpy" and r["dtype"] == "float64")
    assert numpy_f64["backend"] == yoso.backend_for(*(np.zeros((1, 4, 8)),) * 3)
    assert all(r["backend"] or r["reason"] for r in rows)
    assert cli.main(["info"]) == 0
    assert "a call with default options runs on" in capsys.readouterr().out


def test_info_into_a_closed_pipe_is_quiet():
    pipeline = f"{sys.executable} -m yoso info | head -1"
    done = subprocess.run(pipeline, shell=True, capture_output=True, text=True, check=False)
    assert done.stdout.startswith("yoso ") and "Traceback" not in done.stderr, done.stderr
