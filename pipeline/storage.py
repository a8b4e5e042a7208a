"""Small object-storage primitives shared by the engine cache and the output lease.

First-writer-wins needs a conditional create: S3 `PutObject` with `If-None-Match: *`
(s3fs `mode="create"`; SeaweedFS and AWS honor it), or O_EXCL on a local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath

import fsspec


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
