"""The driver's side of the output contract (DESIGN.md): which shards to do, the ledger, the
lease, and the commit: manifest, _SUCCESS last. No row comes here.

The model actors write each part's rows as Parquet files under OUT/_pending/RUN/
(write.py) and send one small record per part (predict.RESULT_SCHEMA). A shard is
finished when all its parts have reported (the last one says how many there are);
it is then recorded in the ledger (ledger.py) as pending, the write under way while the
driver goes on (output.requests_in_flight at most; commit and abort wait for them). So a
run that dies keeps every shard whose entry was written, and the next run redoes at most
the shards that were in flight or being recorded.
A part reported twice (Ray retried it) is kept once: the first record wins, and the
other attempt's files are swept at commit.

Commit, at the end of a run: remove _SUCCESS, move pending files (rows, errors and the page's
samples, OUT/_samples/) into OUT/, drop
the files they replace (and, in mode full, shards no longer listed), sweep files
no ledger entry names, write the ledger's snapshot (one object the next run's start
reads instead of an entry per shard: ledger.py), then the manifest and _SUCCESS last. A reader that
trusts _SUCCESS (or reads the files listed in _manifest.json) never sees a
half-written run; OUT/*.parquet globs never see pending files, a level down.

Modes (output.mode): error refuses an output that holds a finished run; full
reprocesses every shard and replaces the output; incremental processes shards that
are new, changed (ETag), done with another model, or cut short by a fault that was
not in their bytes (gone, access denied), and keeps the rest.
"""

from __future__ import annotations

import json
import platform
import posixpath
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa

from pipeline.config import OutputSpec
from pipeline.ledger import Lease, Ledger, ShardEntry, shard_key
from pipeline.sources import Shard
from pipeline.storage import fast_s3_timestamps, find_files, move_files, sweep
from pipeline.write import pending_dir

# Shards committed together: their files moved (many at once on an object store), then their ledger
# entries written. A run that dies in its commit redoes at most a chunk's worth of shards.
COMMIT_CHUNK = 512


class OutputExistsError(RuntimeError):
    """The output already holds a finished run and the job asked not to replace it."""


@dataclass
class Counts:
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    labeled: int = 0
    correct: int = 0
    duplicates_dropped: int = 0  # rows of parts reported twice (retried work), kept once
    decoded_gpu: int = 0
    fallback_cpu: int = 0
    bad_shards: Counter = field(default_factory=Counter)  # shards cut short, by fault type
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (when, records so far), per part

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    @property
    def records(self) -> int:
        return self.ok + self.error_rows

    def add(self, c: dict) -> None:
        """One part's counts (predict.part_counts)."""
        self.ok += c["ok"]
        self.errors.update(c["errors"])
        self.skipped.update(c["skipped"])
        self.labeled += c["labeled"]
        self.correct += c["correct"]
        self.decoded_gpu += c.get("decoded_gpu", 0)
        self.fallback_cpu += c.get("fallback_cpu", 0)
        self.timeline.append((time.time(), self.records))


@dataclass
class ShardPlan:
    todo: list[Shard]  # to process in this run
    adopted: list[ShardEntry]  # finished by a run that died before committing: reused
    kept: list[ShardEntry]  # committed earlier, unchanged (incremental)


@dataclass
class ShardParts:
    """The parts of one in-flight shard that have reported so far."""

    results: dict[int, dict] = field(default_factory=dict)
    total: int | None = None  # known once the last part has reported
    nodes: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.results) == self.total


