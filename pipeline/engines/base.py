"""One small interface for every backend: uint8 images in, embeddings and logits out.

Engines take (B, S, S, 3) uint8 and normalize on their own device, so that the
pipeline moves 1 byte per pixel between stages, never 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.model.checkpoints import Checkpoint


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "torch", "onnx", "tensorrt"
    device: str  # "cpu", "cuda:0"
    precision: str  # "fp32", "bf16", "fp16"
    threads: int
    version: str  # the backend library's version, for caches and provenance

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.device}-{self.precision}"


class Engine(Protocol):
    info: EngineInfo
    embed_dim: int
    num_classes: int

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 -> (embeddings (B, D) float32, logits (B, C) float32)."""
        ...


def normalization_constants(ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """(x / 255 - mean) / std == x * scale + shift, per channel; shapes (1, 3, 1, 1)."""
    mean = np.asarray(ckpt.preprocess.mean, dtype=np.float32)
    std = np.asarray(ckpt.preprocess.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1)
    shift = (-mean / std).reshape(1, 3, 1, 1)
    return scale, shift


def build_engine(ckpt: Checkpoint, backend: str, precision: str, device: str, threads: int) -> Engine:
    """The engine a job spec asks for; imports a backend only when it is used."""
    if backend == "torch":
        from pipeline.engines.torch_engine import TorchEngine

        return TorchEngine(ckpt, precision=precision, device=device, threads=threads)
    raise ValueError(f"engine.backend {backend!r} is not available; allowed: torch")
