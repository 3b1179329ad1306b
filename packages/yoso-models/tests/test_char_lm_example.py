"""examples/char_lm.py: the corpus is the repository's text, and a tiny run goes end to end (seconds), its
generation with the carried state checked against full recomputation inside the script."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "char_lm.py"


@pytest.fixture(scope="module")
def char_lm():
    spec = importlib.util.spec_from_file_location("char_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_is_the_repositorys_documentation(char_lm):
    text = char_lm.load_text()
    assert "YOSO" in text and len(text) > 20_000
    corpus = char_lm.Corpus(text)
    assert corpus.decode(corpus.train[:40]) == text[:40]
    assert len(corpus.val) == len(text) - len(corpus.train)


def test_smoke_run(char_lm, capsys):
    assert char_lm.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("equal a full recomputation's") == 2  # yoso and yoso-c
    rows = (
        "softmax",
        "yoso-4 (sampled, fixed hash functions)",
        "yoso-4: same model, eval = expectation",
        "yoso-c-4, window 3 (sampled, fixed hash functions)",
    )
    for row in rows:
        match = re.search(rf"^\| {re.escape(row)} \| ([\d.]+) \|", out, re.MULTILINE)
        assert match and 1.0 <= float(match.group(1)) < 1000.0, row
