"""examples/listops.py: the generator computes the right labels, and a tiny run goes end to end (seconds)."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "listops.py"


@pytest.fixture(scope="module")
def listops():
    spec = importlib.util.spec_from_file_location("listops_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "tree, value",
    [
        (("MAX", [4, ("MIN", [2, 3]), 1, ("SM", [5, 8])]), 4),
        (("MED", [7, 1, 9, 3]), 3),  # even count: the lower median
        (("MED", [7, 1, 9]), 7),
        (("SM", [9, 9, ("MAX", [9, 0])]), 7),
        (("MIN", [("SM", [6, 6]), 5]), 2),
    ],
)
def test_labels(listops, tree, value):
    assert listops.evaluate(tree) == value


def test_tokens_round_trip(listops):
    tree = ("MAX", [4, ("MIN", [2, 3]), 1])
    assert " ".join(listops.tokens(tree)) == "[MAX 4 [MIN 2 3 ] 1 ]"


def test_datasets_are_disjoint_and_within_bounds(listops):
    rng = random.Random(0)
    args = {"min_len": 10, "max_len": 30, "max_depth": 4, "max_args": 4, "p_branch": 0.3}
    train, seen = listops.make_dataset(200, rng, **args)
    test, _ = listops.make_dataset(50, rng, exclude=seen, **args)
    assert not {tuple(s) for s, _ in train} & {tuple(s) for s, _ in test}
    assert all(10 <= len(s) <= 30 and 0 <= y <= 9 for s, y in train + test)


def test_smoke_run(listops, capsys):
    assert listops.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for row in ("softmax", "yoso-e", "yoso-32 (eval: sampled, m = 32)", "yoso-32 (eval: expectation)"):
        match = re.search(rf"^\| {re.escape(row)} \| ([\d.]+) \|", out, re.MULTILINE)
        assert match and 0.0 <= float(match.group(1)) <= 100.0, row
