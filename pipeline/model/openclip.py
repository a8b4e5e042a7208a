"""OpenAI CLIP state dicts and open_clip checkpoints -> our ViT (image tower only). (in progress)"""

from __future__ import annotations

import torch


def is_openai_or_open_clip(sd: dict[str, torch.Tensor]) -> bool:
    return False
