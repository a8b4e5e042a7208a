"""Which backend runs a job's engine, and building it: compiled artifacts come from, and go
to, the engine cache. The backends import base.py only; this module imports them."""

from __future__ import annotations

import numpy as np

from pipeline.engines.base import BuiltEngine
from pipeline.engines.quantize import QUANTIZED
from pipeline.model.checkpoints import Checkpoint


def gpu_capability() -> str | None:
    """"sm_90" for the visible CUDA GPU, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def resolve_backend(backend: str, precision: str, device: str) -> tuple[str, str]:
    """The backend to use on this worker, and why (for the report)."""
    gpu = device != "cpu" and gpu_capability() is not None
    if backend != "auto":
        return backend, "asked for in the job spec"
    if precision == "fp8":
        return "tensorrt", "auto: fp8 runs only as a TensorRT engine"
    if gpu:
        from pipeline.engines.tensorrt_engine import tensorrt_available

        ok, why = tensorrt_available()
        if ok:
            return "tensorrt", f"auto: CUDA GPU and TensorRT {why} present"
        return "torch", f"auto: CUDA GPU present, TensorRT not usable ({why}); torch CUDA"
    if precision == "fp32" and _has_onnxruntime():
        return "onnx", "auto: CPU fp32, ONNX Runtime measured faster than torch on CPU (see benchmarks/)"
    if precision == "int8":
        return "onnx", "auto: CPU int8, ONNX Runtime's INT8 kernels on the calibrated Q/DQ graph"
    return "torch", f"auto: CPU {precision}: torch (ONNX Runtime has no fast {precision} CPU kernels)"


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def build_engine(ckpt: Checkpoint, backend: str, precision: str, device: str, threads: int,
                 max_batch: int = 32, cache_uri: str | None = None, compile: bool = False,
                 calibration: np.ndarray | None = None) -> BuiltEngine:
    """The engine a job spec asks for; compiled artifacts come from (and go to) the engine cache.

    `calibration` (N, S, S, 3) uint8 is needed for int8/fp8 only: the activation ranges of the
    Q/DQ graph are measured on it (quantize.py), and its digest is part of the cache key.
    """
    backend, reason = resolve_backend(backend, precision, device)
    if backend == "torch":
        if precision in QUANTIZED:
            raise ValueError(f"engine.precision {precision} is not available on backend torch; "
                             "use backend onnx (CPU or GPU) or tensorrt (GPU), or backend auto")
        from pipeline.engines.torch_engine import TorchEngine

        return BuiltEngine(TorchEngine(ckpt, precision, device, threads, compile=compile), backend, reason)

    if backend not in ("onnx", "tensorrt"):
        raise ValueError(f"engine.backend {backend!r} is not available; allowed: auto, torch, onnx, tensorrt")
    if backend == "tensorrt":  # refuse before any export or calibration work
        trt_version, cc = _tensorrt_target(precision)

    from pipeline.engines.cache import CacheKey, EngineCache
    from pipeline.engines.onnx_engine import onnx_bytes

    cache = EngineCache(cache_uri)
    model_id = ckpt.model_id
    graph_precision = "fp32" if precision in QUANTIZED else precision  # quantized from the fp32 graph
    fp32_or_half = cache.get_or_build(CacheKey(model_id, "onnx", _version("torch"), graph_precision, 0, "any"),
                                      lambda: onnx_bytes(ckpt, graph_precision))
    graph, variant, status = fp32_or_half.data, precision, f"onnx graph: {fp32_or_half.status}"
    if precision in QUANTIZED:
        from pipeline.engines.quantize import calibration_id, quantize_onnx

        if calibration is None:
            raise ValueError(f"engine.precision {precision} needs calibration images from the job's inputs")
        variant = f"{precision}-cal{calibration_id(calibration)}"
        qdq = cache.get_or_build(CacheKey(model_id, "onnx-qdq", _version("onnxruntime"), variant, 0, "any"),
                                 lambda: quantize_onnx(fp32_or_half.data, calibration, precision))
        graph = qdq.data
        status += f"; {precision} Q/DQ graph ({len(calibration)} calibration images): {qdq.status}"
    if backend == "onnx":
        from pipeline.engines.onnx_engine import OnnxEngine

        return BuiltEngine(OnnxEngine(ckpt, precision, device, threads, model_bytes=graph), backend, reason, status)

    from pipeline.engines.tensorrt_engine import TensorRTEngine, build_engine_bytes

    # One timing cache per TensorRT version and GPU type, shared by every model and batch size:
    # ViT-S and ViT-B reuse each other's kernel timings, so a second build takes far less time.
    timing_key = CacheKey("any-model", "tensorrt-timing-cache", trt_version, "any", 0, cc)

    def build_plan() -> bytes:
        timing, _ = cache.load(timing_key)
        plan, timing = build_engine_bytes(graph, max_batch, timing_cache=timing)
        cache.put(timing_key, timing)
        return plan

    plan = cache.get_or_build(CacheKey(model_id, "tensorrt", trt_version, variant, max_batch, cc), build_plan)
    engine = TensorRTEngine(ckpt, plan.data, precision, max_batch)
    return BuiltEngine(engine, backend, reason, f"{status}; plan: {plan.status}")


def _tensorrt_target(precision: str) -> tuple[str, str]:
    """(TensorRT version, GPU compute capability) where a TensorRT engine of `precision` can run here."""
    from pipeline.engines.tensorrt_engine import tensorrt_available

    ok, version = tensorrt_available()
    if not ok:
        if precision == "fp8":
            raise RuntimeError(f"engine.precision fp8 needs TensorRT on a GPU, not usable here: {version}; "
                               "use fp32 or bf16 (or int8 with backend onnx) on this machine")
        raise RuntimeError(f"engine.backend tensorrt is not usable here: {version}; use backend auto or torch")
    cc = gpu_capability() or "none"
    if precision == "fp8" and (cc == "none" or int(cc[3:]) < 89):
        raise ValueError(f"engine.precision fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell); this one is {cc}; use int8, fp16 or bf16")
    return version, cc



def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
