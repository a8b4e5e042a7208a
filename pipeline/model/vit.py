"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021).

Read top to bottom: patches -> tokens, a class token and learned position
embeddings in front, `depth` pre-norm Transformer blocks, a final LayerNorm, then
a pooled embedding and a linear head. Nothing here knows about Ray, files or
uint8 images: the engine normalizes pixels and calls `ViT.forward`.

The families people embed with are this same encoder with a few switches (as timm's
VisionTransformer and big_vision's vit.py do it), each named as its paper names it:

- DeiT distilled: a distillation token beside the class token; logits = mean of two heads.
- CLIP image tower: no patch-embedding bias, a LayerNorm before the encoder ("ln_pre"),
  QuickGELU or GELU, the final norm on the class token, then a projection.
- SigLIP: no class token, position embeddings for the patches only, tanh GELU, and the
  multihead attention-pooling (MAP) head as the embedding.
- DINOv2: LayerScale, register tokens (no position embedding), SwiGLU for giant, and
  position embeddings interpolated as its reference does.

Token layout everywhere: [class?, distillation?, registers..., patches].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Pooling = Literal["cls", "gap", "cls+gap", "map"]


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
    # What the embedding is: the class token, the mean of the patch tokens, both concatenated
    # (DINOv2's linear-probe convention), or the attention-pooling head (SigLIP).
    pooling: Pooling = "cls"
    # what the head was trained on (the checkpoint's pooling); None: the same as `pooling`. The
    # head always sees it, whatever the embedding is: a class-token head fed a patch mean agreed
    # with transformers on 1 of 12 labels.
    head_pooling: Pooling | None = None
    qkv_bias: bool = True
    # timm and the JAX originals use 1e-6; Hugging Face ViT uses 1e-12.
    layer_norm_eps: float = 1e-6
    # timm's avg-pool models normalize after pooling (its `fc_norm`); the paper's GAP before.
    fc_norm: bool = False
    # --- the families' switches; the defaults are the paper's ViT ---------------------------
    family: Literal["vit", "deit", "clip", "siglip", "dinov2"] = "vit"
    class_token: bool = True  # SigLIP has none
    distill_token: bool = False  # DeiT distilled: a second prefix token with its own head
    registers: int = 0  # DINOv2 with registers: extra tokens without position embeddings
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    pre_norm: bool = False  # CLIP: a LayerNorm on the tokens before the first block
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    ffn: Literal["mlp", "swiglu"] = "mlp"  # DINOv2 giant: SwiGLU (mlp_dim is its hidden width)
    layer_scale: bool = False  # DINOv2: a learned per-channel scale on each residual branch
    proj_dim: int = 0  # CLIP: a linear projection (no bias) of the pooled token; 0: none
    # How position embeddings are resized to another grid, as each reference does it:
    # bicubic (transformers ViT/CLIP/SigLIP/DeiT/DINOv2), bicubic_aa (antialiased: transformers'
    # DINOv2 with registers, timm, the DINOv2 repository's register models), dinov2 (the
    # DINOv2 repository's models without registers: scale factor (g + 0.1) / G, no antialias).
    pos_interp: Literal["bicubic", "bicubic_aa", "dinov2"] = "bicubic"
    # Zero-shot labels (zeroshot.py): the head holds the class names' text embeddings times the
    # logit scale, and sees the L2-normalized embedding, so its logits are scale * cosine (+ bias);
    # `scores` says how logits become the top-k scores: CLIP's softmax, SigLIP's per-class sigmoid.
    head_on_embedding: bool = False
    scores: Literal["softmax", "sigmoid"] = "softmax"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pos_tokens(self) -> int:
        """Prefix tokens that carry a position embedding (registers do not)."""
        return int(self.class_token) + int(self.distill_token)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers."""
        return self.pos_tokens + self.registers

    @property
    def embed_dim(self) -> int:
        """Width of the embedding the pipeline writes."""
        width = self.proj_dim or self.dim
        return 2 * width if self.pooling == "cls+gap" else width

    def to_dict(self) -> dict:
        return asdict(self)

    def id_dict(self) -> dict:
        """The fields a model id hashes: those added since ids were first written are left out
        at their defaults, so the paper's ViT keeps the id (and the ledger entries) it had."""
        first = {"image_size", "patch_size", "in_chans", "dim", "depth", "heads", "mlp_dim", "num_classes",
                 "pooling", "qkv_bias", "layer_norm_eps", "fc_norm"}
        default = {f.name: f.default for f in fields(ViTConfig)}
        return {k: v for k, v in self.to_dict().items() if k in first or v != default[k]}


# The sizes of the paper (B, L, H), of DeiT (Ti, S), SigLIP's So400m and DINOv2's giant:
# width, depth, heads, MLP width.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}
ARCH_NAMES = sorted(f"vit_{s}_{p}" for s in _SIZES for p in (8, 14, 16, 32))

# Random-weight architectures of the families, with their real widths, depths and heads
# (benchmarks): name -> (size or (dim, depth, heads, mlp), patch, image size, switches).
_FAMILY_ARCHS: dict[str, tuple[str | tuple[int, int, int, int], int, int, dict]] = {
    "clip_b_32": ("b", 32, 224, {"family": "clip", "patch_bias": False, "pre_norm": True, "act": "quick_gelu",
                                 "proj_dim": 512, "num_classes": 0, "layer_norm_eps": 1e-5}),
    "clip_b_16": ("b", 16, 224, {"family": "clip", "patch_bias": False, "pre_norm": True, "act": "quick_gelu",
                                 "proj_dim": 512, "num_classes": 0, "layer_norm_eps": 1e-5}),
    "clip_l_14": ("l", 14, 224, {"family": "clip", "patch_bias": False, "pre_norm": True, "act": "quick_gelu",
                                 "proj_dim": 768, "num_classes": 0, "layer_norm_eps": 1e-5}),
    "siglip_b_16": ("b", 16, 224, {"family": "siglip", "class_token": False, "act": "gelu_tanh",
                                   "pooling": "map", "num_classes": 0}),
    "siglip_so400m_14": ((1152, 27, 16, 4304), 14, 224, {"family": "siglip", "class_token": False,
                                                         "act": "gelu_tanh", "pooling": "map", "num_classes": 0}),
    "dinov2_s_14": ("s", 14, 224, {"family": "dinov2", "layer_scale": True, "num_classes": 0}),
    "dinov2_b_14": ("b", 14, 224, {"family": "dinov2", "layer_scale": True, "num_classes": 0}),
    "dinov2_l_14": ("l", 14, 224, {"family": "dinov2", "layer_scale": True, "num_classes": 0}),
    "dinov2_l_14_reg": ("l", 14, 224, {"family": "dinov2", "layer_scale": True, "registers": 4,
                                       "pos_interp": "bicubic_aa", "num_classes": 0}),
    "dinov2_g_14": ((1536, 40, 24, 4096), 14, 224, {"family": "dinov2", "layer_scale": True, "ffn": "swiglu",
                                                    "num_classes": 0}),
    "deit_s_16_distilled": ("s", 16, 224, {"family": "deit", "distill_token": True}),
    "deit_b_16_distilled": ("b", 16, 224, {"family": "deit", "distill_token": True}),
}
FAMILY_ARCH_NAMES = sorted(_FAMILY_ARCHS)
ALL_ARCH_NAMES = ARCH_NAMES + FAMILY_ARCH_NAMES


def config_for_arch(arch: str, **overrides) -> ViTConfig:
    """`vit_ti_16` -> ViTConfig(dim=192, depth=12, heads=3, patch_size=16, ...); also the families'
    random-weight archs (`clip_b_16`, `siglip_so400m_14`, `dinov2_l_14_reg`, ...)."""
    name = arch.lower()
    if name in _FAMILY_ARCHS:
        size, patch, image, switches = _FAMILY_ARCHS[name]
        dim, depth, heads, mlp_dim = _SIZES[size] if isinstance(size, str) else size
        cfg = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch, image_size=image,
                        **switches)
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    parts = name.split("_")
    if len(parts) != 3 or parts[0] != "vit" or parts[1] not in _SIZES or not parts[2].isdigit():
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ALL_ARCH_NAMES)}")
    dim, depth, heads, mlp_dim = _SIZES[parts[1]]
    cfg = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=int(parts[2]))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to `dim` with one strided conv."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                              bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """GELU (erf), GELU's tanh approximation (SigLIP), or CLIP's QuickGELU x * sigmoid(1.702 x)."""
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


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
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2 giant's MLP: fc1 makes a gate and a value of mlp_dim each; silu(gate) * value."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, 2 * cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # (B, T, H) each
        return self.fc2(F.silu(gate) * value)


class LayerScale(nn.Module):
    """DINOv2 (from CaiT): each residual branch times a learned per-channel gamma."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x)) (each branch LayerScaled in DINOv2)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg) if cfg.ffn == "swiglu" else MLP(cfg)
        self.ls2 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + self.ls1(y)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, attn


