"""ONNX export of our ViT (uint8 in, embeddings and logits out) and the ONNX Runtime backend.

The same graph is what TensorRT consumes (tensorrt_engine.py), so the ONNX Runtime
tests here check, on any machine, everything up to the TensorRT builder.

Precision lives in the graph: TensorRT 11 networks are strongly typed (no FP16
builder flag), so an fp16/bf16 engine is built from a graph exported in fp16/bf16.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from pipeline.engines.base import EngineInfo, as_numpy
from pipeline.engines.torch_engine import DTYPES, UInt8ViT
from pipeline.model.checkpoints import Checkpoint

INPUT, OUTPUTS = "images", ("embeddings", "logits")
OPSET = 18


def export_onnx(ckpt: Checkpoint, path: str, precision: str = "fp32") -> str:
    """Write the model, normalization included, as ONNX with a dynamic batch axis.

    precision is fp32, bf16 or fp16; int8/fp8 graphs are made from the fp32 one by quantize.py."""
    model = UInt8ViT(ckpt, DTYPES[precision]).eval()
    S = ckpt.preprocess.image_size
    example = torch.zeros(2, S, S, 3, dtype=torch.uint8)  # (B, S, S, 3)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), path, input_names=[INPUT], output_names=list(OUTPUTS),
                      dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True,
                      external_data=False, verbose=False)
    return path


def onnx_bytes(ckpt: Checkpoint, precision: str = "fp32") -> bytes:
    with tempfile.TemporaryDirectory(prefix="vitpipe-onnx-") as d:
        path = export_onnx(ckpt, os.path.join(d, "model.onnx"), precision)
        with open(path, "rb") as f:
            return f.read()


def ort_providers(device: str) -> list[str]:
    """CUDA (or TensorRT's ORT provider) where the installed onnxruntime has it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"engine.device is cuda but onnxruntime has no CUDA provider (has {available})")
    return ["CPUExecutionProvider"]


class OnnxEngine:
    def __init__(self, ckpt: Checkpoint, precision: str = "fp32", device: str = "auto", threads: int = 1,
                 model_bytes: bytes | None = None):
        import onnxruntime as ort

        if precision == "fp8":
            raise ValueError("engine.precision fp8 runs only as a TensorRT engine (backend tensorrt or auto)")
        if model_bytes is None and precision not in DTYPES:
            raise ValueError(f"an {precision} ONNX graph is made by the calibration step: use build_engine "
                             "with calibration images")
        providers = ort_providers(device)
        if precision in ("bf16", "fp16") and providers[0] == "CPUExecutionProvider":
            raise ValueError(f"engine.backend onnx runs {precision} only on a GPU; on CPU use fp32 or int8 "
                             "(or backend torch for bf16)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_bytes or onnx_bytes(ckpt, precision), opts, providers=providers)
        self.embed_dim = ckpt.config.embed_dim
        self.num_classes = ckpt.config.num_classes
        dev = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        self.info = EngineInfo("onnx", dev, precision, threads, ort.__version__)

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(as_numpy(images), dtype=np.uint8)  # (B, S, S, 3)
        emb, logits = self.session.run(list(OUTPUTS), {INPUT: x})
        return emb.astype(np.float32), logits.astype(np.float32)
