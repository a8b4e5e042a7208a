"""Engine alone, per backend and precision, with the accuracy gate's figures beside each, in one run.

    python -m benchmarks.engines --models vit_ti_16,vit_s_16,vit_b_16 --seconds 8

Random seeded weights (no weights are downloaded); inputs are random uint8 images. The gate
compares each engine with torch fp32 on the same 32 images, as the pipeline does before a run;
int8 is calibrated on 64 other images first (random weights have near-tied logits, so its
top-1 agreement here says little about a trained model: see the int8 tests on digits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks.tables import write_table

CONFIGS = [("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("onnx", "int8")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_ti_16,vit_s_16,vit_b_16")
    p.add_argument("--seconds", type=float, default=8.0, help="timing per engine [8]")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="engines")
    args = p.parse_args(argv)

    from pipeline.engines.build import build_engine
    from pipeline.engines.torch_engine import TorchEngine
    from pipeline.gate import compare
    from pipeline.model.checkpoints import random_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="vitpipe-engines-") as cache:
        for arch in args.models.split(","):
            ckpt = random_checkpoint(arch)
            S = ckpt.preprocess.image_size
            x = np.random.default_rng(0).integers(0, 255, (args.batch, S, S, 3), dtype=np.uint8)  # (B, S, S, 3)
            calibration = np.random.default_rng(1).integers(0, 255, (64, S, S, 3), dtype=np.uint8)
            reference = TorchEngine(ckpt, "fp32", "cpu", args.threads)
            for backend, precision in CONFIGS:
                built = build_engine(ckpt, backend, precision, "cpu", args.threads, max_batch=args.batch,
                                     cache_uri=cache, calibration=calibration if precision == "int8" else None)
                engine = built.engine
                engine.run(x[:2])
                t0, n = time.time(), 0
                while time.time() - t0 < args.seconds:
                    engine.run(x)
                    n += len(x)
                ips = n / (time.time() - t0)
                gate = compare(reference, engine, x)
                rows.append({"model": arch, "backend": backend, "precision": precision, "images_per_s": round(ips, 2),
                             "cosine_mean": gate.cosine_mean, "cosine_min": gate.cosine_min,
                             "top1_agreement": gate.top1_agreement, "gate": "pass" if gate.passed else "FAIL"})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"# Engines alone: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, batch {args.batch}, 224 px, "
             "random seeded weights; gate vs torch fp32 on the same 32 images.", "",
             "| model | backend | precision | images/s | cosine mean | cosine min | top-1 agreement | gate |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['backend']} | {r['precision']} | {r['images_per_s']} | {r['cosine_mean']} | "
              f"{r['cosine_min']} | {r['top1_agreement']} | {r['gate']} |" for r in rows]
    write_table(args.out, args.name, rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
