"""What the object-store benchmarks (image_folder.py, output_commit.py) share: the S3 server they
run against (SeaweedFS started here, or the one in AWS_ENDPOINT_URL), the loopback proxy that adds
a latency to every request, timing, and writing the results table."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from pipeline.s3local import environ, start_seaweedfs

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def add_options(p: argparse.ArgumentParser, name: str) -> None:
    """--latency-ms, --s3, --out and --name (results file `name` by default)."""
    p.add_argument("--latency-ms", default="0,20", help="store latencies to add, comma-separated (0: loopback as is)")
    p.add_argument("--s3", choices=["local", "env"], default="local",
                   help="local: start SeaweedFS on 127.0.0.1:8333; env: the S3 server in AWS_ENDPOINT_URL")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default=name, help="results file name (.json, .md) in --out")


def latencies(a: argparse.Namespace) -> list[int]:
    return [int(x) for x in a.latency_ms.split(",")]


@contextmanager
def s3_store(a: argparse.Namespace) -> Iterator[str]:
    """The S3 server --s3 names, in this process's environment while inside: yields its endpoint."""
    sys.path.insert(0, str(ROOT / "tests"))  # the latency proxy: tests/faultproxy.py
    server = start_seaweedfs(tempfile.mkdtemp(prefix="vitpipe-bench-s3-")) if a.s3 == "local" else None
    try:
        with environ(server.env if server else {}):
            yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        if server:
            server.stop()


def serve_proxy(delay_s: float, upstream: tuple[str, int], ports, list_delay_s: float = 0.0) -> None:
    """The latency proxy, in a process of its own: its CPU is not the measured process's."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(upstream, faults=False, delay_s=delay_s, list_delay_s=list_delay_s)
    ports.put(proxy.port)
    threading.Event().wait()


def start_proxy(delay_s: float, store: str, list_delay_s: float = 0.0) -> tuple[multiprocessing.Process, int]:
    """The proxy in front of `store`: every request held `delay_s`, each LIST `list_delay_s` more."""
    ctx = multiprocessing.get_context("spawn")  # this process has threads (fsspec's loop): no fork
    ports = ctx.Queue()
    url = urlsplit(store)
    proc = ctx.Process(target=serve_proxy, args=(delay_s, (url.hostname, url.port), ports, list_delay_s), daemon=True)
    proc.start()
    return proc, ports.get(timeout=60)


def timed(step: Callable[[], T]) -> tuple[T, float, float]:
    """(what `step` returned, seconds, CPU seconds of this process)."""
    t, c = time.perf_counter(), time.process_time()
    got = step()
    return got, time.perf_counter() - t, time.process_time() - c


def save(a: argparse.Namespace, module: str, argv: list[str] | None, results: dict,
         markdown: Callable[[dict], str]) -> None:
    """`results` and the meta line to --out/--name .json, `markdown(meta)` to .md and stdout."""
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "command": f"python -m benchmarks.{module} " + " ".join(argv or sys.argv[1:])}
    out = a.out / a.name
    out.with_suffix(".json").write_text(json.dumps({"meta": meta} | results, indent=1))
    text = markdown(meta)
    out.with_suffix(".md").write_text(text)
    print(text)
