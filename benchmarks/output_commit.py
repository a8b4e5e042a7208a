"""The driver's bookkeeping of an output on object storage, side by side in one run.

Before its first row a run reads the output's ledger (one JSON object per shard: a GET each);
after its last it commits: every part file moves from OUT/_pending/RUN/ into OUT/ (on S3 a copy
and a delete, s3fs asking the size first) and every shard's ledger entry is written again. For
each store latency (SeaweedFS on loopback as it is, then behind the loopback proxy of
benchmarks/image_folder.py that holds every request L ms), over --shards shards of one part file:

  a vitpipe        output.requests_in_flight 32 (the default): reads, copies and ledger writes
                   32 at a time on fsspec's loop, deletes in bulk, each finished shard's entry
                   written without waiting (storage.py, ledger.py, sink.py)
  b one at a time  output.requests_in_flight 1: the same requests, one after another (the code
                   before 2026-12-02 also sent a HEAD before each ledger GET and a DELETE per file)

Each approach: a first run (mode full) on an empty output, whose commit moves every shard's file;
a second (mode incremental, nothing changed), whose start reads the ledger's snapshot (one object
holding every entry, written by each commit: ledger.py) and keeps every shard; a third like it with
the snapshot removed first, whose start reads every ledger entry (as every run did before
2026-12-02 20:00 UTC, and as a store whose ETags are not MD5s still does). Timed: `ParquetSink.begin`, the driver recording each finished shard (`add`: its
ledger entry written; the part files are staged before, untimed: the model actors' work) and
`ParquetSink.commit`. Reported: seconds and CPU-ms per shard of this process (fsspec's loop
included), and the ratio b/a of the three together.

    python -m benchmarks.output_commit --shards 1000 --latency-ms 0,20

Timings never go into pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.s3store import add_options, latencies, s3_store, save, start_proxy, timed
from pipeline.config import OutputSpec
from pipeline.ledger import SNAPSHOT
from pipeline.s3local import environ
from pipeline.sink import ParquetSink
from pipeline.sources import Shard

BUCKET = "vitpipe-bench-commit"


def one_run(store, uri: str, mode: str, run_id: str, shards: list[Shard], in_flight: int,
            snapshot: bool = True) -> dict:
    """One run's bookkeeping: seconds and CPU seconds of begin, of recording the finished shards, of
    commit; shards done and kept. `snapshot` False: the ledger's snapshot is removed first."""
    import s3fs

    root = uri.removeprefix("s3://")
    if not snapshot:
        store.rm_file(f"{root}/_ledger/{SNAPSHOT}")
    s3fs.S3FileSystem.clear_instance_cache()  # a new driver process: nothing listed yet
    sink = ParquetSink(OutputSpec(uri=uri, mode=mode, requests_in_flight=in_flight), run_id, "model-1")
    try:
        plan, begin_s, begin_cpu = timed(lambda: sink.begin(shards))
        store.pipe({f"{root}/_pending/{run_id}/part-{run_id}-{i:06d}.parquet": b"rows" for i in range(len(plan.todo))})
        _, record_s, record_cpu = timed(lambda: record(sink, plan.todo, run_id))
        manifest, commit_s, commit_cpu = timed(lambda: sink.commit({"run_id": run_id}))
    except BaseException as e:
        sink.abort(e)
        raise
    if manifest["totals"]["shards"] != len(shards):
        raise RuntimeError(f"{uri}: {manifest['totals']['shards']} shards committed, {len(shards)} listed")
    return {"begin_s": begin_s, "begin_cpu": begin_cpu, "record_s": record_s, "record_cpu": record_cpu,
            "commit_s": commit_s, "commit_cpu": commit_cpu, "done": len(plan.todo), "kept": len(plan.kept)}


def record(sink: ParquetSink, todo: list[Shard], run_id: str) -> None:
    """The driver's loop over the parts' records, one part per shard: each shard finishes and its
    ledger entry is written."""
    for i, shard in enumerate(todo):
        counts = {"records": 8, "ok": 8, "errors": {}, "skipped": {}, "labeled": 0, "correct": 0}
        files = [{"path": f"part-{run_id}-{i:06d}.parquet", "kind": "ok", "rows": 8, "bytes": 4, "sha256": "0"}]
        sink.add({"shard": shard.uri, "part": 0, "last": True, "fault": None, "files": json.dumps(files),
                  "counts": json.dumps(counts), "check": None, "node": "n1", "finished_at": 0.0})


def rows_at(store, endpoint: str, ms: int, n: int) -> list[dict]:
    """Rows a and b, first and second run each, with `ms` added to every request."""
    proxy, port = start_proxy(ms / 1000, endpoint) if ms else (None, None)
    shards = [Shard(f"s3://input/shard-{i:06d}.tar", f"etag-{i}", 1000) for i in range(n)]
    rows = []
    try:
        with environ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}" if proxy else endpoint}):
            for name, in_flight in (("a vitpipe", 32), ("b one at a time", 1)):
                uri = f"s3://{BUCKET}/out-{ms}ms-{in_flight}"
                for run, mode, snapshot in (("first run: commit moves every file", "full", True),
                                            ("second run: reads the snapshot", "incremental", True),
                                            ("third run: reads every ledger entry", "incremental", False)):
                    r = one_run(store, uri, mode, f"run{len(rows)}", shards, in_flight, snapshot)
                    rows.append({"latency_ms": ms, "approach": name, "run": run, "shards": n} | {
                        k: round(v, 2) if k.endswith("_s") else v for k, v in r.items() if not k.endswith("_cpu")} | {
                        f"{step}_cpu_ms_per_shard": round(r[f"{step}_cpu"] / n * 1e3, 3) for step in ("begin", "record", "commit")})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if proxy:
            proxy.terminate()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# The output's bookkeeping on S3 ({meta['when']}, `{meta['command']}`)", "",
             "| store latency added | approach | run | shards | begin s | record s | commit s | CPU-ms/shard: begin / "
             "record / commit | this / a (the three) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = next(x for x in rows if (x["latency_ms"], x["run"], x["approach"]) == (r["latency_ms"], r["run"], "a vitpipe"))
        ratio = "" if r is a else f"{total(r) / total(a):.2f}"
        cpu = " / ".join(str(r[f"{step}_cpu_ms_per_shard"]) for step in ("begin", "record", "commit"))
        lines.append(f"| {r['latency_ms']} ms | {r['approach']} | {r['run']} | {r['shards']} | {r['begin_s']} | "
                     f"{r['record_s']} | {r['commit_s']} | {cpu} | {ratio} |")
    return "\n".join(lines) + "\n"


def total(row: dict) -> float:
    return row["begin_s"] + row["record_s"] + row["commit_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1000)
    add_options(p, "output-commit-cpu2")
    a = p.parse_args(argv)
    import s3fs

    rows = []
    with s3_store(a) as endpoint:
        store = s3fs.S3FileSystem(skip_instance_cache=True)  # straight to the store: the untimed staging
        store.makedirs(BUCKET, exist_ok=True)
        for ms in latencies(a):
            rows += rows_at(store, endpoint, ms, a.shards)
    save(a, "output_commit", argv, {"rows": rows}, lambda meta: markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
