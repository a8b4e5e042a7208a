"""Small object-storage primitives shared by the engine cache, the output lease, the listing
and the readers.

First-writer-wins needs a conditional create: S3 `PutObject` with `If-None-Match: *`
(s3fs `mode="create"`; SeaweedFS and AWS honor it), or O_EXCL on a local disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import itertools
import posixpath
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import fsspec

T = TypeVar("T")


def fast_s3_timestamps(fs: fsspec.AbstractFileSystem) -> None:
    """On S3, parse the timestamps botocore meets with the standard library, in this process.

    botocore turns every LastModified into a datetime with dateutil's general parser: one per
    listed object, one per GET (its Last-Modified header). That was half the CPU of listing a
    bucket with s3fs (20,000 keys on SeaweedFS: 1.40 -> 0.74 CPU-s, 1.65 -> 0.98 s; rows l1 and
    l0 of benchmarks/image_folder.py) and ~0.4 of each GET's 1.7 CPU-ms (2,000 GETs in turn,
    measured alone; within that benchmark's noise). The values are the same tz-aware UTC
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


# s3fs copies an object in one request below 150 MiB (its MANAGED_COPY_THRESHOLD), in parts above
ONE_REQUEST_COPY = 100 * 2**20


def move_files(fs: fsspec.AbstractFileSystem, moves: list[tuple[str, str, int]], in_flight: int) -> None:
    """Move each (source, destination, size in bytes) file; on an object store `in_flight` at once.

    There a move is a copy and a delete, and s3fs asks for the object's size (a HEAD) before it
    copies, to choose one COPY or a copy in parts: three requests a file, one file after another,
    and a commit moves every part file of the run (benchmarks/output_commit.py). On an async
    filesystem the copies go `in_flight` at a time on fsspec's loop, then one bulk delete per 1,000
    keys; on S3 a file under ONE_REQUEST_COPY (the ledger knows each part file's size) is one COPY,
    no HEAD. A copy that fails raises, as a move did."""
    if fs.async_impl:
        fsspec.asyn.sync(fs.loop, _copy_all, fs, moves, in_flight)
        remove_files(fs, [src for src, _, _ in moves])
        return
    for src, dest, _ in moves:
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.mv(src, dest)


async def _copy_all(fs: fsspec.AbstractFileSystem, moves: list[tuple[str, str, int]], in_flight: int) -> None:
    one_copy = getattr(fs, "_copy_basic", None)  # s3fs's single CopyObject (what _cp_file calls after its HEAD)

    async def copy(src: str, dest: str, size: int) -> None:
        if one_copy is not None and size < ONE_REQUEST_COPY:
            await one_copy(src, dest)
        else:
            await fs._cp_file(src, dest)

    await _at_most(in_flight, [copy(*m) for m in moves])


async def _at_most(in_flight: int, coros: list[Awaitable[T]]) -> list[T]:
    """Await these, `in_flight` under way at a time, on the running loop; results in order."""
    gate = asyncio.Semaphore(in_flight)

    async def one(c: Awaitable[T]) -> T:
        async with gate:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def remove_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete these files: on an object store one bulk request per 1,000 keys (s3fs), not one each."""
    if not paths:
        return
    if fs.async_impl:
        fs.rm(paths)
        return
    for p in paths:
        fs.rm_file(p)


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
    for files in await _at_most(in_flight, [fs._find(i["name"], detail=True) for i in top if i["type"] == "directory"]):
        found.update(files)
    return dict(sorted(found.items()))


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
    for pattern in patterns:  # (not relpath below: it needs a cwd)
        remove_files(fs, [p for p in fs.glob(f"{root}/{pattern}") if p.removeprefix(root + "/") not in keep])
    if fs.exists(f"{root}/_pending"):
        remove_tree(fs, f"{root}/_pending")
    fs.invalidate_cache()


def fetch_in_order(fs, paths: list[str], in_flight: int) -> Iterator[bytes | OSError]:
    """Each file's bytes, or the OSError reading it raised, in the order of `paths`. On an async
    filesystem (s3fs, gcsfs, adlfs, http) `in_flight` GETs stay under way on its event loop, a new
    one started as each result is handed on: one at a time, a read actor on an object store mostly
    waited (S3 answers in 10-50 ms: 20-100 files/s). Coroutines on fsspec's own loop, not threads
    calling its sync API, which cost more CPU per file (SeaweedFS on loopback, per GET: ~2.9 CPU-ms
    this way, 3.4 from 32 threads, 3.7 one at a time)."""
    one = _one_request(fs)
    fast_s3_timestamps(fs)  # ~0.4 CPU-ms of each S3 GET
    if in_flight <= 1 or not fs.async_impl:
        yield from (_or_error(functools.partial(fs.cat_file, p, **one)) for p in paths)
        return

    def start(path: str) -> Future:
        return asyncio.run_coroutine_threadsafe(fs._cat_file(path, **one), fs.loop)

    todo = iter(paths)
    window: deque[Future] = deque(start(p) for p in itertools.islice(todo, in_flight))
    try:
        while window:
            got = _or_error(window.popleft().result)
            following = next(todo, None)  # keep in_flight under way, and never a whole shard in memory
            if following is not None:
                window.append(start(following))
            yield got
    finally:  # the reader stopped early (a fault, or the job ending): no GETs left behind
        for f in window:
            f.cancel()


def _one_request(fs) -> dict:
    """Read each file in one GET. s3fs (since 2026.2) and adlfs can split a file's read into
    concurrent ranges, and s3fs asks for the object's size first to decide: a HEAD before every
    GET, twice the round trips and about as much CPU again (benchmarks/image_folder.py). An image
    is small."""
    if not fs.async_impl:
        return {}
    return {"max_concurrency": 1} if "max_concurrency" in inspect.signature(fs._cat_file).parameters else {}


def _or_error(read: Callable[[], bytes]) -> bytes | OSError:
    try:
        return read()
    except OSError as e:  # the file's own fault; anything else is the shard's (read_parts)
        return e
