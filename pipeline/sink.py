"""Parquet out, with the output contract of DESIGN.md: parts, errors, ledger, manifest, _SUCCESS last.

Rows are grouped per shard. A shard is finished when all the rows its read task
announced (a "shard_end" marker carries the count) have arrived; its files are
then uploaded under OUT/_pending/RUN/ and recorded in the ledger (ledger.py). So a
run that dies keeps every finished shard, and the next run redoes at most the
shards that were in flight.

Commit, at the end of a run: remove _SUCCESS, move pending files into OUT/, drop
the files they replace (and, in mode full, shards no longer listed), sweep files
no ledger entry names, then write the manifest and _SUCCESS last. A reader that
trusts _SUCCESS (or reads the files listed in _manifest.json) never sees a
half-written run; OUT/*.parquet globs never see pending files, a level down.

Modes (output.mode): error refuses an output that holds a finished run; full
reprocesses every shard and replaces the output; incremental processes shards that
are new, changed (ETag) or were done with another model, and keeps the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import shutil
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import OutputSpec
from pipeline.ledger import Lease, Ledger, ShardEntry, shard_key
from pipeline.sources import Shard
from pipeline.storage import remove_tree

INTERNAL = ("status", "error_stage", "error_type", "error_message", "shard", "ordinal")
ERROR_COLUMNS = ("key", "source_uri", "source_etag", "member", "label", "error_stage", "error_type", "error_message")


class OutputExistsError(RuntimeError):
    """The output already holds a finished run and the job asked not to replace it."""


@dataclass
class Counts:
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    labeled: int = 0
    correct: int = 0
    duplicates_dropped: int = 0

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    @property
    def records(self) -> int:
        return self.ok + self.error_rows


@dataclass
class ShardPlan:
    todo: list[Shard]  # to process in this run
    adopted: list[ShardEntry]  # finished by a run that died before committing: reused
    kept: list[ShardEntry]  # committed earlier, unchanged (incremental)


class ShardBuffer:
    """One in-flight shard: rows stream into local Parquet files until the shard is complete."""

    def __init__(self, key: str, tmpdir: str, ok_schema: pa.Schema, err_schema: pa.Schema, row_group: int):
        self.key, self.row_group = key, row_group
        self.expected: int | None = None
        self.seen: set[int] = set()
        self.rows = 0
        self.parts = {"ok": (ok_schema, os.path.join(tmpdir, f"{key}-ok.parquet")),
                      "errors": (err_schema, os.path.join(tmpdir, f"{key}-errors.parquet"))}
        self.pending: dict[str, list[pa.Table]] = {"ok": [], "errors": []}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.written: dict[str, int] = {"ok": 0, "errors": 0}

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.rows >= self.expected

    def add(self, kind: str, table: pa.Table) -> None:
        if table.num_rows:
            self.pending[kind].append(table)
            if sum(t.num_rows for t in self.pending[kind]) >= self.row_group:
                self._flush(kind)

    def _flush(self, kind: str) -> None:
        if not self.pending[kind]:
            return
        schema, path = self.parts[kind]
        table = pa.concat_tables(self.pending[kind])
        if kind not in self.writers:
            self.writers[kind] = pq.ParquetWriter(path, schema, compression="zstd")
        self.writers[kind].write_table(table, row_group_size=max(table.num_rows, 1))
        self.written[kind] += table.num_rows
        self.pending[kind] = []

    def close(self) -> dict[str, tuple[str, int]]:
        """Finish the local files; {kind: (local path, rows)} for the kinds that have rows."""
        out = {}
        for kind in ("ok", "errors"):
            self._flush(kind)
            if kind in self.writers:
                self.writers[kind].close()
                out[kind] = (self.parts[kind][1], self.written[kind])
        return out


class ParquetSink:
    def __init__(self, out: OutputSpec, run_id: str, schema: pa.Schema, metadata: dict[str, str], model_id: str):
        self.out, self.run_id, self.model_id = out, run_id, model_id
        self.fs, root = fsspec.core.url_to_fs(out.uri)
        self.root = root.rstrip("/")
        self.pending_dir = f"{self.root}/_pending/{run_id}"
        meta = {f"vitpipe.{k}": v for k, v in metadata.items()}
        self.ok_schema = pa.schema([f for f in schema if f.name not in INTERNAL]).with_metadata(meta)
        self.err_schema = pa.schema([schema.field(c) for c in ERROR_COLUMNS]).with_metadata(meta)
        self.ledger = Ledger(self.fs, self.root)
        self.lease = Lease(self.fs, self.root, run_id, out.lease_ttl_s)
        self.counts = Counts()
        self.shards: dict[str, Shard] = {}
        self.buffers: dict[str, ShardBuffer] = {}
        self.done: list[ShardEntry] = []
        self._tmp = tempfile.mkdtemp(prefix="vitpipe-sink-")

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
        self.shards = {shard_key(s.uri): s for s in shards}
        entries = self.ledger.entries()
        listing = self._listing()
        todo, adopted, kept = [], [], []
        for key, s in self.shards.items():
            e = entries.get(key)
            if e and e.matches(s.etag, self.model_id):
                if e.state == "pending" and self._files_exist(e, listing):
                    adopted.append(e)
                    continue
                if e.state == "committed" and self.out.mode != "full" and self._files_exist(e, listing):
                    kept.append(e)
                    continue
            todo.append(s)
        self.adopted, self.kept = adopted, kept
        return ShardPlan(todo, adopted, kept)

    # --- while rows arrive -------------------------------------------------------------------

    def write(self, table: pa.Table) -> None:
        status = table.column("status")
        marker = pc.equal(status, "shard_end")
        for row in table.filter(marker).select(["shard", "label"]).to_pylist():
            self._buffer(row["shard"]).expected = row["label"]
        rows = table.filter(pc.invert(marker))
        for shard_uri in pc.unique(rows.column("shard")).to_pylist():
            part = rows.filter(pc.equal(rows.column("shard"), shard_uri))
            part = self._drop_duplicates(self._buffer(shard_uri), part)
            self._count(part)
            buf = self._buffer(shard_uri)
            buf.rows += part.num_rows
            st = part.column("status")
            buf.add("ok", part.filter(pc.equal(st, "ok")).select(self.ok_schema.names))
            buf.add("errors", part.filter(pc.equal(st, "error")).select(list(ERROR_COLUMNS)))
        for key in [k for k, b in self.buffers.items() if b.complete]:
            self._finish_shard(key)

    def _buffer(self, shard_uri: str) -> ShardBuffer:
        key = shard_key(shard_uri)
        if key not in self.buffers:
            self.buffers[key] = ShardBuffer(key, self._tmp, self.ok_schema, self.err_schema, self.out.row_group_rows)
        return self.buffers[key]

    def _drop_duplicates(self, buf: ShardBuffer, part: pa.Table) -> pa.Table:
        """A row delivered twice (a retried task) is kept once: its identity is its ordinal in the shard."""
        ids = part.column("ordinal").to_pylist()
        keep = []
        for i, rid in enumerate(ids):
            if rid in buf.seen:
                self.counts.duplicates_dropped += 1
            else:
                buf.seen.add(rid)
                keep.append(i)
        return part if len(keep) == part.num_rows else part.take(keep)

    def _finish_shard(self, key: str) -> None:
        buf = self.buffers.pop(key)
        shard = self.shards[key]
        files = []
        for kind, (local, rows) in buf.close().items():
            rel = f"part-{key}-{self.run_id.rsplit('-', 1)[-1]}.parquet"
            rel = rel if kind == "ok" else f"errors/{rel}"
            dest = f"{self.pending_dir}/{rel}"
            self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            self.fs.put_file(local, dest)
            files.append({"path": rel, "kind": kind, "rows": rows, "bytes": os.path.getsize(local),
                          "sha256": _sha256(local)})
            os.remove(local)
        ok = next((f["rows"] for f in files if f["kind"] == "ok"), 0)
        err = next((f["rows"] for f in files if f["kind"] == "errors"), 0)
        entry = ShardEntry(shard.uri, shard.etag, shard.size, self.model_id, self.run_id, "pending",
                           records=ok + err, ok=ok, errors=err, skipped=buf.rows - ok - err, files=files,
                           finished_at=time.time())
        self.ledger.put(entry)  # the shard's commit point within the run
        self.done.append(entry)

    def _count(self, table: pa.Table) -> None:
        c = self.counts
        for s, t in zip(table.column("status").to_pylist(), table.column("error_type").to_pylist(), strict=True):
            if s == "ok":
                c.ok += 1
            elif s == "error":
                c.errors[t] += 1
            else:
                c.skipped[t] += 1
        if "topk_ids" in table.column_names:
            ok = table.filter(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("label"))))
            if ok.num_rows:
                top1 = pc.list_element(ok.column("topk_ids"), 0).cast(pa.int64())
                c.labeled += ok.num_rows
                c.correct += pc.sum(pc.equal(top1, ok.column("label"))).as_py() or 0

    # --- the end --------------------------------------------------------------------------------

    def commit(self, manifest: dict) -> dict:
        """Swap this run's shards in, sweep what they replace, write the manifest, _SUCCESS last."""
        if self.buffers:
            raise RuntimeError(f"{len(self.buffers)} shard(s) never completed (rows missing); not committing. "
                               "The finished shards are kept for the next run")
        if self.finished_run_exists():
            self.fs.rm_file(f"{self.root}/_SUCCESS")  # readers stop trusting the old state first
        old = self.ledger.entries()
        final: dict[str, ShardEntry] = {e.key: e for e in self.kept}
        for entry in self.adopted + self.done:
            pending_root = f"{self.root}/_pending/{entry.run_id}"
            for f in entry.files:
                src, dest = f"{pending_root}/{f['path']}", f"{self.root}/{f['path']}"
                self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
                self.fs.mv(src, dest)
            entry.state = "committed"
            self.ledger.put(entry)
            final[entry.key] = entry
        if self.out.mode == "full":  # shards no longer listed leave the output
            for key in set(old) - set(final):
                self.ledger.delete(key)
        else:
            listing = self._listing()
            for key, e in old.items():
                if key not in final and e.state == "committed" and self._files_exist(e, listing):
                    final[key] = e  # incremental keeps shards it did not list this time
                elif key not in final:
                    self.ledger.delete(key)
        self._sweep({f["path"] for e in final.values() for f in e.files})
        files = [f for e in sorted(final.values(), key=lambda e: e.uri) for f in e.files]
        totals = {"shards": len(final), "records": sum(e.records for e in final.values()),
                  "ok": sum(e.ok for e in final.values()), "errors": sum(e.errors for e in final.values()),
                  "skipped": sum(e.skipped for e in final.values())}
        manifest = manifest | {"files": files, "totals": totals}
        self._write_json("_manifest.json", manifest)
        self._write_json("_report.json", manifest.get("report", {}))
        self._write_json(f"_runs/{self.run_id}.json", manifest.get("report", {}) | {"status": "succeeded"})
        self._write_json("_SUCCESS", {"run_id": self.run_id, "committed_at": time.time()})
        self.close()
        return manifest

    def abort(self, error: BaseException) -> None:
        """Keep finished shards (pending, for the next run), record the failure, release the lease."""
        try:
            self._write_json(f"_runs/{self.run_id}.json", {"run_id": self.run_id, "status": "failed",
                                                           "error": f"{type(error).__name__}: {error}",
                                                           "where": traceback.format_exception(error)[-3:],
                                                           "shards_finished": len(self.done),
                                                           "finished_at": time.time()})
        finally:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.lease.release()

    def _sweep(self, keep: set[str]) -> None:
        """Delete part files no ledger entry names (a dead run's leftovers), and all pending dirs."""
        self.fs.invalidate_cache()
        for pattern in ("part-*.parquet", "errors/part-*.parquet"):
            for p in self.fs.glob(f"{self.root}/{pattern}"):
                if p.removeprefix(self.root + "/") not in keep:  # (not relpath: it needs a cwd)
                    self.fs.rm_file(p)
        if self.fs.exists(f"{self.root}/_pending"):
            remove_tree(self.fs, f"{self.root}/_pending")
        self.fs.invalidate_cache()

    def _listing(self) -> set[str]:
        """Every file under the output from one recursive listing: on S3 one LIST per 1,000 keys,
        not a HEAD per file (a nightly output of 10,000 shards has 10,000+ files)."""
        self.fs.invalidate_cache()
        try:
            return {p.rstrip("/") for p in self.fs.find(self.root)}
        except FileNotFoundError:
            return set()

    def _files_exist(self, e: ShardEntry, listing: set[str]) -> bool:
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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import ray
    import torch

    from pipeline import __version__

    return {"vitpipe": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}
