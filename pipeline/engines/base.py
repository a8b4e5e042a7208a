"""One small interface for every backend: uint8 images in, embeddings and logits out.

Engines take (B, S, S, 3) uint8 and normalize on their own device, so that the
pipeline moves 1 byte per pixel between stages, never 4. Images are a numpy array,
or a torch tensor already on the engine's GPU (decoded there, decode_gpu.py).
This module is the interface only; build.py picks and builds a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.model.checkpoints import Checkpoint


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "torch", "onnx", "tensorrt"
    device: str  # "cpu", "cuda:0"
    precision: str  # "fp32", "bf16", "fp16", "int8", "fp8"
    threads: int
    version: str  # the backend library's version, for caches and provenance

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.device}-{self.precision}"


class Engine(Protocol):
    info: EngineInfo
    embed_dim: int
    num_classes: int

    def run(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 -> (embeddings (B, D) float32, logits (B, C) float32)."""
        ...


def normalization_constants(ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """(x / 255 - mean) / std == x * scale + shift, per channel; shapes (1, 3, 1, 1)."""
    mean = np.asarray(ckpt.preprocess.mean, dtype=np.float32)
    std = np.asarray(ckpt.preprocess.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1)
    shift = (-mean / std).reshape(1, 3, 1, 1)
    return scale, shift


@dataclass
class BuiltEngine:
    engine: Engine
    backend: str
    reason: str  # why this backend (for `auto`), and what the cache did
    cache: str = ""


def run_in_calls(engine: Engine, images: Any, size: int, pad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run (N, S, S, 3) images through the engine `size` at a time -> (N, D), (N, C).

    The call size is fixed for the whole job (engine.batch_size, by default 32 on a CPU and
    256 on a GPU): measuring sizes on the job's first batches made those batches slower, and
    the first rows later. With `pad` (GPUs) a short last call is padded to the full size, so
    every call has one shape: kernel selection, torch.compile and a TensorRT profile work
    per shape."""
    embs, logits = [], []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]  # (b, S, S, 3), b <= size
        n = len(chunk)
        if pad and n < size:
            chunk = _padded(chunk, size)  # (size, S, S, 3)
        e, lg = engine.run(chunk)
        embs.append(e[:n])
        logits.append(lg[:n])
    if len(embs) == 1:
        return embs[0], logits[0]
    if not embs:
        return (np.zeros((0, engine.embed_dim), np.float32), np.zeros((0, max(engine.num_classes, 1)), np.float32))
    return np.concatenate(embs), np.concatenate(logits)


def _padded(chunk: Any, size: int) -> Any:
    if isinstance(chunk, np.ndarray):
        return np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    import torch

    return torch.cat([chunk, chunk.new_zeros((size - len(chunk), *chunk.shape[1:]))])


def as_numpy(images: Any) -> np.ndarray:
    """Host memory for engines that take numpy only (ONNX Runtime)."""
    return images if isinstance(images, np.ndarray) else images.cpu().numpy()
