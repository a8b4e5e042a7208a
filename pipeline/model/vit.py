"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021).

Read top to bottom: patches -> tokens, a class token and learned position
embeddings in front, `depth` pre-norm Transformer blocks, a final LayerNorm, then
a pooled embedding and a linear head. Nothing here knows about Ray, files or
uint8 images: the engine normalizes pixels and calls `ViT.forward`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_dim: int = 768
    num_classes: int = 1000
    pooling: Literal["cls", "gap"] = "cls"  # what the embedding is
    # what the head was trained on (the checkpoint's pooling); None: the same as `pooling`. The
    # head always sees it, whatever the embedding is: a class-token head fed a patch mean agreed
    # with transformers on 1 of 12 labels.
    head_pooling: Literal["cls", "gap"] | None = None
    qkv_bias: bool = True
    # timm and the JAX originals use 1e-6; Hugging Face ViT uses 1e-12.
    layer_norm_eps: float = 1e-6
    # timm's avg-pool models normalize after pooling (its `fc_norm`); the paper's GAP before.
    fc_norm: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


# The sizes of the paper (B, L, H) and of DeiT (Ti, S): width, depth, heads, MLP width.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}
ARCH_NAMES = sorted(f"vit_{s}_{p}" for s in _SIZES for p in (8, 14, 16, 32))


def config_for_arch(arch: str, **overrides) -> ViTConfig:
    """`vit_ti_16` -> ViTConfig(dim=192, depth=12, heads=3, patch_size=16, ...)."""
    parts = arch.lower().split("_")
    if len(parts) != 3 or parts[0] != "vit" or parts[1] not in _SIZES or not parts[2].isdigit():
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCH_NAMES)}")
    dim, depth, heads, mlp_dim = _SIZES[parts[1]]
    cfg = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=int(parts[2]))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to `dim` with one strided conv."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.dim % cfg.heads == 0, "dim must divide into heads"
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, D/h)
        attn = None
        if return_attn:
            # The explicit form, only when the maps are asked for (SDPA does not return them).
            attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (B, h, N, N)
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        y = y.transpose(1, 2).reshape(B, N, D)
        return self.proj(y), attn


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2 + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor, return_attn: bool = False):
        """Normalized pixels (B, 3, H, W) -> final tokens (B, 1+N, D) [+ attention maps]."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        x = x + self._pos_embed_for(x.shape[1] - 1)
        maps = []
        for block in self.blocks:
            x, attn = block(x, return_attn)
            maps.append(attn)
        if not self.cfg.fc_norm:
            x = self.norm(x)
        return (x, maps) if return_attn else x

    def pool(self, tokens: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """(B, 1+N, D) -> (B, D): the class token, or the mean of the patch tokens."""
        if (how or self.cfg.pooling) == "cls":
            return tokens[:, 0]
        pooled = tokens[:, 1:].mean(dim=1)
        return self.norm(pooled) if self.cfg.fc_norm else pooled

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized pixels (B, 3, H, W) -> (embedding (B, D), logits (B, C)).

        The embedding is pooled as `pooling` asks; the head gets what it was trained on."""
        tokens = self.forward_features(x)  # (B, 1+N, D)
        emb = self.pool(tokens)  # (B, D)
        trained = self.cfg.head_pooling or self.cfg.pooling
        return emb, self.head(emb if trained == self.cfg.pooling else self.pool(tokens, trained))

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B, heads, 1+N, 1+N) map per block, for analysis (slower than forward)."""
        _, maps = self.forward_features(x, return_attn=True)
        return maps

    def _pos_embed_for(self, n_patches: int) -> torch.Tensor:
        """Position embeddings for `n_patches`, resized from the trained grid when they differ."""
        if n_patches == self.pos_embed.shape[1] - 1:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, int(math.isqrt(n_patches)))


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic interpolation of the (1, 1+g*g, D) patch grid to new_grid; class token kept."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = int(math.isqrt(grid_pos.shape[1]))
    if old_grid == new_grid:
        return pos_embed
    D = grid_pos.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1+G*G, D)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
