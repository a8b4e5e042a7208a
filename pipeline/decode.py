"""Encoded bytes -> RGB uint8 (H, W, 3) at the model's size, safely.

Why uint8: it is 4x smaller than float32 between stages; the engine normalizes on
its device. Why so defensive: one bad file among millions must become an error
row, never a crashed job, and a crafted file must not exhaust memory.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # not at run time: read actors import this module and must not pay for torch
    from pipeline.model.checkpoints import Preprocess

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 64_000_000  # a 8000 x 8000 image; larger is treated as a decompression bomb
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DecodeError(ValueError):
    """A record whose bytes are not an acceptable image; `kind` becomes the error_type column."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, pre: Preprocess, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> (S, S, 3) uint8, S = pre.image_size. Raises DecodeError with a useful message."""
    if not data:
        raise DecodeError("EmptyFile", "zero-byte record: the file is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecodeError("DecompressionBomb", str(e)) from None
    except Image.UnidentifiedImageError:
        head = data[:8]
        raise DecodeError("UnsupportedFormat",
                          f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}); first bytes {head!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError("CorruptImage", f"image header could not be decoded: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("DecompressionBomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        if img.format == "JPEG":
            # DCT-domain downscale while decoding: a 4000 px JPEG decodes at 1/2..1/8 size.
            img.draft("RGB", _resize_target(w, h, pre))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = resize_and_crop(img, pre)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise DecodeError("CorruptImage", f"{img.format or 'image'} {w}x{h} could not be decoded: {e}") from None
    arr = np.asarray(img, dtype=np.uint8)
    assert arr.shape == (pre.image_size, pre.image_size, 3), arr.shape
    return arr  # (S, S, 3)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB: alpha composited on white, 16-bit scaled down, CMYK/palette converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or a.max() > 255 else 255
        a = (a * 255 // peak).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_target(w: int, h: int, pre: Preprocess) -> tuple[int, int]:
    """The size the image is resized to before the crop (shorter side for "crop")."""
    if pre.resize == "squash":
        return pre.image_size, pre.image_size
    short = round(pre.image_size / pre.crop_pct)
    scale = short / min(w, h)
    return max(short, round(w * scale)), max(short, round(h * scale))


def resize_and_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    """Resize + center crop in one resample: only the source region that survives the crop is
    resampled (Pillow's `box`), which halves the work for a 4:3 photo at crop_pct 0.875."""
    size = pre.image_size
    w, h = img.size
    tw, th = _resize_target(w, h, pre)
    if (w, h) == (size, size) == (tw, th):
        return img
    left, top = (tw - size) // 2, (th - size) // 2  # the crop, in resized pixels
    sx, sy = w / tw, h / th
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)  # the same, in source pixels
    return img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=None)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
