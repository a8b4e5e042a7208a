"""List the shards behind a URI and read them into parts of records, with provenance.

A shard is the unit of bookkeeping: one .tar (WebDataset), one .parquet file, or a
group of image files. Listing happens once on the driver. Reading happens on a few
long-lived read actors, which cut each shard into *parts* of at most
`source.records_per_part` records. A part is the unit of work from here on: one
row of the Ray dataset, decoded and run through the model as a whole and written as
one Parquet file by the actor that made its rows (predict.py, write.py). So no stage
ever splits a shard's rows between actors, and the driver only counts parts.

A part's records are an Arrow table (RECORD_SCHEMA) carried in one binary cell as an
Arrow IPC stream (`pack`/`unpack`: one copy, no per-record Python objects). `status`
is "record" (decode it), "error" (failed here: an unsafe tar member, a shard cut
short) or "skipped" (not an image and not part of one; counted, never a row).

A fault in the shard itself (a tar cut in the middle of a member, bytes that are no
tar at all, a file deleted or unreadable) ends the shard, not the job: the records
read before it stay, and one error record names the shard, where it broke and the
fix; the part that carries it is marked `fault` so the ledger keeps the shard as
incomplete (sink.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SourceSpec
from pipeline.decode import is_image_name
from pipeline.labels import classlabel_names, folder_of
from pipeline.storage import fast_s3_timestamps, fetch_in_order, find_files

RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.large_binary()), ("source_uri", pa.string()), ("source_etag", pa.string()),
    ("member", pa.string()), ("label", pa.int64()), ("status", pa.string()), ("error_stage", pa.string()),
    ("error_type", pa.string()), ("error_message", pa.string()),
])
# One row per part: what every stage between the readers and the writers passes on.
PART_SCHEMA = pa.schema([("shard", pa.string()), ("etag", pa.string()), ("part", pa.int32()),
                         ("last", pa.bool_()), ("fault", pa.string()), ("records", pa.large_binary())])
_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",)}


@dataclass(frozen=True)
class Shard:
    uri: str
    etag: str
    size: int
    files: tuple[str, ...] = field(default=())  # images format: the files of this group

    def to_dict(self) -> dict:
        return asdict(self)


class SourceError(ValueError):
    """The source URI cannot be listed or holds nothing to read; raised before Ray starts."""


def list_shards(source: SourceSpec) -> list[Shard]:
    """All shards behind source.uri (one URI or a list), sorted, with an ETag (or size+mtime) for each."""
    shards = {s.uri: s for uri in source.uris for s in _list_one(source, uri)}
    listed = [shards[u] for u in sorted(shards)]
    if source.format == "parquet":  # a column named wrong is the job's mistake: say so before any work
        missing = _missing_columns(listed[0].uri, source)
        if missing:
            raise SourceError(missing)
    if source.only_keys:
        try:
            _key_set(source.only_keys)
        except OSError as e:
            raise SourceError(f"source.only_keys {source.only_keys!r}: cannot read it: {e}") from None
    return listed


def _list_one(source: SourceSpec, uri: str) -> list[Shard]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fast_s3_timestamps(fs)  # a bucket of millions of objects: half the listing's CPU
        if fsspec.core.has_magic(path):
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos = find_files(fs, path, source.requests_in_flight)
        elif fs.exists(path):
            infos = {path: fs.info(path)}
        else:
            raise SourceError(f"source.uri {uri!r}: nothing there (check the path and credentials)")
    except (OSError, PermissionError) as e:
        raise SourceError(f"source.uri {uri!r}: cannot list it: {e}") from None
    files = sorted((p, i) for p, i in infos.items() if i.get("type", "file") == "file")
    if source.format == "images":
        files = [(p, i) for p, i in files if is_image_name(p)]
        shards = _group_images(fs, files, source.images_per_shard)
    else:
        files = [(p, i) for p, i in files if p.endswith(_EXTENSIONS[source.format])]
        shards = [Shard(fs.unstrip_protocol(p), _etag(i), int(i.get("size") or 0)) for p, i in files]
    if not shards:
        want = "image files" if source.format == "images" else " or ".join(_EXTENSIONS[source.format]) + " files"
        raise SourceError(f"source.uri {uri!r}: no {want} found for format {source.format!r}")
    return shards


def _etag(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}-{info.get('mtime') or info.get('LastModified') or info.get('created')}"


def _group_images(fs, files: list[tuple[str, dict]], per_shard: int) -> list[Shard]:
    shards = []
    for start in range(0, len(files), per_shard):
        group = files[start : start + per_shard]
        h = hashlib.sha1("".join(p + _etag(i) for p, i in group).encode()).hexdigest()
        uris = tuple(fs.unstrip_protocol(p) for p, _ in group)
        shards.append(Shard(f"{uris[0]}+{len(uris) - 1}", h, sum(int(i.get("size") or 0) for _, i in group), uris))
    return shards


# --- records and parts ------------------------------------------------------------------------------

class Record(NamedTuple):
    """One record as a format reader yields it (a tuple: no dict per record on the read path)."""

    key: str
    member: str
    image: bytes | None = None
    label: int | None = None
    status: str = "record"
    error_type: str | None = None
    message: str | None = None
    source_uri: str | None = None  # default: the shard's


class Part(NamedTuple):
    """A part of a shard as the read stage hands it on: its records, and whether it is the last."""

    shard: Shard
    index: int
    last: bool
    records: pa.Table  # RECORD_SCHEMA
    fault: str | None = None  # the error type of a fault that ended the shard early


class Columns:
    """Records appended column by column, then turned into one Arrow table per part."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.cols: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.cols["key"])

    def add(self, r: Record) -> None:
        c = self.cols
        c["key"].append(r.key)
        c["image"].append(r.image or b"")
        c["source_uri"].append(r.source_uri or self.shard.uri)
        c["member"].append(r.member)
        c["label"].append(r.label)
        c["status"].append(r.status)
        c["error_stage"].append("read" if r.status != "record" else None)
        c["error_type"].append(r.error_type)
        c["error_message"].append(r.message)

    def table(self) -> pa.Table:
        n = len(self)
        self.cols["source_etag"] = [self.shard.etag] * n
        table = pa.table({name: pa.array(self.cols[name], f.type) for name, f in zip(RECORD_SCHEMA.names, RECORD_SCHEMA,
                                                                                      strict=True)}, schema=RECORD_SCHEMA)
        self.cols = {name: [] for name in RECORD_SCHEMA.names}
        return table


