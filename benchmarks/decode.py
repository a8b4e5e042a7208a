"""Decode alone: milliseconds per image on the benchmark's mixed-size JPEGs, one core.

    python -m benchmarks.decode --images 200

Compares vitpipe's decode (draft mode + one resample of the region the crop keeps) with the
two-step form it replaced (resize the whole image, then crop), on the same bytes.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from benchmarks.bench import make_jpegs
from pipeline.decode import _resize_target, decode_image
from pipeline.model.checkpoints import Preprocess


def two_step(data: bytes, pre: Preprocess) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", _resize_target(*img.size, pre))
    img = img.convert("RGB")
    tw, th = _resize_target(*img.size, pre)
    img = img.resize((tw, th), Image.BICUBIC, reducing_gap=None)
    left, top = (tw - pre.image_size) // 2, (th - pre.image_size) // 2
    return np.asarray(img.crop((left, top, left + pre.image_size, top + pre.image_size)))


def ms_per_image(fn, jpegs: list[bytes], pre: Preprocess) -> float:
    fn(jpegs[0], pre)
    t0 = time.perf_counter()
    for data in jpegs:
        fn(data, pre)
    return (time.perf_counter() - t0) / len(jpegs) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args(argv)
    jpegs, pre = make_jpegs(args.images, seed=3), Preprocess()
    old, new = ms_per_image(two_step, jpegs, pre), ms_per_image(decode_image, jpegs, pre)
    print(f"{args.images} JPEGs, 200-2,000 px -> 224: resize-then-crop {old:.2f} ms/img, "
          f"vitpipe decode {new:.2f} ms/img ({old / new:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
