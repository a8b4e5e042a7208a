"""The write stage: a part's rows -> Parquet files staged under the output, written by the
model actor that made the rows. No row passes through the driver: it receives only what
`PartWriter.write` returns (paths, row counts, bytes, sha256) and commits (sink.py).

Each part is one ok file, one errors file if any record failed, and the page's sample of its
rows (samples.py) where the model actor made one:

    OUT/_pending/RUN/part-SHARDKEY-PART-ATTEMPT.parquet
    OUT/_pending/RUN/errors/part-SHARDKEY-PART-ATTEMPT.parquet
    OUT/_pending/RUN/_samples/part-SHARDKEY-PART-ATTEMPT.parquet

ATTEMPT is new for every write: when Ray retries a part (a lost actor or node), the retry
writes new files beside any the first attempt left, and the driver keeps whichever record
reaches it first; commit moves only the files the ledger names and sweeps the rest. A file
is written in one piece (a single PUT on object stores), from memory: a part's rows are a few
MB (1,024 ViT-B embeddings are 3 MB), far from the 128 MB where streaming would matter.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import shard_key

FOLDERS = {"ok": "", "errors": "errors/", "samples": "_samples/"}  # where each kind of file goes, under OUT/
ERROR_COLUMNS = ("key", "source_uri", "source_etag", "member", "label", "error_stage", "error_type", "error_message")


def error_schema() -> pa.Schema:
    return pa.schema([(c, pa.int64() if c == "label" else pa.string()) for c in ERROR_COLUMNS])


def pending_dir(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/_pending/{run_id}"


class PartWriter:
    """Writes a part's ok rows and error rows as Parquet files into this run's staging folder."""

    def __init__(self, uri: str, run_id: str, metadata: dict[str, str], row_group_rows: int):
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.dir = pending_dir(root, run_id)
        self.meta = {f"vitpipe.{k}": v for k, v in metadata.items()}
        self.row_group_rows = row_group_rows
        self._made: set[str] = set()

    def write(self, shard_uri: str, part: int, tables: dict[str, pa.Table]) -> list[dict]:
        """{"ok": rows, "errors": rows, "samples": rows?} -> one entry per file written: path
        (relative to the output), kind, rows, bytes, sha256. Empty tables write no file."""
        attempt = uuid.uuid4().hex[:8]
        files = []
        for kind, table in tables.items():
            if table.num_rows == 0:
                continue
            name = f"part-{shard_key(shard_uri)}-{part:04d}-{attempt}.parquet"
            rel = FOLDERS[kind] + name
            data = self._encode(table)
            self._put(f"{self.dir}/{rel}", data)
            files.append({"path": rel, "kind": kind, "rows": table.num_rows, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
        return files

    def _encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        own = {k: v for k, v in (table.schema.metadata or {}).items() if k.startswith(b"vitpipe.")}  # samples' stats
        table = table.replace_schema_metadata(own | self.meta)
        pq.write_table(table, sink, compression="zstd", row_group_size=self.row_group_rows)
        return sink.getvalue().to_pybytes()

    def _put(self, path: str, data: bytes) -> None:
        folder = posixpath.dirname(path)
        if folder not in self._made:  # local disks need the folder; a no-op on object stores
            self.fs.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        self.fs.pipe_file(path, data)
