"""The PyTorch backend: CPU or CUDA, fp32 / bf16 / fp16."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.engines.base import EngineInfo, normalization_constants
from pipeline.model.checkpoints import Checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is cuda but torch sees no CUDA GPU; use device: auto or cpu")
    return device


class TorchEngine:
    def __init__(self, ckpt: Checkpoint, precision: str = "fp32", device: str = "auto", threads: int = 1):
        device = resolve_device(device)
        if precision == "fp16" and device == "cpu":
            raise ValueError("engine.precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
        if device == "cpu":
            # Ray sets OMP threads to the actor's CPU share; make torch agree explicitly.
            torch.set_num_threads(max(1, threads))
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        self.model = ckpt.build().to(self.device, self.dtype)
        scale, shift = normalization_constants(ckpt)
        self.scale = torch.from_numpy(scale).to(self.device, self.dtype)
        self.shift = torch.from_numpy(shift).to(self.device, self.dtype)
        self.embed_dim = ckpt.config.dim
        self.num_classes = ckpt.config.num_classes
        self.info = EngineInfo("torch", str(self.device), precision, torch.get_num_threads(), torch.__version__)

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images))  # (B, S, S, 3) uint8
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.dtype) * self.scale + self.shift  # (B, 3, S, S)
        emb, logits = self.model(x)  # (B, D), (B, C)
        return emb.float().cpu().numpy(), logits.float().cpu().numpy()