class ParquetSink:
    def __init__(self, out: OutputSpec, run_id: str, model_id: str):
        self.out, self.run_id, self.model_id = out, run_id, model_id
        self.fs, root = fsspec.core.url_to_fs(out.uri)
        fast_s3_timestamps(self.fs)  # the output's listings: one LastModified per file
        self.root = root.rstrip("/")
        self.pending_dir = pending_dir(self.root, run_id)
        self.ledger = Ledger(self.fs, self.root, out.requests_in_flight)
        self.lease = Lease(self.fs, self.root, run_id, out.lease_ttl_s)
        self.counts = Counts()
        self.shards: dict[str, Shard] = {}
        self.inflight: dict[str, ShardParts] = {}
        self.done: list[ShardEntry] = []
        self.finished: set[str] = set()
        self.nodes: Counter = Counter()  # parts written per node
        # The ledger's entries and the output's files as begin found them: under the lease nothing
        # but this run changes them, so commit needs neither read again (a GET per shard, a listing)
        self.found: tuple[dict[str, ShardEntry], dict[str, dict]] | None = None

    # --- before any work ---------------------------------------------------------------------

    def finished_run_exists(self) -> bool:
        return self.fs.exists(f"{self.root}/_SUCCESS")

    def check_writable(self) -> None:
        """Refuse early (before any Ray work) when the output holds a finished run and mode is error."""
        self.fs.invalidate_cache()
        if self.out.mode == "error" and self.finished_run_exists():
            prev = self._read_json("_SUCCESS") or {}
            raise OutputExistsError(
                f"output {self.out.uri!r} already holds a finished run (run id {prev.get('run_id', '?')}); "
                "nothing was written. Set output.mode: full (--set output.mode=full) to replace it, "
                "output.mode: incremental to add only new or changed shards, or choose another output.uri")

    def begin(self, shards: list[Shard]) -> ShardPlan:
        """Take the lease, then decide per shard: process, adopt (pending from a dead run) or keep."""
        self.check_writable()
        self.lease.acquire()
        if self.lease.took_over:
            print(f"vitpipe: {self.lease.took_over}", file=sys.stderr, flush=True)
        self.shards = {shard_key(s.uri): s for s in shards}
        self.found = entries, listing = self._find()
        todo, adopted, kept = [], [], []
        for key, s in self.shards.items():
            e = entries.get(key)
            if e and e.matches(s.etag, self.model_id) and not e.retry_anyway:
                if e.state == "pending" and self._files_exist(e, listing):
                    adopted.append(e)
                    continue
                if e.state == "committed" and self.out.mode != "full" and self._files_exist(e, listing):
                    kept.append(e)
                    continue
            todo.append(s)
        self.adopted, self.kept = adopted, kept
        return ShardPlan(todo, adopted, kept)

    @property
    def ledger_read(self) -> dict:
        """How begin read the ledger: its entries, and how many came from the snapshot (ledger.py)."""
        return {"entries": len(self.found[0]) if self.found else 0, "from_snapshot": self.ledger.from_snapshot}

    # --- while parts report ---------------------------------------------------------------------

    def add(self, result: dict) -> None:
        """One part's record (predict.RESULT_SCHEMA, as a dict): count it; finish its shard if complete."""
        key = shard_key(result["shard"])
        counts = json.loads(result["counts"])
        if key in self.finished or result["part"] in self.inflight.get(key, ShardParts()).results:
            self.counts.duplicates_dropped += counts["records"]  # Ray retried it; the first record won
            return
        parts = self.inflight.setdefault(key, ShardParts())
        result = result | {"files": json.loads(result["files"]), "counts": counts}
        parts.results[result["part"]] = result
        parts.nodes.add(result["node"])
        self.nodes[result["node"]] += 1
        if result["last"]:
            parts.total = result["part"] + 1
        if result["fault"]:
            self.counts.bad_shards[result["fault"]] += 1
        self.counts.add(counts)
        if parts.complete:
            self._finish_shard(key)

    def _finish_shard(self, key: str) -> None:
        parts = self.inflight.pop(key)
        self.finished.add(key)
        shard = self.shards[key]
        results = [parts.results[i] for i in range(parts.total)]
        files = [f for r in results for f in r["files"]]
        ok = sum(r["counts"]["ok"] for r in results)
        records = sum(r["counts"]["records"] for r in results)
        skipped = sum(sum(r["counts"]["skipped"].values()) for r in results)
        fault = next((r["fault"] for r in results if r["fault"]), None)
        entry = ShardEntry(shard.uri, shard.etag, shard.size, self.model_id, self.run_id, "pending",
                           records=records, ok=ok, errors=records - ok, skipped=skipped, files=files,
                           finished_at=time.time(), fault=fault)
        self.ledger.put_soon(entry)  # the shard's commit point within the run (written by commit or abort)
        self.done.append(entry)

    # --- the end --------------------------------------------------------------------------------

    def commit(self, manifest: dict) -> dict:
        """Swap this run's shards in, sweep what they replace, write the manifest, _SUCCESS last."""
        self.ledger.flush()
        if self.inflight:
            raise RuntimeError(f"{len(self.inflight)} shard(s) never completed (parts missing); not committing. "
                               "The finished shards are kept for the next run")
        if self.finished_run_exists():
            self.fs.rm_file(f"{self.root}/_SUCCESS")  # readers stop trusting the old state first
        old, listing = self.found or self._find()
        final: dict[str, ShardEntry] = {e.key: e for e in self.kept}
        swapped = self.adopted + self.done
        for start in range(0, len(swapped), COMMIT_CHUNK):  # a chunk's files in place, then its entries
            chunk = swapped[start : start + COMMIT_CHUNK]
            move_files(self.fs, [(f"{self.root}/_pending/{e.run_id}/{f['path']}", f"{self.root}/{f['path']}", f["bytes"])
                                 for e in chunk for f in e.files], self.out.requests_in_flight)
            for entry in chunk:
                entry.state = "committed"
            self.ledger.put_many(chunk)
        final |= {e.key: e for e in swapped}
        if self.out.mode == "full":  # shards no longer listed leave the output
            self.ledger.delete_many(sorted(set(old) - set(final)))
        else:
            for key, e in old.items():
                if key not in final and e.state == "committed" and self._files_exist(e, listing):
                    final[key] = e  # incremental keeps shards it did not list this time
            self.ledger.delete_many(sorted(set(old) - set(final)))
        self.ledger.write_snapshot()  # every entry now: the next run's start reads one object, not one per shard
        # part files no ledger entry names (a dead run's leftovers), and all pending dirs
        sweep(self.fs, self.root, ("part-*.parquet", "errors/part-*.parquet", "_samples/part-*.parquet"),
              {f["path"] for e in final.values() for f in e.files})
        ordered = sorted(final.values(), key=lambda e: e.uri)
        files = [f for e in ordered for f in e.files if f["kind"] != "samples"]
        # the page's sample (samples.py): beside the dataset's files, not among them; each says
        # whether this run made it (an incremental run's page shows its own rows)
        this_run = {e.key for e in swapped}
        samples = [f | {"this_run": e.key in this_run} for e in ordered for f in e.files if f["kind"] == "samples"]
        totals = {"shards": len(final), "records": sum(e.records for e in final.values()),
                  "ok": sum(e.ok for e in final.values()), "errors": sum(e.errors for e in final.values()),
                  "skipped": sum(e.skipped for e in final.values())}
        manifest = manifest | {"files": files, "totals": totals, "samples": samples}
        self._write_json("_manifest.json", manifest)
        self._write_json("_report.json", manifest.get("report", {}))
        self._write_json(f"_runs/{self.run_id}.json", manifest.get("report", {}) | {"status": "succeeded"})
        self._write_json("_SUCCESS", {"run_id": self.run_id, "committed_at": time.time()})
        self.close()
        return manifest

    def abort(self, error: BaseException) -> None:
        """Keep finished shards (pending, for the next run), drop the files of unfinished ones (or of
        every part, when the gate refused the engine before any shard finished), record the
        failure, release the lease."""
        try:
            try:
                self.ledger.flush()  # the finished shards' entries: the next run adopts them
            except Exception as e:
                print(f"vitpipe: a finished shard's ledger entry was not written ({type(e).__name__}: {e}); "
                      "the next run redoes that shard", file=sys.stderr)
            self._drop_unrecorded()
            self._write_json(f"_runs/{self.run_id}.json", {"run_id": self.run_id, "status": "failed",
                                                           "error": f"{type(error).__name__}: {error}",
                                                           "where": traceback.format_exception(error)[-3:],
                                                           "shards_finished": len(self.done),
                                                           "finished_at": time.time()})
        finally:
            self.close()

    def close(self) -> None:
        self.lease.release()

    def _drop_unrecorded(self) -> None:
        """This run's staged files that no ledger entry names: parts of shards that did not finish.
        (A later run's commit would sweep them too; a failed run should not leave them lying.)"""
        keep = {f"{self.pending_dir}/{f['path']}" for e in self.done for f in e.files}
        self.fs.invalidate_cache()
        try:
            staged = self.fs.find(self.pending_dir)
        except FileNotFoundError:
            return
        for path in staged:
            if path.endswith(".parquet") and path not in keep:
                self.fs.rm_file(path)

    def _find(self) -> tuple[dict[str, ShardEntry], dict[str, dict]]:
        """The ledger's entries and the output's files, from one listing of the output."""
        listing = self._listing()
        return self.ledger.entries(listing), listing

    def _listing(self) -> dict[str, dict]:
        """Every file under the output, with its info, from one recursive listing: on S3 one LIST
        per 1,000 keys, not a HEAD per file (a nightly output of 10,000 shards has 10,000+ files)."""
        self.fs.invalidate_cache()
        try:
            return {p.rstrip("/"): i for p, i in find_files(self.fs, self.root, self.out.requests_in_flight).items()}
        except FileNotFoundError:
            return {}

    def _files_exist(self, e: ShardEntry, listing: dict[str, dict]) -> bool:
        base = self.root if e.state == "committed" else f"{self.root}/_pending/{e.run_id}"
        return all(f"{base}/{f['path']}" in listing for f in e.files)

    def _write_json(self, name: str, obj: dict) -> None:
        path = f"{self.root}/{name}"
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, json.dumps(obj, indent=2, default=str).encode())

    def _read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{name}") or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def versions() -> dict[str, str]:
    import ray
    import torch

    from pipeline import __version__

    return {"vitpipe": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}
