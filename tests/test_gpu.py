"""On a CUDA GPU: torch fp16/bf16 engines, torch.compile, and a whole job through the GPU layout.

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


def test_a_job_on_the_gpu_decodes_on_cpu_actors_and_matches_cpu_fp32(digits, tmp_path):
    """`vitpipe run` as a user runs it (a fresh local Ray that finds the GPU): one GPU actor,
    decode actors on the CPUs, the gate inside the GPU actor (engine.gate.placement auto), and
    rows that agree with torch fp32 on CPU."""
    ckpt, jpegs, images = digits
    write_shards(jpegs, str(tmp_path / "in"), n_shards=4)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "name": "gpu-test", "source": {"uri": str(tmp_path / "in")}, "model": {"checkpoint": "builtin:digits"},
        "engine": {"precision": "fp16", "batch_size": 128}, "outputs": {"top_k": 1},
        "output": {"uri": str(tmp_path / "out")}, "ray": {"progress": False},
    }))
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    report = manifest["report"]
    assert report["engine"] == "torch-cuda-fp16" and report["actors"] == 1 and report["decode_actors"] >= 1
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
