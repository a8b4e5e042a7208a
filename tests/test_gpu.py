"""On a CUDA GPU: torch fp16/bf16 engines, torch.compile, JPEG decoding on the GPU (nvJPEG) against
the CPU path, and whole jobs through both GPU layouts (decode on the GPU, decode actors).

Skipped, with the reason, where torch sees no CUDA GPU (CI, laptops). The reference is always
torch fp32 on the CPU, on the bundled digits model and real digit images, so top-1 agreement
means something (random weights have near-uniform logits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.decode import decode_image
from pipeline.demo import digit_jpegs, write_shards
from pipeline.engines.torch_engine import TorchEngine
from pipeline.gate import compare
from pipeline.model.checkpoints import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here"),
]


@pytest.fixture(scope="module")
def digits():
    ckpt = load_checkpoint("builtin:digits")
    jpegs = digit_jpegs("test")[:256]
    images = np.stack([decode_image(data, ckpt.preprocess) for data, _ in jpegs])  # (N, S, S, 3) uint8
    return ckpt, jpegs, images


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_engine_matches_cpu_fp32(digits, precision):
    ckpt, _, images = digits
    cpu = TorchEngine(ckpt, "fp32", "cpu", 2)
    gpu = TorchEngine(ckpt, precision, "cuda", 1)
    assert gpu.info.device.startswith("cuda") and gpu.info.precision == precision
    emb, logits = gpu.run(images[:7])  # an odd batch: no shape is special
    assert emb.dtype == np.float32 and emb.shape == (7, ckpt.config.dim) and logits.shape == (7, ckpt.config.num_classes)
    result = compare(cpu, gpu, images, min_cosine=0.999, min_top1=0.99)
    assert result.passed, result.describe()
    if precision == "fp32":  # TF32 may be on for matmuls: close, not equal
        assert result.cosine_min > 0.9999


def test_cuda_torch_compile_matches_eager(digits):
    ckpt, _, images = digits
    eager = TorchEngine(ckpt, "fp16", "cuda", 1)
    compiled = TorchEngine(ckpt, "fp16", "cuda", 1, compile=True)
    for n in (32, 19):  # dynamic shapes: a second batch size must not fail or recompile wrongly
        a, _ = eager.run(images[:n])
        b, _ = compiled.run(images[:n])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.999, cos.min()


def _photo(w: int, h: int, seed: int, **save) -> bytes:
    import io

    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 255, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_gpu_decode_agrees_with_the_cpu_path_and_falls_back_record_by_record(tmp_path):
    """nvJPEG + resize/crop on the GPU against Pillow on the CPU, on the same records: the same
    outcome per record (ok, or the same error type), pixels a ViT cannot tell apart (embedding
    cosine >= 0.999 with ViT-B/16 fp32 on the GPU), and what nvJPEG does not take (PNG, CMYK,
    progressive, corrupt) decoded or failed by the CPU path, counted as fallbacks."""
    pytest.importorskip("torchvision", reason="GPU decoding uses torchvision's nvJPEG (on GPU nodes only)")
    import io

    import pyarrow as pa
    from PIL import Image

    from pipeline.decode import Preprocess, decode_records
    from pipeline.decode_gpu import GpuDecoder
    from pipeline.model.checkpoints import random_checkpoint
    from pipeline.sources import RECORD_SCHEMA

    from helpers import exif_rotated_jpeg, image_bytes

    jpegs = [_photo(w, h, seed=i) for i, (w, h) in enumerate([(640, 480), (480, 640), (1600, 1200), (300, 300),
                                                             (250, 180), (2000, 900), (224, 224), (700, 500)])]
    jpegs += [exif_rotated_jpeg(), _photo(320, 240, seed=20)]
    gray = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).convert("L").save(gray, "JPEG")
    fallbacks = [image_bytes(200, 150, "PNG", seed=1), image_bytes(200, 150, mode="CMYK", seed=2),
                 _photo(400, 300, seed=3, progressive=True)]
    bad = [jpegs[0][:2000], b"\xff\xd8\xff\xe0 not really a jpeg", b""]
    blobs = jpegs + [gray.getvalue()] + fallbacks + bad
    base = {"source_uri": "s3://b/s.tar", "source_etag": "e", "label": None, "error_stage": None, "error_type": None,
            "error_message": None, "status": "record"}
    records = pa.Table.from_pylist([base | {"key": f"k{i}", "member": f"k{i}.jpg", "image": b}
                                    for i, b in enumerate(blobs)], schema=RECORD_SCHEMA)
    pre = Preprocess(image_size=224)
    cpu_pixels, cpu_cols = decode_records(records, pre)
    gpu_pixels, gpu_cols, counts = GpuDecoder(pre, "cuda").decode(records)
    assert gpu_pixels.is_cuda and tuple(gpu_pixels.shape) == (len(blobs), 224, 224, 3)
    assert gpu_cols["status"] == cpu_cols["status"] and gpu_cols["error_type"] == cpu_cols["error_type"]
    # the baseline JPEGs and the grayscale one on the GPU; the rest by the CPU path (a cut JPEG has no
    # end marker, so it goes there too and fails with the CPU path's own error)
    assert counts == {"gpu": len(jpegs) + 1, "cpu": len(fallbacks) + len(bad)}, counts
    ok = [i for i, s in enumerate(cpu_cols["status"]) if s == "ok"]
    engine = TorchEngine(random_checkpoint("vit_b_16"), "fp32", "cuda", 1)
    a, _ = engine.run(cpu_pixels[ok])
    b, _ = engine.run(gpu_pixels[ok])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"GPU vs CPU decode: embedding cosine min {cos.min():.6f} mean {cos.mean():.6f}; "
          f"mean abs pixel diff {np.abs(gpu_pixels[ok].cpu().numpy().astype(int) - cpu_pixels[ok]).mean():.2f}")
    assert cos.min() >= 0.999, cos


@pytest.mark.parametrize("decode", ["auto", "cpu"])
def test_a_job_on_the_gpu_matches_cpu_fp32(digits, tmp_path, decode):
    """`vitpipe run` as a user runs it (a fresh local Ray that finds the GPU): one GPU actor that
    decodes on its GPU (decode auto; CPU decode actors with decode cpu), the gate inside the GPU
    actor (engine.gate.placement auto), and rows that agree with torch fp32 on CPU."""
    if decode == "auto":
        pytest.importorskip("torchvision", reason="GPU decoding uses torchvision's nvJPEG (on GPU nodes only)")
    ckpt, jpegs, images = digits
    write_shards(jpegs, str(tmp_path / "in"), n_shards=4)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "name": "gpu-test", "source": {"uri": str(tmp_path / "in")}, "model": {"checkpoint": "builtin:digits"},
        "engine": {"precision": "fp16", "batch_size": 128, "decode": decode}, "outputs": {"top_k": 1},
        "output": {"uri": str(tmp_path / "out")}, "ray": {"progress": False},
    }))
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    report = manifest["report"]
    assert report["engine"] == "torch-cuda-fp16" and report["actors"] == 1
    if decode == "auto":
        assert report["decode_actors"] == 0 and report["decoded_gpu"] == len(jpegs) and report["fallback_cpu"] == 0
        assert report["decoder"].startswith("GPU")
    else:
        assert report["decode_actors"] >= 1 and report["decoded_gpu"] == 0
    assert report["ok_rows"] == len(jpegs) and report["error_rows"] == 0
    check = manifest["engine_check"]
    assert check["gate"]["passed"] and "cuda" in check["engine"]  # checked on the actor's GPU
    table = pq.read_table(sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet")),
                          columns=["key", "embedding", "topk_ids"])
    rows = {k: (e, t) for k, e, t in zip(table["key"].to_pylist(), table["embedding"].to_pylist(),
                                          table["topk_ids"].to_pylist(), strict=True)}
    assert len(rows) == len(jpegs)
    ref_emb, ref_logits = TorchEngine(ckpt, "fp32", "cpu", 2).run(images)
    keys = [f"digits-{j:06d}" for j in range(len(jpegs))]  # write_shards' keys
    got = np.array([rows[k][0] for k in keys], dtype=np.float32)
    cos = (got * ref_emb).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref_emb, axis=1))
    assert cos.min() > 0.995, cos.min()
    agree = np.mean([rows[k][1][0] == int(i) for k, i in zip(keys, ref_logits.argmax(1), strict=True)])
    assert agree >= 0.99, agree