def read_parts(shard: Shard, source: SourceSpec, labels: dict[str, int] | None = None) -> Iterator[Part]:
    """Stream one shard as parts of at most source.records_per_part records (never the whole
    shard in memory); the last part says so. A shard-level fault ends the shard with an error record.
    labels: dataset class names -> model class indices (labels.py), where the dataset names them."""
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "images": _read_images}[source.format]
    only = _key_set(source.only_keys) if source.only_keys else None
    cols, index, fault = Columns(shard), 0, None
    try:
        for rec in reader(shard, source, labels or {}):
            if only is not None and rec.key not in only:
                continue
            if len(cols) >= source.records_per_part:  # a full part, and more to come: hand it on
                yield Part(shard, index, False, cols.table())
                index += 1
            cols.add(rec)
    except Exception as e:  # noqa: BLE001 -- any fault of the shard's bytes or store becomes its error record
        fault = shard_fault(shard, e)
        cols.add(fault)
    yield Part(shard, index, True, cols.table(), fault.error_type if fault else None)


class ShardFault(Exception):
    """Raised by a format reader that knows where in the shard it broke (member, offset)."""

    def __init__(self, kind: str, where: str, cause: BaseException):
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.kind, self.where, self.cause = kind, where, cause


_FIXES = {
    "TruncatedShard": "the file ends in the middle of a member (an upload still in progress, or cut short); "
                      "rewrite the shard: the next incremental run reads it again once its ETag changes",
    "UnreadableShard": "the bytes are not a readable shard of this format; rewrite or remove it (the next "
                       "incremental run reads it again once its ETag changes)",
    "ShardGone": "it was deleted (or moved) after listing; nothing to do if that was intended, else restore "
                 "it and run again",
    "ShardAccessDenied": "the credentials may not read it; grant read access (s3:GetObject) and run again "
                         "(incremental runs retry it)",
    "ShardReadError": "reading failed after retries; check the store and run again (incremental runs retry it)",
}


