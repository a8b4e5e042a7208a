"""The DINOv2 repository's own .pth files (facebookresearch/dinov2, dinov2_vit{s,b,l,g}14[_reg4]
_pretrain.pth) -> our ViT.

Their names are timm's but for a few (dinov2/models/vision_transformer.py):

    cls_token (1, 1, D), pos_embed (1, 1 + 37*37, D) (trained at 518 px), register_tokens
    (1, R, D) without positions, mask_token (masked-image training only: dropped),
    patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1/fc2 or SwiGLU's mlp.w12/w3, ls2.gamma} (blocks.c.i.* when built with
    block_chunks > 0), norm.

Positions are resized as the repository's hub models do: without registers by a scale
factor (g + 0.1) / G, not antialiased (interpolate_offset 0.1); with registers to the size,
antialiased (interpolate_offset 0, interpolate_antialias True). The repository evaluates at
224 px after resizing to 256 with ImageNet's mean and std.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.decode import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from pipeline.model.checkpoints import Checkpoint
from pipeline.model.keys import Rules, rename_keys

_RULES: Rules = [
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # block_chunks: blocks.<chunk>.<block>.*
    (r"^register_tokens$", "reg_token"),
]
_SWIGLU: Rules = [
    (r"^blocks\.(\d+)\.mlp\.w12\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"blocks.\1.mlp.fc2."),
]
_DROP = (r"^mask_token$",)


def is_dinov2_original(sd: dict[str, torch.Tensor]) -> bool:
    """The repository's files: a mask_token or register_tokens (timm calls them reg_token and
    keeps no mask token), LayerScale, and the class token's position inside pos_embed."""
    return ("patch_embed.proj.weight" in sd and "cls_token" in sd
            and ("mask_token" in sd or "register_tokens" in sd)
            and any(k.endswith(".ls1.gamma") for k in sd))


def from_dinov2_pth(sd: dict[str, torch.Tensor], uri: str, heads: int | None) -> Checkpoint:
    """A DINOv2 repository .pth -> Checkpoint, run at 224 (positions resized once, at build).

    The head count is not in the weights: `heads`, else dim / 64 (S 6, B 12, L 16, g 24)."""
    from pipeline.model.timm import from_state_dict

    out = rename_keys(sd, _RULES, _DROP)
    out = rename_keys(out, _SWIGLU)
    registers = "reg_token" in out
    ckpt = from_state_dict(out, uri, None, heads=heads or max(1, out["patch_embed.proj.weight"].shape[0] // 64),
                           family="dinov2", pos_interp="bicubic_aa" if registers else "dinov2")
    ckpt.config = replace(ckpt.config, image_size=224)
    ckpt.preprocess = Preprocess(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="crop",
                                 crop_pct=224 / 256)
    return ckpt
