"""Which shards are done, and who may write the output now: the bookkeeping behind
incremental nightly runs, resume after a crash, and "never two runs at once".

One small JSON object per shard under OUT/_ledger/ (no read-modify-write of a shared
file, so concurrent writes of different shards never clash):

    {"uri", "etag", "size", "model_id", "records", "ok", "errors", "skipped",
     "files": [...], "run_id", "state": "pending" | "committed", "fault": null | "TruncatedShard" | ...}

"pending": the shard's rows are complete in files under OUT/_pending/RUN/, written by
a run that has not committed yet (or died). A later run adopts them instead of redoing
the shard. "committed": its files sit in OUT/ and the manifest lists them.

On an object store each commit also leaves OUT/_ledger/snapshot.json.gz: every entry's
body in one object. It is a cache, never the truth: the listing of _ledger/ says which
entries exist, and an entry is taken from the snapshot only while the store's MD5 of
its object (the ETag a listing returns) is that of the body in the snapshot; any other
(written since, by a run that died; or a store whose ETags are not MD5s) is read.

The lease, OUT/_lease.json, is created with a conditional write (If-None-Match: * on
S3, O_EXCL on disk); the holder renews it; a lease past its expiry belongs to a dead
run and may be taken over.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import socket
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

from pipeline.storage import fetch_in_order, put_if_absent, remove_files

SNAPSHOT = "snapshot.json.gz"  # in OUT/_ledger/, beside the entries (which end in .json)


def shard_key(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def md5(body: bytes) -> str:
    """What S3 gives as the ETag of an object written in one PUT (without SSE-KMS): its MD5, hex."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


@dataclass
class ShardEntry:
    uri: str
    etag: str
    size: int
    model_id: str
    run_id: str
    state: str  # "pending" | "committed"
    records: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    files: list[dict] = field(default_factory=list)  # {"path", "kind", "rows", "bytes", "sha256"}
    finished_at: float = 0.0
    fault: str | None = None  # the shard was cut short (sources.py): its rows up to the fault are here

    @property
    def retry_anyway(self) -> bool:
        """A fault that was not in the shard's bytes (gone, access denied, the store failing) is
        retried by the next incremental run even with the same ETag; a truncated or unreadable
        shard is read again once its ETag changes (rewritten)."""
        return self.fault in ("ShardGone", "ShardAccessDenied", "ShardReadError")

    @property
    def key(self) -> str:
        return shard_key(self.uri)

    def matches(self, etag: str, model_id: str) -> bool:
        return self.etag == etag and self.model_id == model_id