def shard_fault(shard: Shard, e: BaseException) -> Record:
    """The error record of a shard that could not be read to its end."""
    kind, where, cause = (e.kind, e.where, e.cause) if isinstance(e, ShardFault) else (_fault_kind(e), "", e)
    at = f" at {where}" if where else ""
    message = f"shard {shard.uri}{at}: {type(cause).__name__}: {cause}; {_FIXES[kind]}"
    return Record(f"{shard.uri}#shard", where or "(shard)", status="error", error_type=kind, message=message)


def _fault_kind(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "ShardGone"
    if isinstance(e, PermissionError):
        return "ShardAccessDenied"
    if isinstance(e, tarfile.ReadError | EOFError) and "unexpected end" in str(e).lower():
        return "TruncatedShard"
    if isinstance(e, tarfile.TarError | EOFError | ValueError | pa.ArrowException):
        return "UnreadableShard"
    return "ShardReadError"


def pack(table: pa.Table) -> pa.Buffer:
    """A table as one Arrow IPC stream buffer: how a part's records ride in one cell."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def unpack(cell: pa.Scalar) -> pa.Table:
    """The records of one part (zero-copy from the cell's buffer)."""
    return pa.ipc.open_stream(cell.as_buffer()).read_all()


def part_row(part: Part, records: pa.Table | None = None) -> pa.Table:
    """One PART_SCHEMA row for a part (records: a decoded version of its records, if given)."""
    buf = pack(part.records if records is None else records)
    cell = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(
        pa.array([0, buf.size], pa.int64()).buffers()[1]), buf])
    return pa.table([pa.array([part.shard.uri]), pa.array([part.shard.etag]), pa.array([part.index], pa.int32()),
                     pa.array([part.last]), pa.array([part.fault], pa.string()), cell], schema=PART_SCHEMA)


def parts_of(table: pa.Table) -> Iterator[Part]:
    """The parts in a batch of PART_SCHEMA rows (usually one)."""
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        shard = Shard(row["shard"][0].as_py(), row["etag"][0].as_py(), 0)
        yield Part(shard, row["part"][0].as_py(), row["last"][0].as_py(), unpack(row["records"][0]),
                   row["fault"][0].as_py())


class ShardReader:
    """The Ray read stage: one shard in, its parts out (one PART_SCHEMA row each).

    A class, so that Ray Data runs it on a few long-lived actors rather than as tasks: Ray
    kills a task worker that is idle for a second, and once the model stage holds reads back
    (the in-flight cap), every shard paid a new worker process and its imports. At 20,000
    images that was 336 CPU-seconds of worker start-up, a third of the model's own time.
    It imports only pyarrow and fsspec, never torch (~2 CPU-seconds per worker)."""

    def __init__(self, source: dict, labels: dict[str, int] | None = None, feed: Any = None):
        self.spec, self.labels, self.feed = SourceSpec.model_validate(source), labels, feed

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        if self.feed is not None:  # started before the listing ended: the label map comes with the shards
            import ray

            self.labels, self.feed = ray.get(self.feed.labels.remote()), None
        for row in batch["shard"]:
            shard = Shard(**json.loads(row))
            for part in read_parts(shard, self.spec, self.labels):
                yield part_row(part)


@functools.lru_cache(maxsize=4)
def _key_set(uri: str) -> frozenset[str]:
    with fsspec.open(uri, "r") as f:
        return frozenset(line.strip() for line in f if line.strip())


# --- WebDataset tar shards ---------------------------------------------------------------------

