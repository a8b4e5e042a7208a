"""Builders of real test inputs: images in many encodings, and tar shards with odd members."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def image_bytes(w: int = 64, h: int = 48, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """A 60 x 20 JPEG, left half red and right half blue, with EXIF orientation 6 (rotate 90 CW)."""
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def tar_bytes(members: list) -> bytes:
    """members: (name, bytes) for files, or a ready TarInfo (links, devices) as (TarInfo, None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def bad_input_members() -> tuple[list, dict[str, str], set[str]]:
    """The bad-input shard: returns (members, expected error type by key, keys expected ok)."""
    good = image_bytes(80, 60, seed=1)
    members = [
        ("good1.jpg", good), ("good1.cls", b"3"),
        ("good2.png", image_bytes(50, 70, "PNG", seed=2)),
        ("trunc.jpg", image_bytes(300, 200, seed=3)[:700]),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(4).integers(0, 255, 2000, dtype=np.uint8))),
        ("empty.jpg", b""),
        ("cmyk.jpg", image_bytes(64, 64, "JPEG", mode="CMYK", seed=5)),
        ("gray16.png", image_bytes(40, 40, "PNG", mode="I;16", seed=6)),
        ("rgba.png", image_bytes(40, 30, "PNG", mode="RGBA", seed=7)),
        ("paletted.gif", image_bytes(30, 30, "GIF", mode="P", seed=8)),
        ("rotated.jpg", exif_rotated_jpeg()),
        ("bomb.png", bomb_png()),
        ("notes.jpg", b"this is a text file, not a JPEG\n"),
        ("../escape.jpg", good),
        ("/abs.jpg", good),
        (symlink("link.jpg", "/etc/passwd"), None),
        ("dup.jpg", good),
        ("other.jpg", image_bytes(33, 33, seed=9)),
        ("dup.jpg", good),
        ("readme.txt", b"not part of any image sample"),
        ("fake.svg", b"<svg/>"),
    ]
    errors = {
        "trunc": "CorruptImage", "corrupt": "CorruptImage", "empty": "EmptyFile", "bomb": "DecompressionBomb",
        "notes": "UnsupportedFormat", "../escape.jpg": "UnsafeMember", "/abs.jpg": "UnsafeMember",
        "link.jpg": "UnsafeMember", "dup": "DuplicateKey",
    }
    ok = {"good1", "good2", "cmyk", "gray16", "rgba", "paletted", "rotated", "dup", "other"}
    return members, errors, ok


def randomized(model, scale: float = 0.02, seed: int = 0):
    """A torch model with every parameter moved off its init (LayerNorm weights off 1, biases,
    tokens and LayerScale off their constants), in eval mode: a wrong key mapping cannot pass
    on zeros or ones."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()
