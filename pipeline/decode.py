"""Encoded bytes -> RGB uint8 (H, W, 3) at the model's size, safely.

Why uint8: it is 4x smaller than float32 between stages; the engine normalizes on
its device. Why so defensive: one bad file among millions must become an error
row, never a crashed job, and a crafted file must not exhaust memory.
"""

from __future__ import annotations

import io
import math
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.config import SourceSpec

# No torch here: read and decode actors import this module and must not pay for torch (~2 s each).

# JPEG decoding with DCT scaling (Pillow's draft) stops at DRAFT_MARGIN x the resize target.
# Scaling all the way down to the target (margin 1) is a box filter where the references
# (transformers' processors, timm) resize the full image with an antialiased filter: on
# photographs it cost SigLIP's embedding cosine to transformers 0.990 (margin 2: 0.998; 4:
# 1.000, tests/test_families_run.py). At 4, DCT scaling still halves a 12-megapixel photo's
# decode work twice over, and leaves images under ~4x the target to a full decode.
DRAFT_MARGIN = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 64_000_000  # a 8000 x 8000 image; larger is treated as a decompression bomb
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    """How bytes become the model's input; travels with the checkpoint, not the job."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # "crop": resize the shorter side to image_size / crop_pct, then center-crop (timm).
    # "squash": resize straight to image_size x image_size (Hugging Face ViT).
    resize: str = "crop"
    crop_pct: float = 0.875
    # The resampling filter: bicubic (timm, CLIP, DINOv2, DeiT) or bilinear (SigLIP's processor).
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        d = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
             "resize": self.resize, "crop_pct": self.crop_pct}
        if self.interpolation != "bicubic":  # (model ids from before this field stay the same)
            d["interpolation"] = self.interpolation
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize=d.get("resize", "crop"), crop_pct=float(d.get("crop_pct", 0.875)),
                   interpolation=d.get("interpolation", "bicubic"))


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
            tw, th = _resize_target(w, h, pre)
            img.draft("RGB", (tw * DRAFT_MARGIN, th * DRAFT_MARGIN))
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
    # As torchvision (timm) and transformers size it: the shorter side floor(S / crop_pct), the
    # longer side truncated, int(short * long / short_side); rounding instead put the crop half a
    # pixel off on one image in three, and cost CLIP's cosine to transformers 0.998.
    short = math.floor(pre.image_size / pre.crop_pct + 1e-6)
    if w <= h:
        return short, max(short, int(short * h / w))
    return max(short, int(short * w / h)), short


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
    resample = Image.BILINEAR if pre.interpolation == "bilinear" else Image.BICUBIC
    return img.resize((size, size), resample, box=box, reducing_gap=None)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# --- the decode stage --------------------------------------------------------------------------------

STATUS_COLUMNS = ("status", "error_stage", "error_type", "error_message")


def decode_records(records: pa.Table, pre: Preprocess, pool: Executor | None = None) -> tuple[np.ndarray, dict[str, list]]:
    """Decode every record of status "record" -> (pixels (N, S, S, 3), the status columns with
    each record's outcome: "ok" or a decode error). Failures never raise.

    With a pool, records decode in parallel (Pillow releases the GIL while decoding and
    resampling), so the model does not wait on a single decoding core."""
    cols = {c: records.column(c).to_pylist() for c in STATUS_COLUMNS}
    S = pre.image_size
    if "pixels" in records.column_names:  # decoded upstream by a Decoder: nothing left to do
        return pixels_of(records, S), cols
    pixels = np.zeros((records.num_rows, S, S, 3), dtype=np.uint8)  # (N, S, S, 3)
    images = records.column("image")
    todo = [i for i, status in enumerate(cols["status"]) if status == "record"]

    def one(i: int) -> None:
        try:
            pixels[i] = decode_image(images[i].as_py(), pre)
            cols["status"][i] = "ok"
        except DecodeError as e:
            fail(cols, i, e)

    list(pool.map(one, todo) if pool else map(one, todo))
    return pixels, cols


def first_images(source: SourceSpec, shards: list, pre: Preprocess, n: int) -> list[tuple[dict, np.ndarray]]:
    """The first n decodable images of the listed shards, in listing order, each with its record's
    key, member and label: the accuracy gate's fixed batch, the analysis's rollout sample."""
    from pipeline.sources import read_parts

    out: list[tuple[dict, np.ndarray]] = []
    for shard in shards:
        for part in read_parts(shard, source):
            r = part.records
            for i, status in enumerate(r.column("status").to_pylist()):
                if len(out) >= n:
                    return out
                if status != "record":
                    continue
                try:
                    pixels = decode_image(r["image"][i].as_py(), pre)  # (S, S, 3)
                except DecodeError:
                    continue
                out.append(({c: r[c][i].as_py() for c in ("key", "member", "label")}, pixels))
    return out


def fail(cols: dict[str, list], i: int, e: DecodeError) -> None:
    """Record i failed to decode: its status columns say how."""
    cols["status"][i], cols["error_stage"][i] = "error", "decode"
    cols["error_type"][i], cols["error_message"][i] = e.kind, str(e)


def pixels_of(records: pa.Table, size: int) -> np.ndarray:
    """The `pixels` column (fixed-size binary, S*S*3 bytes a row) as (N, S, S, 3) uint8, no copy
    when the column is one chunk (the common case: a part unpacked from its cell)."""
    col = records.column("pixels").combine_chunks()  # FixedSizeBinaryArray
    row = size * size * 3
    data = np.frombuffer(col.buffers()[1], dtype=np.uint8)
    return data[col.offset * row:(col.offset + len(col)) * row].reshape(len(col), size, size, 3)


def with_pixels(records: pa.Table, pixels: np.ndarray, cols: dict[str, list]) -> pa.Table:
    """The records with `image` replaced by `pixels` (S*S*3 bytes each) and their decode outcome."""
    row = pixels.shape[1] * pixels.shape[2] * 3  # bytes per image
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row), len(pixels), [None, pa.py_buffer(pixels)])
    out = records.drop_columns(["image", *STATUS_COLUMNS])
    for name in STATUS_COLUMNS:
        out = out.append_column(name, pa.array(cols[name], pa.string()))
    return out.append_column("pixels", column)


class Decoder:
    """The decode stage, as its own CPU actors: used where the model runs on a GPU and decodes
    on the CPU (engine.decode: cpu, or a GPU node without nvJPEG).

    There, decoding is the work: it runs here, one process per CPU (no GIL shared with the
    model actor), while the GPU actor only moves pixels. Parts go in; the same parts come out
    with their records' `image` replaced by `pixels` (1 byte per value, as everywhere). On
    CPU-only nodes decoding stays fused in the model actor instead (predict.py), where a
    separate process would compete with torch for cores; with GPU decoding it happens on the
    model's GPU and this stage does not exist."""

    def __init__(self, preprocess: dict):
        self.pre = Preprocess.from_dict(preprocess)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.sources import part_row, parts_of

        rows = []
        for part in parts_of(batch):
            pixels, cols = decode_records(part.records, self.pre)  # (N, S, S, 3)
            rows.append(part_row(part, with_pixels(part.records, pixels, cols)))
        return pa.concat_tables(rows)
