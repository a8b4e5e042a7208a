"""The calibration step for INT8 and FP8: an fp32 ONNX graph + the job's own images -> a Q/DQ graph.

Why explicit Q/DQ rather than TensorRT's old calibrator classes: TensorRT 10 deprecates
implicit quantization (IInt8Calibrator) and strongly typed networks, the only kind 11.x
builds, take their INT8/FP8 precision from QuantizeLinear/DequantizeLinear nodes in the
graph. So quantization happens here, once, before any builder runs, with ONNX Runtime's
static quantizer (a library made for exactly this), and the resulting graph is:

- run as is by ONNX Runtime (the `onnx` backend: INT8 kernels on CPU, tested in CI), and
- handed to the TensorRT builder (tensorrt_engine.py), which fuses each Q/DQ pair into an
  INT8 or FP8 kernel.

Layout TensorRT expects: symmetric scales (zero point 0) for activations and weights,
per-channel scales for weights, only the compute-heavy ops (MatMul, Gemm) quantized;
biases, normalization, softmax and layer norms stay in floating point (TensorRT has no int32
DequantizeLinear for quantized biases).

INT8 uses ONNX Runtime's static quantizer (min/max calibration, per-channel weights). FP8
(e4m3, for TensorRT on compute capability >= 8.9) inserts its Q/DQ pairs here with amax
scales (amax / 448, per tensor), the activation amax measured by ONNX Runtime's min/max
calibrator: ONNX Runtime's own float8 quantizer only offers its std-based "Distribution"
calibration, which clipped the digits ViT to a mean cosine of 0.93 vs fp32 in our trial,
where amax scales give 0.9992.

The activation ranges come from `images`: the first decodable images of the job's own
shards (gate.gate_images). The gate then checks the quantized engine against
torch fp32 on *other* images of the same job, so a poor calibration refuses to run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np

from pipeline.engines.onnx_engine import INPUT

QUANTIZED = ("int8", "fp8")
E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value
# The patch embedding (the one Conv) stays in floating point, as the first layer of a quantized
# network usually does: it is ~1/(4 x depth) of the compute, and with onnxruntime 1.29-1.32 and
# the current exporter, quantizing it took the digits model's int8 gate from cosine 0.9989 to
# 0.917 (min 0.50) on held-out images.
QUANTIZED_OPS = ["MatMul", "Gemm"]
CALIBRATION_BATCH = 16


def calibration_id(images: np.ndarray) -> str:
    """A short digest of the calibration batch: part of the cache key of a quantized engine."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def quantize_onnx(onnx_fp32: bytes, images: np.ndarray, precision: str) -> bytes:
    """Insert int8 or fp8 Q/DQ nodes with activation ranges measured on `images` (N, S, S, 3) uint8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if precision not in QUANTIZED:
        raise ValueError(f"quantize_onnx: precision {precision!r} is not one of {QUANTIZED}")
    if len(images) == 0:
        raise ValueError(f"engine.precision {precision} needs calibration images, but the job's first shards "
                         "held no decodable image; check source.uri")

    with tempfile.TemporaryDirectory(prefix="vitpipe-quant-") as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, f"{precision}.onnx")
        with open(src, "wb") as f:
            f.write(onnx_fp32)
        if precision == "fp8":
            return _fp8_qdq(onnx_fp32, _activation_amax(src, images, d))
        # quantize_static logs "consider pre-processing" on the root logger; its pre-processing
        # (shape inference + ORT optimizations) adds transposes and buys nothing on this graph.
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                src, dst, _batches(images), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
        finally:
            root.setLevel(level)
        with open(dst, "rb") as f:
            return f.read()


def _batches(images: np.ndarray):
    """The images as ONNX Runtime's CalibrationDataReader (built here: onnxruntime is an optional extra)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch)}

    return Batches()


def _activation_amax(model_path: str, images: np.ndarray, workdir: str) -> dict[str, float]:
    """max |x| of every input of the quantized ops, over the calibration images."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(model_path, QUANTIZED_OPS, os.path.join(workdir, "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    calibrator.collect_data(_batches(images))
    ranges = calibrator.compute_data().data
    return {name: max(float(np.abs(r.range_value[0]).max()), float(np.abs(r.range_value[1]).max()))
            for name, r in ranges.items()}


def _fp8_qdq(onnx_fp32: bytes, amax: dict[str, float]) -> bytes:
    """Both inputs of every MatMul/Gemm go through QuantizeLinear -> DequantizeLinear in
    float8 e4m3 with scale amax / 448 (weights: their own amax). Opset 19 has float8 Q/DQ."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(onnx_fp32)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    zero = helper.make_tensor("fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph.initializer.append(zero)
    replaced: dict[str, str] = {}  # tensor -> its dequantized copy (a tensor read by two ops is quantized once)
    nodes = []
    for node in graph.node:
        for j, name in enumerate(list(node.input)[:2] if node.op_type in QUANTIZED_OPS else []):
            if name not in replaced:
                if name in weights:
                    peak = float(np.abs(numpy_helper.to_array(weights[name])).max())
                elif name in amax:
                    peak = amax[name]
                else:
                    continue
                scale = helper.make_tensor(f"{name}/fp8_scale", TensorProto.FLOAT, [], [max(peak, 1e-12) / E4M3_MAX])
                graph.initializer.append(scale)
                q, dq = f"{name}/fp8_q", f"{name}/fp8_dq"
                nodes.append(helper.make_node("QuantizeLinear", [name, scale.name, zero.name], [q], name=q))
                nodes.append(helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=dq))
                replaced[name] = dq
            node.input[j] = replaced[name]
        nodes.append(node)  # Q/DQ right before their first reader: the producer already came earlier
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    onnx.checker.check_model(model)
    return model.SerializeToString()
