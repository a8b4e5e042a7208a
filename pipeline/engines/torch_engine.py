"""The PyTorch backend: CPU or CUDA, fp32 / bf16 / fp16, optional torch.compile."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline.engines.base import EngineInfo, normalization_constants
from pipeline.model.checkpoints import Checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UInt8ViT(nn.Module):
    """uint8 (B, S, S, 3) -> (embeddings, logits): normalization is part of the model.

    The same module is what gets exported to ONNX (and so to TensorRT), so every
    backend takes 1 byte per pixel from the host.
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vit = ckpt.build().to(dtype)
        scale, shift = normalization_constants(ckpt)
        self.register_buffer("scale", torch.from_numpy(scale).to(dtype))  # (1, 3, 1, 1)
        self.register_buffer("shift", torch.from_numpy(shift).to(dtype))  # (1, 3, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> the ViT's input (B, 3, S, S) in its dtype."""
        return images.permute(0, 3, 1, 2).to(self.scale.dtype) * self.scale + self.shift

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, logits = self.vit(self.normalize(images))  # (B, D), (B, C)
        return emb.float(), logits.float()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is cuda but torch sees no CUDA GPU; use device: auto or cpu")
    return device


class TorchEngine:
    def __init__(self, ckpt: Checkpoint, precision: str = "fp32", device: str = "auto", threads: int = 1,
                 compile: bool = False):
        device = resolve_device(device)
        if precision == "fp16" and device == "cpu":
            raise ValueError("engine.precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
        if device == "cpu":
            # Ray sets OMP threads to the actor's CPU share; make torch agree explicitly.
            torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model = UInt8ViT(ckpt, DTYPES[precision]).to(self.device).eval()
        if compile:
            self.model = torch.compile(self.model, dynamic=True)
        self.embed_dim = ckpt.config.embed_dim
        self.num_classes = ckpt.config.num_classes
        self.info = EngineInfo("torch", str(self.device), precision, torch.get_num_threads(), torch.__version__)

    @torch.inference_mode()
    def run(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8, in host memory or already on this engine's GPU."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda" and x.device.type != "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        emb, logits = self.model(x)  # (B, D), (B, C) float32
        return emb.cpu().numpy(), logits.cpu().numpy()
