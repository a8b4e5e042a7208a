"""The calibration step for INT8: an fp32 ONNX graph + the job's own images -> a Q/DQ graph.

Why explicit Q/DQ rather than TensorRT's old calibrator classes: TensorRT 10 deprecates
implicit quantization (IInt8Calibrator) and strongly typed networks, the only kind 11.x
builds, take their INT8 precision from QuantizeLinear/DequantizeLinear nodes in the
graph. So quantization happens here, once, before any builder runs, with ONNX Runtime's
static quantizer (a library made for exactly this), and the resulting graph is:

- run as is by ONNX Runtime (the `onnx` backend: INT8 kernels on CPU, tested in CI), and
- handed to the TensorRT builder (tensorrt_engine.py), which fuses each Q/DQ pair into an
  INT8 kernel.

Layout TensorRT expects: symmetric scales (zero point 0) for activations and weights,
per-channel scales for weights, only the compute-heavy ops (MatMul, Gemm, Conv) quantized;
biases, normalization, softmax and layer norms stay in floating point (TensorRT has no int32
DequantizeLinear for quantized biases).

FP8 is not offered: ONNX Runtime's quantizer calibrates float8 only with its std-based
"Distribution" method, which clipped this ViT's activations to a mean cosine of 0.93 vs fp32
in our trial; FP8 wants amax calibration (e.g. NVIDIA ModelOpt), left for a GPU machine.

The activation ranges come from `images`: the first decodable images of the job's own
shards (predict.calibration_images). The gate then checks the quantized engine against
torch fp32 on *other* images of the same job, so a poor calibration refuses to run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np

from pipeline.engines.onnx_engine import INPUT

QUANTIZED = ("int8",)
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
CALIBRATION_BATCH = 16


def calibration_id(images: np.ndarray) -> str:
    """A short digest of the calibration batch: part of the cache key of a quantized engine."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def quantize_onnx(onnx_fp32: bytes, images: np.ndarray, precision: str) -> bytes:
    """Insert int8 Q/DQ nodes with activation ranges (min/max) measured on `images` (N, S, S, 3) uint8."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if precision not in QUANTIZED:
        raise ValueError(f"quantize_onnx: precision {precision!r} is not one of {QUANTIZED}")
    if len(images) == 0:
        raise ValueError(f"engine.precision {precision} needs calibration images, but the job's first shards "
                         "held no decodable image; check source.uri")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory(prefix="vitpipe-quant-") as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, f"{precision}.onnx")
        with open(src, "wb") as f:
            f.write(onnx_fp32)
        # quantize_static logs "consider pre-processing" on the root logger; its pre-processing
        # (shape inference + ORT optimizations) adds transposes and buys nothing on this graph.
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                src, dst, Batches(), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
        finally:
            root.setLevel(level)
        with open(dst, "rb") as f:
            return f.read()
