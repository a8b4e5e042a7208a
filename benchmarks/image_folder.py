"""Reading a folder of loose image files from object storage, side by side in one run.

A read actor of a `format: images` job fetches one object per image. On a remote store each GET
waits 10-50 ms for its first byte, so one GET at a time caps a read actor at 20-100 images/s,
whatever the CPU. Here, for each store latency (SeaweedFS on loopback as it is, then behind a
loopback proxy, in a process of its own, that holds every request L ms first, tests/faultproxy.py):

  a vitpipe     the read stage's own code (sources.read_parts) over the folder's shards, with
                source.requests_in_flight GETs under way (default 32), in this process
  b one by one  the same with requests_in_flight 1: one GET at a time
  b0 before     the read actors' loop before 2026-12-02: fs.cat_file per file in turn (s3fs 2026.2+
                sends a HEAD before each GET there)
  c ray recipe  ray.data.read_binary_files(folder) on a local Ray started before the clock: the read
                of Ray's batch-inference recipe (read_images, less its decode), its own parallelism
  p parquet     the same files named by a Parquet file's rows, as Hugging Face `datasets` writes an
                image it did not embed (struct<bytes: null, path>): read_parts with
                source.requests_in_flight GETs under way
  p1 one by one the same with requests_in_flight 1 (before 2026-12-02 such files were read one at a
                time, with a HEAD before each GET as in b0)
  a0 dateutil   a with botocore's own timestamp parser (dateutil), as before 2026-12-02
                (storage.fast_s3_timestamps)

and the driver's listing (sources.list_shards) of --list-keys loose files in 100 folders under a
prefix of their own:

  l listing     the folders listed at once, source.requests_in_flight LISTs under way
                (storage.find_files)
  l1 one stream requests_in_flight 1: one LIST after another (fs.find)
  l0 before     one stream, and dateutil's timestamps: the listing before 2026-12-02

Reported: seconds, images/s (keys/s), CPU-ms per image (key) of the reading processes (a, b, p, p1,
l: this process with fsspec's event loop; c: Ray's workers) and the ratios a/b, a/c, p/p1, l/l1,
l/l0. With --run, at the highest latency, whole `vitpipe run` processes too (the bundled model,
labels from the class folders, Parquet to local disk), with 32 requests in flight and with 1.

    python -m benchmarks.image_folder --images 2000 --list-keys 20000 --latency-ms 0,20 --run

Timings never go into pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.bench import Monitor
from benchmarks.dataplane import vitpipe_cmd
from benchmarks.s3store import add_options, latencies, s3_store, save, start_proxy, timed
from pipeline import sources, storage
from pipeline.config import SourceSpec
from pipeline.demo import digit_jpegs
from pipeline.s3local import environ
from pipeline.sources import Shard, list_shards, read_parts

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vitpipe-bench-folder"


def write_keys(fs, n: int) -> str:
    """n tiny objects under a prefix of their own, for the listing rows: their URI."""
    fs.makedirs(BUCKET, exist_ok=True)
    fs.pipe({f"{BUCKET}/keys/{i % 100:02d}/{i:07d}.jpg": b"\xff\xd8" for i in range(n)})
    return f"s3://{BUCKET}/keys"


def write_folder(fs, n: int) -> tuple[str, str]:
    """n small JPEGs as CLASS/NNNNNN.jpg under one prefix (the digits again and again), and a Parquet
    file beside the prefix whose rows name them (datasets' Image feature, bytes null): the URIs of both."""
    samples = digit_jpegs("train")
    files = {f"imgs/{label}/{i:06d}.jpg": data for i, (data, label) in ((i, samples[i % len(samples)]) for i in range(n))}
    fs.makedirs(BUCKET, exist_ok=True)
    fs.pipe({f"{BUCKET}/{name}": data for name, data in files.items()})
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = pa.table({"image": pa.array([{"bytes": None, "path": name} for name in files], image)})
    with fs.open(f"{BUCKET}/train.parquet", "wb") as f:
        pq.write_table(rows, f)
    return f"s3://{BUCKET}/imgs", f"s3://{BUCKET}/train.parquet"


def timed_read(source: SourceSpec, read: Callable[[list[Shard]], int]) -> tuple[int, float, float]:
    """(records, seconds, CPU seconds) of `read` over the source's shards, with a filesystem that has
    not listed the folder, as a read actor's (no object sizes cached from the listing)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem for this store address, made now
    shards = list_shards(source)
    s3fs.S3FileSystem.clear_instance_cache()
    return timed(lambda: read(shards))


def read_here(source: SourceSpec) -> tuple[int, float, float]:
    """vitpipe's read stage (read_parts) with source.requests_in_flight GETs under way."""
    return timed_read(source, lambda shards: sum(p.records.num_rows for s in shards for p in read_parts(s, source)))


def images(uri: str, in_flight: int) -> SourceSpec:
    """The folder as a `format: images` source."""
    return SourceSpec(uri=uri, format="images", requests_in_flight=in_flight)


def parquet_paths(uri: str, in_flight: int) -> SourceSpec:
    """The Parquet file whose rows name the folder's files, as a `format: parquet` source."""
    return SourceSpec(uri=uri, format="parquet", image_column="image", requests_in_flight=in_flight)


@contextmanager
def botocore_timestamps() -> Iterator[None]:
    """Inside: botocore parses timestamps with its own parser (dateutil), as before 2026-12-02."""
    from botocore import parsers, utils

    keep = storage.fast_s3_timestamps
    sources.fast_s3_timestamps = storage.fast_s3_timestamps = lambda fs: None  # the listing's, the reads'
    parsers.DEFAULT_TIMESTAMP_PARSER = utils.parse_timestamp
    try:
        yield
    finally:
        sources.fast_s3_timestamps = storage.fast_s3_timestamps = keep


def list_here(uri: str, in_flight: int) -> tuple[int, float, float]:
    """(keys, seconds, CPU seconds) of the driver's listing of a folder, on a new filesystem."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return timed(lambda: sum(len(s.files) for s in list_shards(images(uri, in_flight))))


def read_before(uri: str) -> tuple[int, float, float]:
    """The read actors' loop before 2026-12-02: `fs.cat_file` on each file in turn (which s3fs, since
    2026.2, precedes with a HEAD for the object's size)."""
    def read(shards: list[Shard]) -> int:
        return sum(bool(fs.cat_file(path)) for s in shards for fs, path in map(fsspec.core.url_to_fs, s.files))

    return timed_read(images(uri, 1), read)


def read_ray(uri: str) -> tuple[int, float, float]:
    """(records, seconds, CPU seconds of Ray's workers) of ray.data.read_binary_files. A read of one
    file first, untimed: Ray Data's helper actors and the read workers are started before the clock,
    so that the CPU counted is the read's (a worker's role changes with its task: all Ray workers count)."""
    import ray

    if not ray.data.read_binary_files(uri).take(1):
        raise RuntimeError(f"{uri}: the warm-up read found nothing")
    with Monitor(interval=0.5, memory=False) as mon:
        t = time.perf_counter()
        n = ray.data.read_binary_files(uri).materialize().count()  # count() alone reads no file
        seconds = time.perf_counter() - t
    cpu = sum(v for role, v in mon.cpu_by_role().items() if role.startswith("ray::"))
    return n, seconds, cpu


def reads_at(uri: str, table: str, keys: str, store: str, ms: int, in_flight: int) -> list[dict]:
    """Rows a, a0, b, b0, c, p, p1, l, l1 and l0 with `ms` added to every request (0: the store as it is)."""
    import ray

    proxy, port = start_proxy(ms / 1000, store) if ms else (None, None)
    with environ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}" if proxy else store}):
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 num_cpus=2)  # its workers take this store address
        try:
            results = {"a vitpipe": read_here(images(uri, in_flight))}
            with botocore_timestamps():
                results["a0 dateutil"] = read_here(images(uri, in_flight))
            results |= {"b one by one": read_here(images(uri, 1)), "b0 before": read_before(uri),
                        "c ray recipe": read_ray(uri), "p parquet": read_here(parquet_paths(table, in_flight)),
                        "p1 one by one": read_here(parquet_paths(table, 1)), "l listing": list_here(keys, in_flight),
                        "l1 one stream": list_here(keys, 1)}
            with botocore_timestamps():
                results["l0 before"] = list_here(keys, 1)
        finally:
            ray.shutdown()
            if proxy:
                proxy.terminate()
    rows = [{"latency_ms": ms, "approach": name, "images": n, "seconds": round(s, 2), "images_per_s": round(n / s, 1),
             "cpu_ms_per_image": round(cpu / n * 1e3, 3)} for name, (n, s, cpu) in results.items()]
    print(json.dumps(rows), flush=True)
    return rows


