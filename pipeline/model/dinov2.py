"""The DINOv2 repository's own .pth files -> our ViT. (in progress)"""

from __future__ import annotations

import torch


def is_dinov2_original(sd: dict[str, torch.Tensor]) -> bool:
    return False
