"""List the shards behind a URI and read them into records, with provenance.

A shard is the unit of work and of bookkeeping: one .tar (WebDataset), one
.parquet file, or a group of image files. Listing happens once on the driver;
reading happens in Ray tasks, streaming, one chunk of records at a time.

Every record is a dict with the columns in RECORD_COLUMNS. `status` is "record"
(decode it), "error" (already failed here, e.g. an unsafe tar member) or
"skipped" (not an image and not part of one; counted, never written as a row).
After a shard's last record comes one "shard_end" marker whose `label` is the
number of rows the shard produced: the sink knows a shard is complete when it has
seen that many (sink.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SourceSpec
from pipeline.decode import is_image_name

RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("source_uri", pa.string()), ("source_etag", pa.string()),
    ("member", pa.string()), ("label", pa.int64()), ("status", pa.string()), ("error_stage", pa.string()),
    ("error_type", pa.string()), ("error_message", pa.string()), ("shard", pa.string()),
    ("ordinal", pa.int64()),
])
RECORD_COLUMNS = tuple(RECORD_SCHEMA.names)
CHUNK = 64  # records per block yielded by a read actor
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
    uris = source.uri if isinstance(source.uri, list) else [source.uri]
    shards = {s.uri: s for uri in uris for s in _list_one(source, uri)}
    return [shards[u] for u in sorted(shards)]


def _list_one(source: SourceSpec, uri: str) -> list[Shard]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if fsspec.core.has_magic(path):
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
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


def read_shard(shard: Shard, source: SourceSpec, chunk: int = CHUNK) -> Iterator[list[dict]]:
    """Stream one shard as chunks of record dicts (never the whole shard in memory)."""
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "images": _read_images}[source.format]
    only = _key_set(source.only_keys) if source.only_keys else None
    buf: list[dict] = []
    n = 0
    for rec in reader(shard, source):
        if only is not None and rec["key"] not in only:
            continue
        rec["ordinal"] = n  # the row's identity within its shard (deduplication of retried work)
        buf.append(rec)
        n += 1
        if len(buf) >= chunk:
            yield buf
            buf = []
    buf.append(record(shard, shard.uri, "", None, label=n, status="shard_end"))
    yield buf


class ShardReader:
    """The Ray read stage: one shard in, a stream of record blocks out.

    A class, so that Ray Data runs it on a few long-lived actors rather than as tasks: Ray
    kills a task worker that is idle for a second, and once the model stage holds reads back
    (the in-flight cap), every shard paid a new worker process and its imports. At 20,000
    images that was 336 CPU-seconds of worker start-up, a third of the model's own time.
    It lives here, not in runner.py, so that a read worker imports only pyarrow and fsspec,
    never torch (~2 CPU-seconds per worker)."""

    def __init__(self, source: dict):
        self.spec = SourceSpec.model_validate(source)

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for row in batch["shard"]:
            shard = Shard(**json.loads(row))
            for chunk in read_shard(shard, self.spec):
                yield pa.Table.from_pylist(chunk, schema=RECORD_SCHEMA)


@functools.lru_cache(maxsize=4)
def _key_set(uri: str) -> frozenset[str]:
    with fsspec.open(uri, "r") as f:
        return frozenset(line.strip() for line in f if line.strip())


def record(shard: Shard, key: str, member: str, image: bytes | None, label: int | None = None,
           status: str = "record", error_type: str | None = None, message: str | None = None,
           source_uri: str | None = None) -> dict:
    return {"key": key, "image": image or b"", "source_uri": source_uri or shard.uri, "source_etag": shard.etag,
            "member": member, "label": label, "status": status,
            "error_stage": "read" if status != "record" else None,
            "error_type": error_type, "error_message": message, "shard": shard.uri, "ordinal": -1}


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


def _read_tar(shard: Shard, source: SourceSpec) -> Iterator[dict]:
    """Members arrive in tar order; a sample is the run of consecutive members sharing a key."""
    seen: set[str] = set()
    group_key: str | None = None
    group: dict[str, tuple[str, bytes]] = {}
    extra: list[dict] = []
    dup = False

    def flush() -> Iterator[dict]:
        if group_key is not None and not dup:
            yield from _sample_records(shard, group_key, group)
        yield from extra

    fs, path = fsspec.core.url_to_fs(shard.uri)
    with fs.open(path, "rb", block_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isdir():
                continue
            reason = unsafe_reason(m)
            if reason:
                yield record(shard, m.name, m.name, None, status="error", error_type="UnsafeMember",
                             message=f"{reason}; fix the shard or ignore this row")
                continue
            key, ext = _split_key(m.name)
            data = tar.extractfile(m).read() if m.isfile() else b""
            if key != group_key:
                yield from flush()
                group_key, group, extra = key, {}, []
                dup = key in seen
                seen.add(key)
            if dup:
                # The same key again after its sample ended: report it, never merge it silently.
                if is_image_name(m.name):
                    yield record(shard, key, m.name, None, status="error", error_type="DuplicateKey",
                                 message=f"key {key!r} appears twice in the shard; the first sample was kept")
                continue
            if ext in group:
                extra.append(record(shard, key, m.name, None, status="error", error_type="DuplicateKey",
                                    message=f"member {m.name!r} repeats {group[ext][0]!r}; the first was kept"))
                continue
            group[ext] = (m.name, data)
        yield from flush()


def _sample_records(shard: Shard, key: str, group: dict[str, tuple[str, bytes]]) -> Iterator[dict]:
    images = [ext for ext in group if is_image_name("x." + ext)]
    if not images:
        names = ", ".join(n for n, _ in group.values())
        yield record(shard, key, names, None, status="skipped", error_type="NoImageMember",
                     message=f"sample {key!r} has no image member ({names})")
        return
    name, data = group[images[0]]
    yield record(shard, key, name, data, label=_label_of(group))
    for ext in images[1:]:
        yield record(shard, key, group[ext][0], None, status="error", error_type="DuplicateKey",
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

def _read_parquet(shard: Shard, source: SourceSpec) -> Iterator[dict]:
    fs, path = fsspec.core.url_to_fs(shard.uri)
    base = posixpath.basename(path).removesuffix(".parquet")
    columns = [c for c in (source.image_column, source.label_column, source.key_column) if c]
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise SourceError(f"{shard.uri}: column {missing[0]!r} not found (has {pf.schema_arrow.names}); "
                              "set source.image_column / label_column / key_column")
        row = 0
        for batch in pf.iter_batches(batch_size=CHUNK, columns=columns):
            cols = batch.to_pydict()
            for i, data in enumerate(cols[source.image_column]):
                key = str(cols[source.key_column][i]) if source.key_column else f"{base}/{row}"
                label = cols[source.label_column][i] if source.label_column else None
                yield record(shard, key, f"row {row}", data, label=None if label is None else int(label))
                row += 1


# --- A folder of image files -----------------------------------------------------------------------

def _read_images(shard: Shard, source: SourceSpec) -> Iterator[dict]:
    roots = [fsspec.core.url_to_fs(u)[1].rstrip("/") for u in ([source.uri] if isinstance(source.uri, str) else source.uri)]
    for uri in shard.files:
        fs, path = fsspec.core.url_to_fs(uri)
        root = next((r for r in roots if path.startswith(r + "/")), None)
        rel = path[len(root) + 1 :] if root else posixpath.basename(path)
        key = rel.rsplit(".", 1)[0]
        try:
            data = fs.cat_file(path)
        except OSError as e:
            yield record(shard, key, rel, None, status="error", error_type="ReadError", message=str(e), source_uri=uri)
            continue
        yield record(shard, key, rel, data, source_uri=uri)
