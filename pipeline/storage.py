"""Small object-storage primitives shared by the engine cache, the output lease, the listing
and the readers.

First-writer-wins needs a conditional create: S3 `PutObject` with `If-None-Match: *`
(s3fs `mode="create"`; SeaweedFS and AWS honor it), or O_EXCL on a local disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
from datetime import datetime
from email.utils import parsedate_to_datetime

import fsspec


def fast_s3_timestamps(fs: fsspec.AbstractFileSystem) -> None:
    """On S3, parse the timestamps botocore meets with the standard library, in this process.

    botocore turns every LastModified into a datetime with dateutil's general parser: one per
    listed object, one per GET (its Last-Modified header). That was half the CPU of listing a
    bucket with s3fs (20,000 keys on SeaweedFS: 1.40 -> 0.74 CPU-s, 1.65 -> 0.98 s) and ~0.4 of
    each GET's 1.7 CPU-ms (benchmarks/image_folder.py). The values are the same tz-aware UTC
    datetimes; what the fast path does not recognise goes to botocore's own parser.

    botocore's `ResponseParserFactory.set_parser_defaults(timestamp_parser=...)` does this per
    session, but s3fs makes its sessions itself; every parser without one takes the module's
    default when it is made, which is once per response: set there, it holds for every client
    in the process, those made before too."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not {"s3", "s3a"} & set(protocols):
        return
    from botocore import parsers

    parsers.DEFAULT_TIMESTAMP_PARSER = s3_timestamp


def find_files(fs: fsspec.AbstractFileSystem, path: str, in_flight: int) -> dict[str, dict]:
    """Every file under the folder `path`, with its info, as `fs.find(path, detail=True)` has them.

    An object store lists 1,000 keys per request, one request after another: on S3, where a LIST
    takes 50-300 ms, a million loose images took minutes before the first row. On an async
    filesystem the folder's first level is listed first, then each of its sub-folders (an image
    folder's classes) at once, `in_flight` LISTs under way. A flat folder is one stream as before."""
    if in_flight <= 1 or not fs.async_impl:
        return fs.find(path, detail=True)
    return fsspec.asyn.sync(fs.loop, _find_by_folder, fs, path, in_flight)


async def _find_by_folder(fs: fsspec.AbstractFileSystem, path: str, in_flight: int) -> dict[str, dict]:
    top = await fs._ls(path, detail=True)
    found = {i["name"]: i for i in top if i["type"] == "file"}
    gate = asyncio.Semaphore(in_flight)

    async def below(folder: str) -> dict[str, dict]:
        async with gate:
            return await fs._find(folder, detail=True)

    for files in await asyncio.gather(*(below(i["name"]) for i in top if i["type"] == "directory")):
        found.update(files)
    return dict(sorted(found.items()))


def s3_timestamp(value: str | int | float) -> datetime:
    """An S3 timestamp: ISO 8601 in XML bodies ("2026-12-02T16:16:53.000Z"), RFC 7231 in headers
    ("Wed, 02 Dec 2026 16:16:53 GMT"); anything else (epoch numbers, other forms) to botocore."""
    if isinstance(value, str):
        try:
            if value.endswith("Z"):  # (Python 3.10's fromisoformat does not read "Z")
                return datetime.fromisoformat(value[:-1] + "+00:00")
            if value.endswith(" GMT"):
                return parsedate_to_datetime(value)
        except ValueError:
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def put_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist; True if this call created it."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
    if "file" in protocols or "local" in protocols:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            with open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
    # Other filesystems: best effort (check, then write); documented as racy.
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _precondition_failed(e: OSError) -> bool:
    """s3fs wraps S3's 412 PreconditionFailed in an OSError; look at the cause, then the text."""
    cause = getattr(e, "__cause__", None)
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "412") or "pre-condition" in str(e).lower() or "412" in str(e)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete a directory tree file by file (fsspec's local rm needs a cwd, which a Ray job's may lack)."""
    for p, info in sorted(fs.find(path, withdirs=True, detail=True).items(), reverse=True):
        if info.get("type") == "directory":
            with contextlib.suppress(OSError):  # object stores have no real directories
                fs.rmdir(p)
        else:
            fs.rm_file(p)
    with contextlib.suppress(OSError):
        fs.rmdir(path)


def sweep(fs: fsspec.AbstractFileSystem, root: str, patterns: tuple[str, ...], keep: set[str]) -> None:
    """Delete the files under `root` that match `patterns` and that `keep` (paths relative to root)
    does not name (a dead or earlier run's leftovers), then the staging folder `_pending`."""
    fs.invalidate_cache()
    for pattern in patterns:
        for p in fs.glob(f"{root}/{pattern}"):
            if p.removeprefix(root + "/") not in keep:  # (not relpath: it needs a cwd)
                fs.rm_file(p)
    if fs.exists(f"{root}/_pending"):
        remove_tree(fs, f"{root}/_pending")
    fs.invalidate_cache()