def runs_at(uri: str, store: str, ms: int, in_flight: int) -> list[dict]:
    """Rows d and e: whole `vitpipe run` processes with `ms` added to every request."""
    proxy, port = start_proxy(ms / 1000, store) if ms else (None, None)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}" if proxy else store}
    try:
        runs = [{"latency_ms": ms, "approach": name} | run_whole(uri, n, env)
                for name, n in (("d vitpipe run", in_flight), ("e vitpipe run, one by one", 1))]
    finally:
        if proxy:
            proxy.terminate()
    print(json.dumps(runs), flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--list-keys", type=int, default=20000, help="loose files for the listing rows l, l1, l0")
    p.add_argument("--in-flight", type=int, default=SourceSpec.model_fields["requests_in_flight"].default)
    p.add_argument("--run", action="store_true", help="also whole `vitpipe run` processes at the highest latency")
    add_options(p, "image-folder-cpu2")
    a = p.parse_args(argv)
    import s3fs

    rows, runs = [], []
    with s3_store(a) as store:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        uri, table = write_folder(fs, a.images)
        keys = write_keys(fs, a.list_keys)
        for ms in latencies(a):
            rows += reads_at(uri, table, keys, store, ms, a.in_flight)
        if a.run:
            runs = runs_at(uri, store, max(latencies(a)), a.in_flight)
    save(a, "image_folder", argv, {"rows": rows, "runs": runs}, lambda meta: markdown(rows, runs, meta))
    return 0


def markdown(rows: list[dict], runs: list[dict], meta: dict) -> str:
    lines = [f"# Reading an image folder from S3 ({meta['when']}, `{meta['command']}`)", "",
             "| store latency added | approach | images (l: keys) | s | images/s | CPU-ms/img | vitpipe / this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:  # the ratio: to a for the folder's rows, to p for the Parquet file's, to l for listings
        ref = {"p": "p parquet", "l": "l listing"}.get(r["approach"][0], "a vitpipe")
        a = next(x for x in rows if x["latency_ms"] == r["latency_ms"] and x["approach"] == ref)
        ratio = "" if r is a else f"{a['images_per_s'] / r['images_per_s']:.2f}"
        lines.append(f"| {r['latency_ms']} ms | {r['approach']} | {r['images']} | {r['seconds']} | "
                     f"{r['images_per_s']} | {r['cpu_ms_per_image']} | {ratio} |")
    if runs:
        lines += ["", "Whole `vitpipe run` processes (bundled model, labels from the folders, Parquet to local disk):",
                  "", "| store latency added | approach | images | s (whole process) | images/s | first row s (from run start) | "
                  "top-1 | d / this |", "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            ratio = "" if r is runs[0] else f"{runs[0]['images_per_s'] / r['images_per_s']:.2f}"
            lines.append(f"| {r['latency_ms']} ms | {r['approach']} | {r['images']} | {r['seconds']} | "
                         f"{r['images_per_s']} | {r['first_row_s']} | {r['top1']} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_whole(uri: str, in_flight: int, env: dict[str, str]) -> dict:
    """One `vitpipe run` of the folder as its own process, timed from outside."""
    out = Path(tempfile.mkdtemp(prefix="vitpipe-bench-folder-out-"))
    sets = ("source.format=images", "source.label_from=folder", f"source.requests_in_flight={in_flight}")
    t = time.perf_counter()
    done = subprocess.run(vitpipe_cmd(uri, out, sets), capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | env | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"vitpipe run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((out / "_report.json").read_text())
    n = report["records_read"]
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
            "first_row_s": report["time_to_first_row_s"], "top1": report["top1_accuracy"]}


if __name__ == "__main__":
    sys.exit(main())
