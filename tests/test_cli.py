"""The CLI as a user meets it: --help, the demo on a local Ray, inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest


def _vitpipe(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_explains_commands_and_spec():
    top = _vitpipe("--help")
    assert top.returncode == 0
    for cmd in ("run", "demo", "inspect"):
        assert cmd in top.stdout
    run = _vitpipe("run", "--help")
    assert "--set" in run.stdout and "engine.precision" in run.stdout and "output.mode" in run.stdout


@pytest.mark.heavy
def test_demo_labels_held_out_digits_and_inspect_reads_it(tmp_path):
    r = _vitpipe("demo", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo" / "labels"
    report = json.loads((out / "_report.json").read_text())
    assert report["top1_accuracy"] > 0.9  # chance is 0.1
    assert report["records_read"] == report["ok_rows"] == 359
    assert "top-1 accuracy" in r.stdout and "embedding" in r.stdout
    # What the demo tells the user to run works: DuckDB reads the output without Ray.
    n, acc = duckdb.sql(f"SELECT count(*), avg((topk_ids[1] = label)::INT) FROM '{out}/part-*.parquet'").fetchall()[0]
    assert n == 359 and abs(acc - report["top1_accuracy"]) < 1e-3
    insp = _vitpipe("inspect", str(out), "--rows", "2")
    assert insp.returncode == 0
    assert "committed (_SUCCESS present)" in insp.stdout
    assert "files  ok           4 files        359 rows" in insp.stdout and "per file min" in insp.stdout
    assert "embedding: fixed_size_list<element: float>[96]" in insp.stdout
    # Running the demo again replaces its output (the demo uses mode full): still 359 rows.
    again = _vitpipe("demo", "--out", str(tmp_path / "demo"))
    assert again.returncode == 0
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/part-*.parquet'").fetchall()[0][0] == 359


def test_inspect_refuses_a_non_output(tmp_path):
    r = _vitpipe("inspect", str(tmp_path))
    assert r.returncode == 1 and "not a finished vitpipe output" in r.stderr