class AttentionPool(nn.Module):
    """SigLIP's MAP head: one learned query (the "probe") attends over every token, then
    x + MLP(LN(x)); the result is the image's embedding."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.latent = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.heads
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, h, D // h).transpose(1, 2)  # (B, h, 1, D/h)
        k, v = self.kv(x).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, D/h) each
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)  # (B, 1, D)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, D)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, D)) if cfg.registers else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.pos_tokens + cfg.grid**2, D) * 0.02)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        uses_map = "map" in (cfg.pooling, cfg.head_pooling)
        self.attn_pool = AttentionPool(cfg) if uses_map else None
        self.proj = nn.Linear(D, cfg.proj_dim, bias=False) if cfg.proj_dim else None
        head_in = 2 * D if (cfg.head_pooling or cfg.pooling) == "cls+gap" else D
        head_in = cfg.embed_dim if cfg.head_on_embedding else head_in
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.distill_token and cfg.num_classes > 0 else None
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor, return_attn: bool = False):
        """Normalized pixels (B, 3, H, W) -> final tokens (B, T, D) [+ attention maps],
        T = prefix_tokens + N, in the order [class?, distillation?, registers..., patches]."""
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1)  # (B, pos_tokens + N, D)
        x = x + self._pos_embed_for(x.shape[1] - self.cfg.pos_tokens)
        if self.reg_token is not None:  # registers go after the class token, without positions
            p = self.cfg.pos_tokens
            x = torch.cat([x[:, :p], self.reg_token.expand(B, -1, -1), x[:, p:]], dim=1)  # (B, T, D)
        x = self.norm_pre(x)
        maps = []
        for block in self.blocks:
            x, attn = block(x, return_attn)
            maps.append(attn)
        if not self.cfg.fc_norm:
            x = self.norm(x)
        return (x, maps) if return_attn else x

    def pool(self, tokens: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, D): the class token, the mean of the patch tokens (registers and
        distillation token left out), both concatenated (B, 2D), or the MAP head's output."""
        how = how or self.cfg.pooling
        if how == "map":
            return self.attn_pool(tokens)
        if how == "cls":
            return tokens[:, 0]
        mean = tokens[:, self.cfg.prefix_tokens:].mean(dim=1)  # (B, D)
        mean = self.norm(mean) if self.cfg.fc_norm else mean
        return mean if how == "gap" else torch.cat([tokens[:, 0], mean], dim=-1)  # (B, 2D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized pixels (B, 3, H, W) -> (embedding (B, E), logits (B, C)).

        The embedding is pooled as `pooling` asks (and projected, for CLIP); the head gets what
        it was trained on."""
        tokens = self.forward_features(x)  # (B, T, D)
        pooled = self.pool(tokens)  # (B, D) or (B, 2D)
        emb = self.project(pooled)  # (B, E)
        if self.cfg.head_on_embedding:  # zero-shot: scale * cosine with each class name's text embedding
            return emb, self.head(F.normalize(emb, dim=-1))  # (B, E), (B, C)
        trained = self.cfg.head_pooling or self.cfg.pooling
        logits = self.head(pooled if trained == self.cfg.pooling else self.pool(tokens, trained))  # (B, C)
        if self.head_dist is not None:  # DeiT distilled: the mean of the class and distillation heads
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return emb, logits

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """CLIP's projection into the shared image-text space (per half, for cls+gap)."""
        if self.proj is None:
            return pooled
        return torch.cat([self.proj(p) for p in pooled.split(self.cfg.dim, dim=-1)], dim=-1)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B, heads, T, T) map per block, for analysis (slower than forward)."""
        _, maps = self.forward_features(x, return_attn=True)
        return maps

    def _pos_embed_for(self, n_patches: int) -> torch.Tensor:
        """Position embeddings for `n_patches`, resized from the trained grid when they differ."""
        if n_patches == self.pos_embed.shape[1] - self.cfg.pos_tokens:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, int(math.isqrt(n_patches)), self.cfg.pos_tokens,
                                self.cfg.pos_interp)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, prefix: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Interpolate the (1, prefix + g*g, D) patch grid to new_grid x new_grid; prefix rows kept.

    In float32 whatever the weights' dtype, as every reference does; `mode` is the reference's
    way (see ViTConfig.pos_interp)."""
    prefix_pos, grid_pos = pos_embed[:, :prefix], pos_embed[:, prefix:]
    old_grid = int(math.isqrt(grid_pos.shape[1]))
    if old_grid == new_grid:
        return pos_embed
    D = grid_pos.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    if mode == "dinov2":  # the DINOv2 repository: a scale factor with an offset of 0.1
        scale = (new_grid + 0.1) / old_grid
        grid_pos = F.interpolate(grid_pos, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        grid_pos = F.interpolate(grid_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                                 antialias=mode == "bicubic_aa")
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([prefix_pos, grid_pos], dim=1)  # (1, prefix + G*G, D)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
