"""The start of a run whose bucket lists slowly, side by side in one run.

A run lists its source and checks its output (the ledger, the lease) before it knows the shards
to do. Where that outlasts Ray's start, vitpipe starts the model actors anyway and hands them the
shards once known (runner.Early, feed.py); before 2026-12-02 22:00 UTC they started only after.
For each listing latency (SeaweedFS on loopback, behind the loopback proxy of tests/faultproxy.py
holding each LIST request L s more, in a process of its own), one `vitpipe run` process each:

  a vitpipe        the model actors start while the listing runs (the default)
  b after listing  the same run with runner.Early switched off: the actors start once the shards
                   to do are known, as before

Reported, in s from the run's start: shards to do known (listing and output check), first model
actor ready, first row, the whole process; and b / a of the first row.

    python -m benchmarks.startup --images 2000 --list-delay-s 0,2,5

Timings never go into pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.s3store import ROOT, add_options, s3_store, save, start_proxy

BUCKET = "vitpipe-bench-startup"
APPROACHES = {"a vitpipe": True, "b after listing": False}


def child(early: bool, spec: dict) -> None:
    """One run in this process, as `vitpipe run` would: the report as JSON on stdout's last line."""
    from pipeline.cluster import local_environment

    local_environment()
    from pipeline import runner
    from pipeline.config import JobSpec

    if not early:
        runner.Early.start = classmethod(lambda cls, *args: None)
    report = runner.run_job(JobSpec.model_validate(spec))
    print(json.dumps(report.to_dict()))


def one_run(approach: str, spec: dict, endpoint: str) -> dict:
    """A `vitpipe run` process of its own (its own local Ray), through the proxy at `endpoint`."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--child", json.dumps(
        {"early": APPROACHES[approach], "spec": spec})], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "AWS_ENDPOINT_URL": endpoint}, check=True)
    wall = time.perf_counter() - t
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"approach": approach, "images": r["records_read"], "started_early": r["started_early"],
            "listed_s": r["time_to_listed_s"], "model_ready_s": r["time_to_model_ready_s"],
            "first_row_s": r["time_to_first_row_s"], "process_s": round(wall, 2)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# A run's start over a slowly listing bucket ({meta['when']}, {meta['cpus']} CPUs, "
             f"`{meta['command']}`)", "",
             "| LIST held | approach | images | model actors started early | shards to do known s | model ready s | "
             "first row s | whole process s | first row: this / a |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = next(x for x in rows if x["list_delay_s"] == r["list_delay_s"] and x["approach"] == "a vitpipe")
        ratio = "" if r is a else f"{r['first_row_s'] / a['first_row_s']:.2f}"
        lines.append(f"| {r['list_delay_s']} s | {r['approach']} | {r['images']} | {r['started_early']} | "
                     f"{r['listed_s']} | {r['model_ready_s']} | {r['first_row_s']} | {r['process_s']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="digits (64 px JPEGs) in tar shards of 100")
    p.add_argument("--list-delay-s", default="0,2,5", help="seconds each LIST is held, comma-separated")
    p.add_argument("--child", help=argparse.SUPPRESS)
    add_options(p, "startup-cpu2")
    a = p.parse_args(argv)
    if a.child:
        job = json.loads(a.child)
        child(job["early"], job["spec"])
        return 0
    import s3fs

    from pipeline.demo import digit_jpegs, write_shards

    rows = []
    with s3_store(a) as endpoint:
        store = s3fs.S3FileSystem(skip_instance_cache=True)
        store.makedirs(BUCKET, exist_ok=True)
        digits = (digit_jpegs("train") + digit_jpegs("test")) * (a.images // 1797 + 1)
        write_shards(digits[:a.images], f"s3://{BUCKET}/shards", n_shards=max(1, a.images // 100))
        for delay in [float(x) for x in a.list_delay_s.split(",")]:
            proxy, port = start_proxy(0.0, endpoint, list_delay_s=delay)
            try:
                for approach in APPROACHES:
                    spec = {"name": "startup", "source": {"uri": f"s3://{BUCKET}/shards"},
                            "model": {"checkpoint": "builtin:digits"},
                            "output": {"uri": f"s3://{BUCKET}/out-{delay:g}-{approach[0]}", "mode": "full"},
                            "ray": {"progress": False}}
                    rows.append({"list_delay_s": delay} | one_run(approach, spec, f"http://127.0.0.1:{port}"))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                proxy.terminate()
    save(a, "startup", argv, {"rows": rows}, lambda meta: markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