def _split_key(name: str) -> tuple[str, str]:
    """WebDataset: key = path up to the first dot of the basename; the rest is the extension."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def unsafe_reason(m: tarfile.TarInfo) -> str | None:
    if m.issym() or m.islnk():
        return f"link member {m.name!r} -> {m.linkname!r} is not read (links are rejected)"
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        return f"device or fifo member {m.name!r} is not read"
    if m.name.startswith("/") or ".." in m.name.replace("\\", "/").split("/"):
        return f"member path {m.name!r} is absolute or climbs out with '..'"
    return None


def _read_tar(shard: Shard, source: SourceSpec, labels: dict[str, int]) -> Iterator[Record]:
    """Members arrive in tar order; a sample is the run of consecutive members sharing a key."""
    seen: set[str] = set()
    group_key: str | None = None
    group: dict[str, tuple[str, bytes]] = {}
    extra: list[Record] = []
    dup = False
    last = "the first member"

    def flush() -> Iterator[Record]:
        if group_key is not None and not dup:
            yield from _sample_records(group_key, group)
        yield from extra

    fs, path = fsspec.core.url_to_fs(shard.uri)
    with fs.open(path, "rb", block_size=8 << 20) as f, _open_tar(f) as tar:
        members = iter(tar)
        while True:
            m = None
            try:
                m = next(members, None)
                if m is None:
                    break
                data = tar.extractfile(m).read() if m.isfile() and not unsafe_reason(m) else b""
            except (tarfile.TarError, EOFError, OSError) as e:
                # the samples read whole before the fault are records; one cut in its middle is not
                if m is None or _split_key(m.name)[0] != group_key:
                    yield from flush()
                kind = "TruncatedShard" if isinstance(e, tarfile.ReadError | EOFError) else _fault_kind(e)
                raise ShardFault(kind, f"offset {f.tell()}, after {last}", e) from None
            last = f"member {m.name!r}"
            if m.isdir():
                continue
            reason = unsafe_reason(m)
            if reason:
                yield Record(m.name, m.name, status="error", error_type="UnsafeMember",
                             message=f"{reason}; fix the shard or ignore this row")
                continue
            key, ext = _split_key(m.name)
            if key != group_key:
                yield from flush()
                group_key, group, extra = key, {}, []
                dup = key in seen
                seen.add(key)
            if dup:
                # The same key again after its sample ended: report it, never merge it silently.
                if is_image_name(m.name):
                    yield Record(key, m.name, status="error", error_type="DuplicateKey",
                                 message=f"key {key!r} appears twice in the shard; the first sample was kept")
                continue
            if ext in group:
                extra.append(Record(key, m.name, status="error", error_type="DuplicateKey",
                                    message=f"member {m.name!r} repeats {group[ext][0]!r}; the first was kept"))
                continue
            group[ext] = (m.name, data)
        yield from flush()


def _open_tar(f) -> tarfile.TarFile:
    """A tar read as a stream (one pass, no seeks: object stores); not a tar is the shard's fault."""
    try:
        return tarfile.open(fileobj=f, mode="r|*")
    except (tarfile.TarError, EOFError) as e:
        raise ShardFault("UnreadableShard", "offset 0 (not a tar archive, or empty)", e) from None


def _sample_records(key: str, group: dict[str, tuple[str, bytes]]) -> Iterator[Record]:
    images = [ext for ext in group if is_image_name("x." + ext)]
    if not images:
        names = ", ".join(n for n, _ in group.values())
        yield Record(key, names, status="skipped", error_type="NoImageMember",
                     message=f"sample {key!r} has no image member ({names})")
        return
    name, data = group[images[0]]
    yield Record(key, name, data, _label_of(group))
    for ext in images[1:]:
        yield Record(key, group[ext][0], status="error", error_type="DuplicateKey",
                     message=f"sample {key!r} has a second image {group[ext][0]!r}; the first ({name!r}) was used")