class Ledger:
    def __init__(self, fs, root: str, in_flight: int = 32):
        """`in_flight`: entries read or written at once on an object store (output.requests_in_flight)."""
        self.fs, self.dir, self.in_flight = fs, f"{root.rstrip('/')}/_ledger", in_flight
        self._writes: deque[Future] = deque()  # put_soon's, oldest first
        self._bodies: dict[str, bytes] = {}  # path -> the body this run read or wrote there: the next snapshot
        self.from_snapshot = 0  # entries the last `entries()` took from the snapshot, not read one by one

    def entries(self, output: dict[str, dict] | None = None) -> dict[str, ShardEntry]:
        """Every shard's entry. On an object store: each found in the snapshot (same MD5) from
        there, the rest `in_flight` GETs at a time. Each GET costs s3fs ~2.5 CPU-ms: a nightly run
        over an output of 10,000 shards spent ~25 CPU-s reading its ledger before its first row
        (and minutes, one after another). `output`: the whole output's listing with its infos,
        where the caller has just made one (the sink's begin): _ledger/ is not listed again."""
        if output is None:
            self.fs.invalidate_cache()
            try:
                output = {i["name"]: i for i in self.fs.ls(self.dir, detail=True)}
            except FileNotFoundError:
                output = {}
        listed = {p: i for p, i in output.items() if p.rpartition("/")[0] == self.dir}
        bundled = self._snapshot() if f"{self.dir}/{SNAPSHOT}" in listed else {}
        out: dict[str, ShardEntry] = {}
        to_read = []
        for path in sorted(p for p in listed if p.endswith(".json")):
            body = bundled.get(listed[path].get("ETag", "").strip('"'))
            if body is None or not self._take(path, body, out):
                to_read.append(path)
        self.from_snapshot = len(out)
        for path, data in zip(to_read, fetch_in_order(self.fs, to_read, self.in_flight), strict=True):
            if not isinstance(data, OSError):  # gone since the listing: the shard is simply redone
                self._take(path, data, out)  # a torn write: likewise
        return out

    def _take(self, path: str, body: bytes, out: dict[str, ShardEntry]) -> bool:
        try:
            e = ShardEntry(**json.loads(body))
        except (ValueError, TypeError):
            return False
        out[e.key] = e
        self._bodies[path] = body
        return True

    def _snapshot(self) -> dict[str, bytes]:
        """The bodies in the snapshot the last commit wrote, by their MD5; {} if it is unreadable
        (every entry is then read; the next commit writes a new one)."""
        path = f"{self.dir}/{SNAPSHOT}"
        try:
            data = next(fetch_in_order(self.fs, [path], 1))  # one GET (s3fs's cat_file asks the size first)
            if isinstance(data, OSError):
                raise data
            bodies = [b.encode("latin-1") for b in json.loads(gzip.decompress(data))["bodies"]]
        except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"vitpipe: the ledger's snapshot {path} is unreadable ({type(e).__name__}: {e}); reading "
                  "every entry instead. Nothing is lost: the next commit writes it again", file=sys.stderr)
            return {}
        return {md5(b): b for b in bodies}

    def write_snapshot(self) -> None:
        """Every entry this run read or wrote, in one object (after a commit, when that is every
        entry there is), for the next run's `entries()`. Object stores only: local disk reads an
        entry in ~0.05 ms. Not written is not lost: the next run reads each entry instead."""
        if not self.fs.async_impl:
            return
        # latin-1: each byte one character, so every body comes back byte for byte (and its MD5 with it)
        body = json.dumps({"bodies": [b.decode("latin-1") for b in self._bodies.values()]}).encode()
        try:
            self.fs.pipe_file(f"{self.dir}/{SNAPSHOT}", gzip.compress(body, compresslevel=1))
        except OSError as e:
            print(f"vitpipe: the ledger's snapshot was not written ({type(e).__name__}: {e}); the next run "
                  "reads each entry instead", file=sys.stderr)

    def put(self, entry: ShardEntry) -> None:
        self.put_many([entry])

    def put_soon(self, entry: ShardEntry) -> None:
        """Write this entry without waiting for the store's answer (on an object store; local disk
        writes at once): the driver records each shard as it finishes, and one PUT at a time, 20-50
        ms each on S3, held its loop over the parts' records for as long (a GPU node finishing 35
        shards of 256 images a second would have waited a second a second). At most `in_flight`
        under way; a write that failed raises here, at the next one, or at `flush`."""
        if not self.fs.async_impl:
            self.put(entry)
            return
        while self._writes and (self._writes[0].done() or len(self._writes) >= self.in_flight):
            self._writes.popleft().result()
        path, body = self._path(entry.key), self._body(entry)
        self._writes.append(asyncio.run_coroutine_threadsafe(self.fs._pipe_file(path, body), self.fs.loop))

    def flush(self) -> None:
        """Wait for every put_soon to be written; raises the first that failed."""
        while self._writes:
            self._writes.popleft().result()

    def put_many(self, entries: list[ShardEntry]) -> None:
        """Write these entries; on an object store `in_flight` at once."""
        self.fs.makedirs(self.dir, exist_ok=True)  # local disks need the folder; a no-op on object stores
        self.fs.pipe({self._path(e.key): self._body(e) for e in entries},
                     **({"batch_size": self.in_flight} if self.fs.async_impl else {}))

    def delete_many(self, keys: list[str]) -> None:
        """Remove these shards' entries: ones `entries()` read, which under the lease nothing but
        this run touches since (so no listing to check that they still exist)."""
        paths = [self._path(k) for k in keys]
        remove_files(self.fs, paths)
        for path in paths:
            self._bodies.pop(path, None)

    def _body(self, entry: ShardEntry) -> bytes:
        """The entry as written, remembered for the snapshot."""
        body = self._bodies[self._path(entry.key)] = json.dumps(asdict(entry), indent=1).encode()
        return body

    def _path(self, key: str) -> str:
        return f"{self.dir}/{key}.json"


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease: this one exits before doing any work."""


def boot_id() -> str | None:
    """This boot of this machine (Linux); a lease taken before a reboot belongs to nobody."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_started(pid: int) -> str | None:
    """When a process started (clock ticks since boot, Linux): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_gone(held: dict) -> str | None:
    """Why the run holding a lease is provably gone, or None. Only on this host: its process no
    longer runs (or its pid belongs to another process now), or the machine rebooted since.
    On another host nothing is provable from here, and the lease's expiry stands."""
    if held.get("host") != socket.gethostname() or "pid" not in held:
        return None
    boot = boot_id()
    if held.get("boot_id") and boot and held["boot_id"] != boot:
        return "this machine has rebooted since it took the lease"
    pid = int(held["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} on this host is gone"
    except PermissionError:
        pass  # alive, another user's
    started = held.get("pid_started")
    if started and process_started(pid) not in (None, started):
        return f"its process {pid} on this host is gone (the pid now belongs to another process)"
    return None


class Lease:
    """Exclusive right to write one output, renewed by a background thread while the run lives."""

    def __init__(self, fs, root: str, run_id: str, ttl_s: float = 120.0):
        self.fs, self.path, self.run_id, self.ttl = fs, f"{root.rstrip('/')}/_lease.json", run_id, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None  # whose lease this run took, and why, when it did

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": process_started(os.getpid()), "boot_id": boot_id(),
                           "expires_at": time.time() + self.ttl}).encode()

    def _take_over(self, held: dict) -> None:
        """Another run's lease: refuse while it lives; take it when it expired or its holder is
        provably gone, then make sure this run won the race for it."""
        gone = holder_gone(held)
        if held.get("expires_at", 0) > time.time() and not gone:
            raise LeaseHeld(
                f"output is being written by run {held.get('run_id')} (host {held.get('host')}, pid "
                f"{held.get('pid')}) until at least {time.strftime('%H:%M:%S', time.localtime(held['expires_at']))}; "
                "two runs of one job never write at once. Wait for it, or if it died on another host, rerun after "
                "the lease expires (output.lease_ttl_s)")
        self.took_over = f"took over the lease of run {held.get('run_id')}: {gone or 'it expired without being renewed'}"
        self.fs.rm_file(self.path)
        if not put_if_absent(self.fs, self.path, self._body()):
            raise LeaseHeld("another run took over the expired lease at the same moment; try again")

    def holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.fs.invalidate_cache()
        if not put_if_absent(self.fs, self.path, self._body()):
            held = self.holder() or {}
            # Our own run id: our create succeeded but its answer was lost (a dropped connection) and
            # the client's retry met our own object. It is ours, not another run's.
            if held.get("run_id") != self.run_id:
                self._take_over(held)
        time.sleep(0.05)
        if (self.holder() or {}).get("run_id") != self.run_id:
            raise LeaseHeld("another run took over the lease at the same moment; try again")
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if (self.holder() or {}).get("run_id") == self.run_id:
                self.fs.pipe_file(self.path, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if (self.holder() or {}).get("run_id") == self.run_id:
            self.fs.rm_file(self.path)
