"""Compiled-engine cache: build once per (model, backend, version, precision, batch, GPU), anywhere.

Layout under the cache URI (a local folder or any fsspec URI, e.g. s3://bucket/vitpipe-engines):

    NAME.bin     the artifact (an ONNX graph, a TensorRT plan)
    NAME.json    written after NAME.bin: the key and the artifact's sha256 and size
    NAME.lock    held by the one builder (conditional create), removed when done

An entry is loaded only if NAME.json exists and the artifact's sha256 matches it;
anything else (missing, truncated, tampered, another key) is rebuilt, never loaded.
Concurrent actors that miss the same key build it once: the first to create
NAME.lock builds, the others wait for NAME.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import fsspec

from pipeline.storage import put_if_absent, sha256_bytes

log = logging.getLogger(__name__)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vitpipe", "engines")
STALE_LOCK_S = 30 * 60  # a builder that died: its lock is taken over after this


@dataclass(frozen=True)
class CacheKey:
    model_id: str
    backend: str  # "onnx", "tensorrt"
    backend_version: str
    precision: str
    max_batch: int
    device: str  # "cpu", or the GPU's compute capability, e.g. "sm_90"

    @property
    def name(self) -> str:
        digest = sha256_bytes(json.dumps(asdict(self), sort_keys=True).encode())[:20]
        return f"{self.backend}-{self.precision}-{self.device}-b{self.max_batch}-{digest}"


@dataclass
class CacheResult:
    data: bytes
    status: str  # "hit", "built", "rebuilt (why)", "built by another worker"


class EngineCache:
    def __init__(self, uri: str | None = None, wait_s: float = 1800.0, poll_s: float = 0.5):
        self.uri = uri or DEFAULT_CACHE
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/")
        self.wait_s, self.poll_s = wait_s, poll_s

    def _paths(self, key: CacheKey) -> tuple[str, str, str]:
        base = f"{self.root}/{key.name}"
        return f"{base}.bin", f"{base}.json", f"{base}.lock"

    def load(self, key: CacheKey) -> tuple[bytes | None, str]:
        """The verified artifact, or None and why it cannot be used."""
        data_path, meta_path, _ = self._paths(key)
        self.fs.invalidate_cache()
        if not self.fs.exists(meta_path):
            return None, "miss"
        try:
            meta = json.loads(self.fs.cat_file(meta_path))
            data = self.fs.cat_file(data_path)
        except (OSError, json.JSONDecodeError) as e:
            return None, f"unreadable entry ({e})"
        if meta.get("key") != asdict(key):
            return None, "entry was written for another key"
        if sha256_bytes(data) != meta.get("sha256"):
            return None, f"checksum mismatch ({len(data)} bytes, expected {meta.get('size')})"
        return data, "hit"

    def get_or_build(self, key: CacheKey, build: Callable[[], bytes]) -> CacheResult:
        data, why = self.load(key)
        if data is not None:
            return CacheResult(data, "hit")
        data_path, meta_path, lock_path = self._paths(key)
        deadline = time.time() + self.wait_s
        while True:
            if put_if_absent(self.fs, lock_path, json.dumps({"pid": os.getpid(), "at": time.time()}).encode()):
                try:
                    # Checked again under the lock: the previous holder may have committed just now.
                    data, _ = self.load(key)
                    if data is not None:
                        return CacheResult(data, "built by another worker")
                    data = build()
                    self._store(key, data)
                finally:
                    self.fs.rm_file(lock_path)
                return CacheResult(data, "built" if why == "miss" else f"rebuilt ({why})")
            # Someone else is building it: wait for their commit, or take over a stale lock.
            time.sleep(self.poll_s)
            data, _ = self.load(key)
            if data is not None:
                return CacheResult(data, "built by another worker")
            if self._lock_age(lock_path) > STALE_LOCK_S:
                log.warning("engine cache: lock %s is stale; taking over the build", lock_path)
                self.fs.rm_file(lock_path)
            if time.time() > deadline:
                raise TimeoutError(f"engine cache: waited {self.wait_s:.0f} s for {key.name} to be built "
                                   f"by another worker; remove {lock_path} if no build is running")

    def put(self, key: CacheKey, data: bytes) -> None:
        """Store (or replace) an entry outside the build-once protocol: for artifacts that only
        speed builds up, like TensorRT's timing cache. A reader racing a replace sees a checksum
        mismatch, i.e. a miss, never a wrong artifact."""
        self._store(key, data)

    def _store(self, key: CacheKey, data: bytes) -> None:
        data_path, meta_path, _ = self._paths(key)
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(data_path, data)
        meta = {"key": asdict(key), "sha256": sha256_bytes(data), "size": len(data), "created_at": time.time()}
        self.fs.pipe_file(meta_path, json.dumps(meta, indent=2).encode())  # the commit: written last

    def _lock_age(self, lock_path: str) -> float:
        try:
            return time.time() - float(json.loads(self.fs.cat_file(lock_path))["at"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return 0.0