def _label_of(group: dict[str, tuple[str, bytes]]) -> int | None:
    try:
        if "cls" in group:
            return int(group["cls"][1].decode().strip())
        if "json" in group:
            meta = json.loads(group["json"][1])
            value = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
            return int(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return None


# --- Parquet with an image-bytes column ----------------------------------------------------------

def _columns(source: SourceSpec) -> list[str]:
    return [c for c in (source.image_column, source.label_column, source.key_column) if c]


def _missing_columns(uri: str, source: SourceSpec) -> str | None:
    """What is wrong with a Parquet shard's columns for this source, or None."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    missing = [c for c in _columns(source) if c not in names]
    if missing:
        return (f"{uri}: column {missing[0]!r} not found (has {names}); "
                "set source.image_column / label_column / key_column")
    return None


def _read_parquet(shard: Shard, source: SourceSpec, labels: dict[str, int]) -> Iterator[Record]:
    """A column of encoded images: plain bytes, or the struct<bytes, path> of Hugging Face `datasets`
    (bytes inline, or a path relative to the Parquet file where bytes are null). A ClassLabel's
    integers are mapped through its names when the driver found them (labels.py)."""
    fs, path = fsspec.core.url_to_fs(shard.uri)
    base = posixpath.basename(path).removesuffix(".parquet")
    columns = _columns(source)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ShardFault("UnreadableShard", f"its schema ({pf.schema_arrow.names})",
                             KeyError(f"column {missing[0]!r} not found"))
        names = classlabel_names(pf.schema_arrow, source.label_column) if source.label_column and labels else None
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            cells = batch.column(source.image_column).to_pylist()
            images = _images_of(cells, fs, path, source.requests_in_flight)
            keys = batch.column(source.key_column).to_pylist() if source.key_column else None
            ys = batch.column(source.label_column).to_pylist() if source.label_column else None
            for i, (cell, data) in enumerate(zip(cells, images, strict=True)):
                key = str(keys[i]) if keys else f"{base}/{row}"
                y = ys[i] if ys else None
                if y is not None and names:  # a ClassLabel: its name, then the model's index for it
                    y = labels.get(names[y]) if 0 <= y < len(names) else None
                member = (isinstance(cell, dict) and cell.get("path")) or f"row {row}"  # datasets' Image: its path
                if isinstance(data, OSError):
                    yield Record(key, member, None, y, status="error", error_type="ReadError",
                                 message=f"{shard.uri} row {row}: image path {cell['path']!r}: {data}")
                else:
                    yield Record(key, member, data, None if y is None else int(y))
                row += 1


def _images_of(cells: list, fs, parquet_path: str, in_flight: int) -> list[bytes | OSError | None]:
    """A batch of image cells' bytes: plain bytes, or datasets' Image feature {bytes, path}, whose
    bytes may be null with the image in a file it names (an OSError where that file cannot be read).
    Those files are fetched like an image folder's, `in_flight` GETs under way (fetch_in_order):
    one at a time, a shard of them on an object store mostly waited."""
    out = [cell.get("bytes") if isinstance(cell, dict) else cell for cell in cells]
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}  # almost always one: the Parquet file's
    for i, cell in enumerate(cells):
        if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path"):
            try:
                other, p = _image_beside(fs, parquet_path, cell["path"])
            except (ValueError, ImportError) as e:  # an unknown protocol, or its package not installed: this row's
                out[i] = OSError(f"no filesystem for it ({e})")
                continue
            by_fs.setdefault(id(other), (other, []))[1].append((i, p))
    for other, wanted in by_fs.values():
        fetched = fetch_in_order(other, [p for _, p in wanted], in_flight)
        for (i, _), data in zip(wanted, fetched, strict=True):
            out[i] = data
    return out


def _image_beside(fs, parquet_path: str, image_path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Where an image a `datasets` row names by path lies: a URI or absolute path as is, else beside the file."""
    if "://" in image_path:
        return fsspec.core.url_to_fs(image_path)
    if not image_path.startswith("/"):
        image_path = posixpath.join(posixpath.dirname(parquet_path), image_path)
    return fs, image_path


# --- A folder of image files -----------------------------------------------------------------------

def source_roots(source: SourceSpec) -> list[str]:
    """The paths of the source's URIs: what an image file's key is relative to."""
    return [fsspec.core.url_to_fs(u)[1].rstrip("/") for u in source.uris]


def relative_path(path: str, roots: list[str]) -> str:
    """A file's path under the source root that lists it (its record key, less the extension)."""
    root = next((r for r in roots if path.startswith(r + "/")), None)
    return path[len(root) + 1 :] if root else posixpath.basename(path)


def _read_images(shard: Shard, source: SourceSpec, labels: dict[str, int]) -> Iterator[Record]:
    roots = source_roots(source)
    fs = fsspec.core.url_to_fs(shard.files[0])[0]  # a shard's files were listed under one URI: one filesystem
    only = _key_set(source.only_keys) if source.only_keys else None
    files = []  # (uri, path, path under its root, key)
    for uri in shard.files:
        path = fsspec.core.strip_protocol(uri)
        rel = relative_path(path, roots)
        key = rel.rsplit(".", 1)[0]
        if only is None or key in only:  # a retry (`vitpipe errors --retry-spec`) fetches only its keys' files
            files.append((uri, path, rel, key))
    fetched = fetch_in_order(fs, [path for _, path, _, _ in files], source.requests_in_flight)
    for (uri, _, rel, key), data in zip(files, fetched, strict=True):
        label = labels.get(folder_of(rel) or "") if source.label_from == "folder" else None
        if isinstance(data, OSError):
            yield Record(key, rel, None, label, status="error", error_type="ReadError", message=f"{uri}: {data}",
                         source_uri=uri)
        else:
            yield Record(key, rel, data, label, source_uri=uri)
