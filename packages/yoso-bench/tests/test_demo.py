"""``yoso demo`` through the ``yoso`` command (found through yoso-bench's ``yoso.commands`` entry point)."""

from __future__ import annotations

import json

from yoso import cli


def test_demo_runs_and_writes_outputs(tmp_path, capsys):
    assert cli.main(["demo", "--n", "128", "--dim", "16", "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "N-YOSO-128" in text and "softmax" in text
    results = json.loads((tmp_path / "demo.json").read_text())
    angles = [row["angle_to_yoso_e_deg"] for row in results["rows"]]
    assert angles[-1] < angles[0], "more hashes must approximate YOSO-E better"
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_cli_reports_bad_arguments(capsys):
    assert cli.main(["demo", "--backend", "nope", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoso demo: error: ") and "unknown yoso backend" in err
