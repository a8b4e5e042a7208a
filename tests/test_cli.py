"""The CLI as a user meets it: --help, the demo on a local Ray, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _vitpipe(*args: str, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_help_explains_commands_and_spec():
    top = _vitpipe("--help")
    assert top.returncode == 0
    for cmd in ("run", "analyze", "demo", "inspect", "report"):
        assert cmd in top.stdout
    analyze = _vitpipe("analyze", "--help")
    assert "attention distance" in analyze.stdout and "analyze.samples" in analyze.stdout
    run = _vitpipe("run", "--help")
    assert "--set" in run.stdout and "engine.precision" in run.stdout and "output.mode" in run.stdout


@pytest.mark.heavy
def test_demo_labels_held_out_digits_and_inspect_reads_it(tmp_path):
    r = _vitpipe("demo", "--out", "demo-output", cwd=tmp_path)  # where the analyze job below looks
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo-output" / "labels"
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
    again = _vitpipe("demo", "--out", "demo-output", cwd=tmp_path)
    assert again.returncode == 0
    assert "ledger         4 entries at the start: 0 from its snapshot, 4 read one by one" in again.stdout  # local disk
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/part-*.parquet'").fetchall()[0][0] == 359
    assert "report.html" in {p.name for p in out.iterdir()}
    # The README's analyze command, from the folder the demo ran in (relative paths in the job spec)
    an = _vitpipe("analyze", str(JOBS / "analyze-digits.yaml"), "--no-progress", cwd=tmp_path)
    assert an.returncode == 0, an.stderr[-3000:]
    assert "Ray ready" not in an.stderr and "listed" not in an.stderr  # --no-progress: no start-up lines either
    manifest = json.loads((out / "analysis" / "_manifest.json").read_text())
    assert manifest["counts"]["ok"] == 359 and "mean attention distance" in an.stdout
    knn = {r["embedding"]: r["accuracy"] for r in manifest["knn"]}
    assert set(knn) == {"cls", "mean"} and f"{knn['cls']:.4f}" in an.stdout


def test_inspect_refuses_a_non_output(tmp_path):
    r = _vitpipe("inspect", str(tmp_path))
    assert r.returncode == 1 and "not a finished vitpipe output" in r.stderr


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_file(tmp_path):
    (tmp_path / "_manifest.json").write_text(json.dumps({  # an error file's entry without its path
        "format": "vitpipe-output/1", "report": {"errors_by_type": {"CorruptImage": 1}}, "files": [{"kind": "errors"}]}))
    r = _vitpipe("report", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2 and "please report it" in r.stderr
    saved = Path(r.stderr.split("the traceback is in ", 1)[1].split()[0])
    assert "Traceback" in saved.read_text() and "KeyError" in saved.read_text()
    loud = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "VITPIPE_TRACEBACK": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr
