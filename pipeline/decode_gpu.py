"""Decode where the model runs, when it runs on a GPU: batched nvJPEG, then resize and crop on
the device, with a per-record fallback to the CPU path (decode.py).

Why: a GPU runs ViT-B/16 at ~9,000 images/s, while CPU JPEG decoding of mixed-size photos
costs ~6.7 CPU-ms per image (measured on the H200 box), so 16 CPUs feed ~2,000 images/s
at best. nvJPEG through torchvision (`decode_jpeg` on a list, device="cuda") moves that work
to the GPU; the CPU keeps only the header parse that decides which records go there.

What goes to the GPU: whole baseline JPEGs in RGB/YCbCr or grayscale, within the pixel limit.
Everything else (PNG, WebP, CMYK or progressive JPEGs, anything nvJPEG refuses) is decoded
by the CPU path, record by record, so that every failure becomes the same error row it
would be on a CPU node. EXIF orientation is read from the header and applied on the device.

The resize is the CPU path's definition (resize the shorter side to S / crop_pct, bicubic,
then centre crop; or squash to S x S) with torch's antialiased bicubic, which follows
Pillow's filter. The one difference left is Pillow's DCT-domain downscale of large JPEGs
on the CPU path; the GPU tests hold the two paths to embedding cosine >= 0.999.

torchvision is imported here only, and this module only on GPU nodes: its PyPI wheel does
not import beside this project's CPU torch.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.decode import (
    ALLOWED_FORMATS,
    MAX_PIXELS,
    STATUS_COLUMNS,
    DecodeError,
    Preprocess,
    _resize_target,
    decode_image,
    fail,
)

GPU_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as Pillow would (CMYK/YCCK go to the CPU)
CALL = 128  # JPEGs per nvJPEG call


@dataclass
class Header:
    width: int
    height: int
    orientation: int  # EXIF 1..8


def gpu_header(data: bytes, max_pixels: int = MAX_PIXELS) -> Header | None:
    """The header of a JPEG the GPU can decode as the CPU path would, else None (CPU path).
    A JPEG without its end marker (cut short) goes to the CPU path, which names the error."""
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        w, h = img.size
        if img.format != "JPEG" or img.mode not in GPU_MODES or img.info.get("progressive") \
                or img.info.get("progression") or w * h > max_pixels:
            return None
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 -- whatever it is, the CPU path decides (and names the error)
        return None
    return Header(w, h, orientation if 1 <= orientation <= 8 else 1)


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (3, H, W) image, as Pillow's ImageOps.exif_transpose does."""
    if orientation == 2:
        return x.flip(-1)  # mirrored left-right
    if orientation == 3:
        return x.flip(-1).flip(-2)  # turned 180
    if orientation == 4:
        return x.flip(-2)  # mirrored top-bottom
    if orientation == 5:
        return x.transpose(-1, -2)  # Pillow's TRANSPOSE
    if orientation == 6:
        return torch.rot90(x, -1, dims=(-2, -1))  # a quarter turn clockwise
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1).flip(-2)  # Pillow's TRANSVERSE
    if orientation == 8:
        return torch.rot90(x, 1, dims=(-2, -1))  # a quarter turn counter-clockwise
    return x


def resize_and_crop(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (S, S, 3) uint8: the CPU path's resize + centre crop."""
    h, w = x.shape[-2:]
    tw, th = _resize_target(w, h, pre)
    S = pre.image_size
    y = x[None].float()  # (1, 3, H, W)
    if (th, tw) != (h, w):
        mode = "bilinear" if pre.interpolation == "bilinear" else "bicubic"  # as the CPU path (SigLIP: bilinear)
        y = F.interpolate(y, size=(th, tw), mode=mode, antialias=True, align_corners=False)
    top, left = (th - S) // 2, (tw - S) // 2
    y = y[0, :, top : top + S, left : left + S]  # (3, S, S)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)  # (S, S, 3)


class GpuDecoder:
    """Decodes a part's records into a (N, S, S, 3) uint8 tensor on the model's GPU."""

    def __init__(self, pre: Preprocess, device: str = "cuda", max_pixels: int = MAX_PIXELS):
        import torchvision.io  # noqa: F401 -- fails here, at construction, on a node without it

        self.pre, self.device, self.max_pixels = pre, torch.device(device), max_pixels

    def decode(self, records: pa.Table, pool: Executor | None = None) -> tuple[torch.Tensor, dict[str, list], dict]:
        """-> (pixels on the GPU, status columns as decode_records gives them, {"gpu": n, "cpu": n})."""
        from torchvision.io import ImageReadMode, decode_jpeg

        cols = {c: records.column(c).to_pylist() for c in STATUS_COLUMNS}
        S = self.pre.image_size
        out = torch.zeros((records.num_rows, S, S, 3), dtype=torch.uint8, device=self.device)  # (N, S, S, 3)
        images = records.column("image")
        todo = [i for i, s in enumerate(cols["status"]) if s == "record"]
        headers = {i: gpu_header(images[i].as_py(), self.max_pixels) for i in todo}
        on_gpu = [i for i in todo if headers[i] is not None]
        cpu = [i for i in todo if headers[i] is None]
        done = 0
        for start in range(0, len(on_gpu), CALL):
            chunk = on_gpu[start : start + CALL]
            with warnings.catch_warnings():  # frombuffer warns that bytes are read-only; they are only read
                warnings.simplefilter("ignore", UserWarning)
                data = [torch.frombuffer(images[i].as_buffer(), dtype=torch.uint8) for i in chunk]
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad JPEG fails the whole call: try them one by one
                decoded = []
                for d in data:
                    try:
                        decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
            for i, x in zip(chunk, decoded, strict=True):
                if x is None or x.shape[-2:] != (headers[i].height, headers[i].width):
                    cpu.append(i)  # nvJPEG refused it (or disagrees with the header): the CPU decides
                    continue
                out[i] = resize_and_crop(orient(x, headers[i].orientation), self.pre)
                cols["status"][i] = "ok"
                done += 1
        fallback = self._cpu(images, sorted(cpu), cols, pool)
        if fallback is not None:
            idx, pixels = fallback
            out[idx] = pixels.to(self.device, non_blocking=True)
        return out, cols, {"gpu": done, "cpu": len(cpu)}

    def _cpu(self, images: pa.Array, idx: list[int], cols: dict[str, list],
             pool: Executor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The CPU path for the records the GPU did not take; -> (indices, pixels) of those that decoded."""
        pixels: dict[int, np.ndarray] = {}

        def one(i: int) -> None:
            try:
                pixels[i] = decode_image(images[i].as_py(), self.pre, self.max_pixels)
                cols["status"][i] = "ok"
            except DecodeError as e:
                fail(cols, i, e)

        list(pool.map(one, idx) if pool else map(one, idx))
        if not pixels:
            return None
        ok = sorted(pixels)
        return torch.tensor(ok), torch.from_numpy(np.stack([pixels[i] for i in ok])).pin_memory()
