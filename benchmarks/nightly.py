"""Nightly runs on SeaweedFS, measured: a first run, a second after 10% new shards, and a run whose
driver is SIGKILLed mid-way then resumed. Prints counts and times; checks zero missing/duplicate keys.

    python -m benchmarks.nightly --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KILL = """
import os, signal, sys
import pipeline.sink as sink
orig = sink.ParquetSink._finish_shard
def finish(self, key):
    orig(self, key)
    if len(self.done) == int(os.environ["KILL_AFTER_SHARDS"]):
        os.kill(os.getpid(), signal.SIGKILL)
sink.ParquetSink._finish_shard = finish
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(job: Path, env: dict, kill_after: int | None = None) -> tuple[int, float, str]:
    t0 = time.time()
    if kill_after is None:
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"]
    else:
        script = job.parent / "kill.py"
        script.write_text(KILL)
        cmd = [sys.executable, str(script), "run", str(job), "--no-progress"]
        env = env | {"KILL_AFTER_SHARDS": str(kill_after), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return r.returncode, time.time() - t0, r.stdout + r.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=100)
    args = p.parse_args(argv)

    import duckdb
    import s3fs

    from benchmarks.bench import make_jpegs, write_input
    from pipeline.s3local import environ, start_seaweedfs

    with tempfile.TemporaryDirectory(prefix="vitpipe-nightly-") as tmp:
        server = start_seaweedfs(Path(tmp) / "s3")
        try:
            with environ(server.env):
                env = os.environ.copy()
                fs = s3fs.S3FileSystem(skip_instance_cache=True)
                fs.mkdir("vitpipe-bench")
                jpegs = make_jpegs(int(args.images * 1.1), seed=1)
                src = write_input(fs, jpegs[: args.images], args.per_shard)  # s3://vitpipe-bench/input/nN/
                spec = {"name": "nightly", "source": {"uri": src}, "model": {"checkpoint": "builtin:digits"},
                        "engine": {"batch_size": 64}, "outputs": {"top_k": 1},
                        "output": {"uri": "s3://vitpipe-bench/nightly", "mode": "incremental", "lease_ttl_s": 3}}
                job = Path(tmp) / "nightly.yaml"
                job.write_text(yaml.safe_dump(spec))
                rows = []

                def report(name: str, code: int, secs: float) -> None:
                    fs.invalidate_cache()
                    runs = sorted(fs.glob("vitpipe-bench/nightly/_runs/*.json"))
                    last = json.loads(fs.cat(runs[-1])) if runs else {}
                    rows.append({"run": name, "exit": code, "seconds": round(secs, 1),
                                 "shards_processed": last.get("shards_processed"),
                                 "shards_resumed": last.get("shards_resumed"),
                                 "shards_unchanged": last.get("shards_unchanged"),
                                 "records": last.get("records_read")})
                    print(json.dumps(rows[-1]), flush=True)

                code, secs, _ = run(job, env)
                report("first night", code, secs)
                # 10% more shards arrive.
                extra = jpegs[args.images :]
                for i in range(0, len(extra), args.per_shard):
                    import io
                    import tarfile

                    buf = io.BytesIO()
                    with tarfile.open(fileobj=buf, mode="w") as tar:
                        for j, data in enumerate(extra[i : i + args.per_shard]):
                            info = tarfile.TarInfo(f"new{i + j:07d}.jpg")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                    fs.pipe(f"{src.removeprefix('s3://')}/shard-new-{i // args.per_shard:05d}.tar", buf.getvalue())
                code, secs, _ = run(job, env)
                report("second night (+10% shards)", code, secs)

                # Kill and resume, on a fresh output.
                spec["output"] = {"uri": "s3://vitpipe-bench/resume", "mode": "incremental", "lease_ttl_s": 3}
                job.write_text(yaml.safe_dump(spec))
                code, secs, _ = run(job, env, kill_after=5)
                rows.append({"run": "killed after 5 shards", "exit": code, "seconds": round(secs, 1)})
                print(json.dumps(rows[-1]), flush=True)
                time.sleep(3.5)
                t0 = time.time()
                code, _, out = run(job, env)
                fs.invalidate_cache()
                runs = sorted(fs.glob("vitpipe-bench/resume/_runs/*.json"))
                last = json.loads(fs.cat(runs[-1]))
                manifest = json.loads(fs.cat("vitpipe-bench/resume/_manifest.json"))
                con = duckdb.connect()
                con.register_filesystem(fs)
                files = ", ".join(f"'s3://vitpipe-bench/resume/{f['path']}'" for f in manifest["files"]
                                  if f["kind"] == "ok")
                keys = [r[0] for r in con.sql(f"SELECT key FROM read_parquet([{files}])").fetchall()]
                expected = int(args.images * 1.1)
                rows.append({"run": "resumed", "exit": code, "seconds": round(time.time() - t0, 1),
                             "shards_processed": last["shards_processed"], "shards_resumed": last["shards_resumed"],
                             "records": len(keys), "missing": expected - len(set(keys)),
                             "duplicates": len(keys) - len(set(keys))})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    print("\n| run | exit | s | shards processed | resumed | unchanged | records | missing | duplicates |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['exit']} | {r['seconds']} | {r.get('shards_processed', '')} | "
              f"{r.get('shards_resumed', '')} | {r.get('shards_unchanged', '')} | {r.get('records', '')} | "
              f"{r.get('missing', '')} | {r.get('duplicates', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
