"""TensorRT backend: ONNX (from onnx_engine.export_onnx) -> serialized engine -> inference on CUDA.

Written against the TensorRT 10.x / 11.x Python API:
- networks are strongly typed (11.x: always; 10.x: the STRONGLY_TYPED creation flag), so
  precision comes from the ONNX graph, which we export in the precision asked for;
- one optimization profile over the batch axis (min 1, opt = max = the job's batch size);
- a timing cache, kept beside the engine in the cache, makes rebuilds fast;
- IO through torch CUDA tensors (set_tensor_address + execute_async_v3 on torch's stream).

Engines are only deserialized from bytes this code built and whose sha256 the cache
checked (cache.py): a TensorRT plan is executable code for the GPU.

Not run in this project's CI (no GPU, and TensorRT's wheels download from NVIDIA's own
index): tests/test_engines.py runs it where `tensorrt` and a CUDA GPU exist.
"""

from __future__ import annotations

import numpy as np

from pipeline.engines.base import EngineInfo
from pipeline.engines.onnx_engine import INPUT, OUTPUTS
from pipeline.model.checkpoints import Checkpoint


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) where TensorRT and a CUDA GPU are usable, else (False, why not)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"tensorrt is not installed ({e})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    return True, trt.__version__


def build_engine_bytes(onnx: bytes, max_batch: int, timing_cache: bytes | None = None,
                       workspace_gb: float = 4.0) -> tuple[bytes, bytes]:
    """Build a serialized engine from ONNX; returns (engine plan, updated timing cache)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 11:  # 11.x is always strongly typed and deprecates the flag
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shape = tuple(network.get_input(0).shape)  # (-1, S, S, 3)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (1, *shape[1:]), (max_batch, *shape[1:]), (max_batch, *shape[1:]))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


class TensorRTEngine:
    def __init__(self, ckpt: Checkpoint, plan: bytes, precision: str, max_batch: int):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.max_batch = max_batch
        self.embed_dim = ckpt.config.embed_dim
        self.num_classes = ckpt.config.num_classes
        self.info = EngineInfo("tensorrt", "cuda", precision, 1, trt.__version__)

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 in host memory, or a torch tensor already on the GPU (decoded there)."""
        torch = self.torch
        embs, logits = [], []
        self.stream.wait_stream(torch.cuda.current_stream())  # images decoded on torch's stream are ready
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            with torch.cuda.stream(self.stream):
                if isinstance(chunk, torch.Tensor):
                    x = chunk.cuda(non_blocking=True).contiguous()  # (B, S, S, 3) uint8
                else:
                    x = torch.from_numpy(np.ascontiguousarray(chunk)).pin_memory().cuda(non_blocking=True)
                B = x.shape[0]
                outs = {
                    OUTPUTS[0]: torch.empty((B, self.embed_dim), dtype=torch.float32, device="cuda"),
                    OUTPUTS[1]: torch.empty((B, max(self.num_classes, 1)), dtype=torch.float32, device="cuda"),
                }
                self.context.set_input_shape(INPUT, tuple(x.shape))
                self.context.set_tensor_address(INPUT, x.data_ptr())
                for name, t in outs.items():
                    self.context.set_tensor_address(name, t.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                embs.append(outs[OUTPUTS[0]].cpu())
                logits.append(outs[OUTPUTS[1]][:, : self.num_classes].cpu())
        self.stream.synchronize()
        return torch.cat(embs).numpy(), torch.cat(logits).numpy()
