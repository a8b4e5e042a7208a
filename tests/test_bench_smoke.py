"""The benchmark runs end to end and writes its table; never a speed assertion (timings live in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.heavy


def test_benchmark_produces_its_table(s3_server, tmp_path):
    env = os.environ | s3_server
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--images", "24", "--precisions", "fp32",
                        "--engine-seconds", "1", "--s3", "env", "--out", str(tmp_path), "--name", "smoke"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "smoke.md").read_text()
    for approach in ("a engine", "b vitpipe", "c ray recipe", "c2 recipe+engine", "d dataloader"):
        assert f"| {approach} |" in table
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert {r["images"] for r in results if r["approach"] != "a engine"} == {24}


def test_vitpipe_bench_on_a_two_node_cluster_says_how_work_divides(s3_server, tmp_path):
    """`vitpipe bench` passes its options through; --nodes 2 runs vitpipe on a ray.cluster_utils.Cluster."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--images", "24", "--precisions", "fp32",
                        "--only", "b", "--nodes", "2", "--s3", "env", "--out", str(tmp_path), "--name", "nodes"],
                       capture_output=True, text=True, timeout=600, env=os.environ | s3_server, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "nodes.md").read_text()
    assert "Cluster, 2 nodes" in table
    row = next(line for line in table.splitlines() if line.startswith("| b vitpipe |"))
    assert "2 actor(s)" in row and row.count("%)") == 2  # CPU seconds of each node, with its share


def test_bench_gives_each_model_its_own_image_count_or_refuses():
    from benchmarks.bench import images_per_model

    models = ["vit_ti_16", "vit_s_16", "vit_b_16"]
    assert images_per_model("2000,640,320", models) == {"vit_ti_16": 2000, "vit_s_16": 640, "vit_b_16": 320}
    assert images_per_model("500", models) == dict.fromkeys(models, 500)
    with pytest.raises(SystemExit, match="one per model"):
        images_per_model("2000,640", models)
    with pytest.raises(SystemExit, match="one per model"):
        images_per_model("0", models)


def test_the_driver_profile_sorts_samples_into_roles():
    """py-spy's collapsed stacks -> CPU-s by role: an import counts as an import wherever it runs
    (here inside the model load), Ray Data's loop as the loop, a stack without Python frames as
    Ray's native threads; counts are samples at 50 per CPU-second."""
    from benchmarks.driver_profile import roles

    raw = [
        "<module> (pipeline/cli.py:1);_prepare (pipeline/runner.py:9);load_model (pipeline/model/checkpoints.py:3);"
        "_find_and_load (<frozen importlib._bootstrap>:1);<module> (torch/__init__.py:1) 100",
        "Thread.run (threading.py:982);StreamingExecutor.run (ray/data/_internal/execution/streaming_executor.py:1);"
        "ResourceManager.update_usages (ray/data/_internal/execution/resource_manager.py:252) 25",
        "_process (pipeline/runner.py:250);ParquetSink.add (pipeline/sink.py:120) 5",
        "load_model (pipeline/model/checkpoints.py:3);_from_ours (pipeline/model/checkpoints.py:160) 10",
        " 50",
        "something (elsewhere.py:1) 5",
    ]
    assert roles(raw) == {"Python imports": 2.0, "native threads (Ray's core worker)": 1.0,
                          "Ray Data's scheduling loop": 0.5, "model load, listing, labels": 0.2,
                          "part records and the sink": 0.1, "other": 0.1}


def test_the_image_folder_benchmark_reads_every_file_each_way(s3_server, tmp_path):
    """benchmarks/image_folder.py: each approach reads all 24 files, from the folder or named by a
    Parquet file's rows, and each listing finds all 30 keys, at each store latency."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.image_folder", "--images", "24", "--list-keys", "30",
                        "--latency-ms", "0,5",
                        "--s3", "env", "--out", str(tmp_path), "--name", "folder"],
                       capture_output=True, text=True, timeout=600, env=os.environ | s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "folder.json").read_text())["rows"]
    assert {(row["latency_ms"], row["approach"]) for row in rows} == {
        (ms, a) for ms in (0, 5) for a in ("a vitpipe", "a0 dateutil", "b one by one", "b0 before", "c ray recipe",
                                           "p parquet", "p1 one by one", "l listing", "l1 one stream", "l0 before")}
    assert {row["images"] for row in rows if row["approach"][0] != "l"} == {24}
    assert {row["images"] for row in rows if row["approach"][0] == "l"} == {30}
    assert "| 5 ms | b one by one | 24 |" in (tmp_path / "folder.md").read_text()


def test_the_output_commit_benchmark_commits_and_keeps_every_shard_each_way(s3_server, tmp_path):
    """benchmarks/output_commit.py: at each latency and each way, the first run commits every shard
    and the second (from the ledger's snapshot) and third (each entry read) keep every one (it
    refuses to report a commit that lost any)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.output_commit", "--shards", "12", "--latency-ms", "0,5",
                        "--s3", "env", "--out", str(tmp_path), "--name", "commit"],
                       capture_output=True, text=True, timeout=600, env=os.environ | s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "commit.json").read_text())["rows"]
    assert sorted((row["latency_ms"], row["approach"], row["done"], row["kept"]) for row in rows) == sorted(
        (ms, a, done, kept) for ms in (0, 5) for a in ("a vitpipe", "b one at a time") for done, kept in ((12, 0), (0, 12), (0, 12)))
    assert "| 5 ms | b one at a time | first run: commit moves every file | 12 |" in (tmp_path / "commit.md").read_text()
