"""Parquet out, with the output contract of DESIGN.md: parts, errors, manifest, _SUCCESS last.

Why staging: object stores have no atomic directory rename. Parts are written under
OUT/_staging/RUN_ID/, and only at commit do they move next to the manifest. A reader
that trusts _SUCCESS (or lists files from _manifest.json) never sees a half-written
run; a reader that globs OUT/*.parquet never sees staged files, which live a level down.

Rerunning into an output that holds a finished run: `output.mode: error` (default)
refuses before any work; `overwrite` removes _SUCCESS first, then the old files,
then moves the new ones in and writes _SUCCESS again.
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
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import OutputSpec

OK_DROP = ("status", "error_stage", "error_type", "error_message")
ERROR_COLUMNS = ("key", "source_uri", "source_etag", "member", "label", "error_stage", "error_type", "error_message")


class OutputExistsError(RuntimeError):
    """The output already holds a finished run and the job asked not to replace it."""


@dataclass
class FileEntry:
    path: str  # relative to the output directory
    kind: str  # "ok" or "errors"
    rows: int
    bytes: int
    sha256: str


class RollingWriter:
    """Writes row groups into local temp files, uploads each full file to staging."""

    def __init__(self, fs, staging: str, kind: str, schema: pa.Schema, out: OutputSpec, tmpdir: str):
        self.fs, self.staging, self.kind, self.schema, self.out, self.tmpdir = fs, staging, kind, schema, out, tmpdir
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.file_rows = 0
        self.local = ""
        self.files: list[FileEntry] = []

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.out.row_group_rows:
            self._flush_row_group(self.out.row_group_rows)

    def close(self) -> list[FileEntry]:
        while self.pending_rows:
            self._flush_row_group(self.pending_rows)
        self._close_file()
        return self.files

    def _flush_row_group(self, rows: int) -> None:
        rows = min(rows, self.out.rows_per_file - self.file_rows)
        table = pa.concat_tables(self.pending).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        if self.writer is None:
            self.local = os.path.join(self.tmpdir, f"{self.kind}-{len(self.files):05d}.parquet")
            self.writer = pq.ParquetWriter(self.local, self.schema, compression="zstd")
        self.writer.write_table(head, row_group_size=rows)
        self.file_rows += rows
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self.file_rows >= self.out.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        name = f"part-{len(self.files):05d}.parquet"
        rel = name if self.kind == "ok" else f"errors/{name}"
        dest = posixpath.join(self.staging, rel)
        self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)  # local filesystems need the folder
        self.fs.put_file(self.local, dest)
        self.files.append(FileEntry(rel, self.kind, self.file_rows, os.path.getsize(self.local), _sha256(self.local)))
        os.remove(self.local)
        self.writer, self.file_rows = None, 0


@dataclass
class Counts:
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    labeled: int = 0
    correct: int = 0

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    @property
    def records(self) -> int:
        return self.ok + self.error_rows


class ParquetSink:
    def __init__(self, out: OutputSpec, run_id: str, schema: pa.Schema, metadata: dict[str, str]):
        self.out, self.run_id = out, run_id
        self.fs, self.root = fsspec.core.url_to_fs(out.uri)
        self.root = self.root.rstrip("/")
        self.staging = f"{self.root}/_staging/{run_id}"
        meta = {f"vitpipe.{k}": v for k, v in metadata.items()}
        self.ok_schema = _drop(schema, OK_DROP).with_metadata(meta)
        self.err_schema = pa.schema([schema.field(c) for c in ERROR_COLUMNS]).with_metadata(meta)
        self.counts = Counts()
        self._tmp = tempfile.mkdtemp(prefix="vitpipe-sink-")
        self.ok_writer = RollingWriter(self.fs, self.staging, "ok", self.ok_schema, out, self._tmp)
        self.err_writer = RollingWriter(self.fs, self.staging, "errors", self.err_schema, out, self._tmp)

    def check_writable(self) -> None:
        """Refuse early (before any Ray work) when the output holds a finished run and mode is error."""
        if self.out.mode == "error" and self._finished_run_exists():
            prev = self._read_json("_SUCCESS") or {}
            raise OutputExistsError(
                f"output {self.out.uri!r} already holds a finished run (run id {prev.get('run_id', '?')}); "
                "nothing was written. Set output.mode: overwrite (or --set output.mode=overwrite) to replace it, "
                "or choose another output.uri")

    def write(self, table: pa.Table) -> None:
        status = table.column("status")
        self._count(table, status)
        self.ok_writer.write(table.filter(pc.equal(status, "ok")).select(self.ok_schema.names))
        self.err_writer.write(table.filter(pc.equal(status, "error")).select(list(ERROR_COLUMNS)))

    def commit(self, manifest: dict) -> dict:
        """Close files, swap them in, write the manifest, then _SUCCESS last."""
        files = self.ok_writer.close() + self.err_writer.close()
        if self._finished_run_exists():
            self.check_writable()
            self.fs.rm_file(f"{self.root}/_SUCCESS")  # readers stop trusting the old run first
        self._remove_old_outputs()
        self.fs.makedirs(f"{self.root}/errors", exist_ok=True)
        for entry in files:
            final = _final_name(entry.path, self.run_id)
            self.fs.mv(f"{self.staging}/{entry.path}", f"{self.root}/{final}")
            entry.path = final
        manifest = manifest | {"files": [vars(f) for f in files]}
        self._write_json("_manifest.json", manifest)
        self._write_json("_report.json", manifest.get("report", {}))
        self._write_json("_SUCCESS", {"run_id": self.run_id, "committed_at": time.time()})
        self._cleanup()
        return manifest

    def abort(self) -> None:
        """Drop what this run staged; the output stays as it was."""
        self._cleanup()

    def _count(self, table: pa.Table, status: pa.ChunkedArray) -> None:
        c = self.counts
        statuses = status.to_pylist()
        types = table.column("error_type").to_pylist()
        for s, t in zip(statuses, types, strict=True):
            if s == "ok":
                c.ok += 1
            elif s == "error":
                c.errors[t] += 1
            else:
                c.skipped[t] += 1
        if "topk_ids" in table.column_names:
            ok = table.filter(pc.and_(pc.equal(status, "ok"), pc.is_valid(table.column("label"))))
            if ok.num_rows:
                top1 = pc.list_element(ok.column("topk_ids"), 0).cast(pa.int64())
                c.labeled += ok.num_rows
                c.correct += pc.sum(pc.equal(top1, ok.column("label"))).as_py() or 0

    def _finished_run_exists(self) -> bool:
        return self.fs.exists(f"{self.root}/_SUCCESS") or self.fs.exists(f"{self.root}/_manifest.json")

    def _remove_old_outputs(self) -> None:
        for pattern in ("part-*.parquet", "errors/part-*.parquet", "_manifest.json", "_report.json"):
            for p in self.fs.glob(f"{self.root}/{pattern}"):
                self.fs.rm_file(p)

    def _write_json(self, name: str, obj: dict) -> None:
        with self.fs.open(f"{self.root}/{name}", "w") as f:
            json.dump(obj, f, indent=2, default=str)

    def _read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{name}") or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        parent = f"{self.root}/_staging"
        try:
            if self.fs.exists(parent) and not self.fs.ls(parent, detail=False):
                self.fs.rm(parent, recursive=True)  # stores with real directories keep empty ones
        except OSError:
            pass  # another run's staging may appear meanwhile; leaving the empty parent is harmless
        self.fs.invalidate_cache()


def _final_name(rel: str, run_id: str) -> str:
    """part-00000.parquet -> part-<run>-00000.parquet, so runs never overwrite each other's files."""
    d, base = posixpath.split(rel)
    return posixpath.join(d, base.replace("part-", f"part-{run_id.rsplit('-', 1)[-1]}-", 1))


def _drop(schema: pa.Schema, names: tuple[str, ...]) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in names])


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
