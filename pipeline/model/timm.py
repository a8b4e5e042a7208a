"""timm files -> our ViT: `vit_*`, `deit_*_distilled_*`, `*_dinov2*` and `*_siglip_*` state dicts
(.safetensors, .pth, .bin) and timm models as timm pushes them to the Hub (config.json with
`architecture` and `pretrained_cfg` beside model.safetensors).

vit.py's names are timm's (by design), so this reader mostly reads the switches off the keys
and shapes (`from_state_dict`, which the other readers share once they have renamed).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.decode import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from pipeline.model.checkpoints import Checkpoint
from pipeline.model.keys import CheckpointError, Rules, rename_keys
from pipeline.model.vit import ViTConfig, config_for_arch

_TIMM_RULES: Rules = [
    (r"^head\.fc\.", "head."),  # newer timm heads
    (r"^blocks\.(\d+)\.mlp\.w12\.", r"blocks.\1.mlp.fc1."),  # DINOv2's SwiGLU, as timm once kept it
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"blocks.\1.mlp.fc2."),
]
_TIMM_DROP = (r"^mask_token$",)
# Widths whose head count is not width / 64: ViT-H (16 heads of 80) and SigLIP So400m (16 of 72).
HEADS_BY_WIDTH = {1280: 16, 1152: 16}


def convert_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's VisionTransformer names are ours; drop what we do not use and undo two timm-isms:

    - an avg-pool model's `norm` is an empty placeholder beside `fc_norm`;
    - a DINOv2-with-registers model has no position embedding for its class token
      (`no_embed_class`): timm folded it into cls_token, so a zero row stands for it here."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    out = rename_keys(sd, _TIMM_RULES, _TIMM_DROP)
    if "fc_norm.weight" in out and out.get("norm.weight", torch.empty(1)).numel() == 0:
        out.pop("norm.weight", None)
        out.pop("norm.bias", None)
    prefix = int("cls_token" in out) + int("dist_token" in out)
    if "reg_token" in out and prefix and _is_square(out["pos_embed"].shape[1]) and "patch_embed.proj.weight" in out:
        pos = out["pos_embed"]  # (1, N, D): patches only
        out["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, pos.shape[-1]), pos], dim=1)
    return out


def from_state_dict(sd: dict[str, torch.Tensor], source: str, arch: str | None, heads: int | None = None,
                    resize: str = "crop", **switches: Any) -> Checkpoint:
    """A state dict in our names without a config: the sizes and switches come from the keys
    and shapes; what the weights cannot say (the activation, how positions are resized) comes
    in `switches` from the reader that knows its format.

    The head count is not in the weights: `heads`, else the arch's, else dim / 64 (true of
    every timm and JAX ViT but ViT-H/14, which has 16 heads of 80, SigLIP So400m (16 of 72)
    and DINOv2 giant (24 of 64))."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        first = next(iter(sd), None)
        raise CheckpointError(f"{source}: not a ViT state dict (no patch_embed.proj.weight / pos_embed; "
                              f"first key {first!r})")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    class_token, distill_token = "cls_token" in sd, "dist_token" in sd
    pos_tokens = int(class_token) + int(distill_token)
    grid = math.isqrt(sd["pos_embed"].shape[1] - pos_tokens)
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    heads = heads or (config_for_arch(arch).heads if arch else HEADS_BY_WIDTH.get(dim, max(1, dim // 64)))
    if "attn_pool.latent" in sd:
        pooling = "map"
    elif "fc_norm.weight" in sd or not class_token:
        pooling = "gap"
    else:
        pooling = "cls"
    had_fc_norm = "fc_norm.weight" in sd
    if had_fc_norm:  # timm avg-pool models: no norm on the tokens, fc_norm after pooling
        sd = dict(sd)
        sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    found = dict(class_token=class_token, distill_token=distill_token,
                 registers=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
                 patch_bias="patch_embed.proj.bias" in sd, pre_norm="norm_pre.weight" in sd,
                 layer_scale="blocks.0.ls1.gamma" in sd, ffn="swiglu" if swiglu else "mlp",
                 proj_dim=sd["proj.weight"].shape[0] if "proj.weight" in sd else 0)
    found["family"] = _family(found, pooling)
    cfg = ViTConfig(image_size=grid * patch, patch_size=patch, in_chans=in_chans, dim=dim, depth=depth, heads=heads,
                    mlp_dim=fc2.shape[1], num_classes=num_classes, pooling=pooling, fc_norm=had_fc_norm,
                    qkv_bias="blocks.0.attn.qkv.bias" in sd, **(found | switches))
    pre = Preprocess(image_size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=resize)
    return Checkpoint(cfg, sd, pre, [f"class_{i}" for i in range(num_classes)], source)


def _family(found: dict, pooling: str) -> str:
    if found["distill_token"]:
        return "deit"
    if found["layer_scale"]:
        return "dinov2"
    if pooling == "map" and not found["class_token"]:
        return "siglip"
    if found["pre_norm"] or found["proj_dim"]:
        return "clip"
    return "vit"


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def from_timm_file(sd: dict[str, torch.Tensor], source: str, arch: str | None, heads: int | None) -> Checkpoint:
    """A timm state dict: the family's switches that the weights do not carry, by family."""
    sd = convert_timm_state_dict(sd)
    ckpt = from_state_dict(sd, source, arch, heads)
    family = ckpt.config.family
    if family == "dinov2":  # timm resizes positions antialiased; DINOv2 is normalized as ImageNet
        ckpt.config = _with(ckpt.config, pos_interp="bicubic_aa")
        ckpt.preprocess = Preprocess(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="crop",
                                     crop_pct=224 / 256)
        ckpt.config = _with(ckpt.config, image_size=224, num_classes=ckpt.config.num_classes)
    elif family == "siglip":
        ckpt.config = _with(ckpt.config, act="gelu_tanh")
        ckpt.preprocess = Preprocess(image_size=ckpt.config.image_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                                     resize="squash", interpolation="bilinear")
    elif family == "clip":  # timm's *_clip_* ViTs: LayerNorm eps 1e-5 (not timm's 1e-6), OpenAI's mean/std
        from pipeline.model.openclip import OPENAI_MEAN, OPENAI_STD

        ckpt.config = _with(ckpt.config, layer_norm_eps=1e-5)
        head_b = ckpt.state_dict.get("head.bias")
        if "proj.weight" not in ckpt.state_dict and head_b is not None and not head_b.any():
            # timm's CLIP image towers (vit_*_clip_*.openai / .laion2b, num_classes=512...) carry the
            # projection as a head with a zero bias (timm's _convert_openai_clip): it is the embedding.
            sd = ckpt.state_dict
            sd["proj.weight"] = sd.pop("head.weight")
            sd.pop("head.bias")
            ckpt.config = _with(ckpt.config, num_classes=0, proj_dim=sd["proj.weight"].shape[0])
            ckpt.labels = []
        ckpt.preprocess = Preprocess(image_size=ckpt.config.image_size, mean=OPENAI_MEAN, std=OPENAI_STD,
                                     resize="crop", crop_pct=1.0)
    elif family == "deit":
        ckpt.preprocess = Preprocess(image_size=ckpt.config.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     resize="crop", crop_pct=0.875)
    return ckpt


def _with(cfg: ViTConfig, **changes: Any) -> ViTConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def from_timm_hub_dir(fs: Any, path: str, source: str, cfg: dict, heads: int | None, weights: dict) -> Checkpoint:
    """A timm model as timm pushes it to the Hub: config.json (architecture, pretrained_cfg with
    input size, mean/std, crop, and optionally label_names) beside model.safetensors."""
    arch = cfg["architecture"]
    if not arch.startswith(("vit_", "deit_")):
        raise CheckpointError(f"{source}: timm architecture {arch!r} is not a ViT (vit_* or deit_*)")
    ckpt = from_timm_file(weights, source, None, heads or (16 if "huge" in arch or "so400m" in arch else None))
    if "quickgelu" in arch:  # e.g. vit_base_patch16_clip_quickgelu_224 (OpenAI's weights)
        ckpt.config = _with(ckpt.config, act="quick_gelu")
    pc = cfg["pretrained_cfg"]
    size = int(pc.get("input_size", [3, ckpt.config.image_size])[-1])
    ckpt.preprocess = Preprocess(image_size=size, mean=tuple(pc.get("mean", IMAGENET_MEAN)),
                                 std=tuple(pc.get("std", IMAGENET_STD)),
                                 resize="squash" if pc.get("crop_mode") == "squash" else "crop",
                                 crop_pct=float(pc.get("crop_pct", 0.875)),
                                 interpolation="bilinear" if pc.get("interpolation") == "bilinear" else "bicubic")
    ckpt.config = _with(ckpt.config, image_size=size)
    names = cfg.get("label_names") or []
    if len(names) == ckpt.config.num_classes:
        ckpt.labels = list(names)
    return ckpt
