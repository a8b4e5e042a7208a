"""OpenAI CLIP state dicts and open_clip checkpoints -> our ViT (the image tower only).

OpenAI CLIP (openai/CLIP, clip/model.py) and open_clip's native tower (mlfoundations/open_clip,
transformer.py's VisionTransformer) share one layout under `visual.`:

    conv1 (no bias), class_embedding (D,), positional_embedding (1 + N, D), ln_pre,
    transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ls_1.gamma?,
                             ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma?},
    ln_post, proj (D, E) applied as x @ proj

beside the text tower (token_embedding, transformer.*, ln_final, text_projection,
logit_scale), which is left out. OpenAI's models were trained with QuickGELU; open_clip says
which in its config (`quick_gelu`). open_clip can also wrap a timm ViT (`visual.trunk.*`,
then `visual.head.proj`), which timm.py reads.

An open_clip checkpoint is a directory: open_clip_config.json ({"model_cfg": {"embed_dim",
"quick_gelu", "vision_cfg": {...}}, "preprocess_cfg": {mean, std, interpolation,
resize_mode}}) beside open_clip_model.safetensors or open_clip_pytorch_model.bin.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch

from pipeline.decode import Preprocess
from pipeline.model.checkpoints import Checkpoint
from pipeline.model.keys import CheckpointError, Rules, read_weights, rename_keys

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# The native tower, after `visual.` is taken off, into our names.
_NATIVE_RULES: Rules = [
    (r"^conv1\.weight$", "patch_embed.proj.weight"),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.ls_(1|2)\.gamma$", r"blocks.\1.ls\2.gamma"),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^ln_post\.", "norm."),
    (r"^proj$", "proj.weight"),
]
# Native-tower features our encoder does not have; named when found rather than guessed at.
_UNSUPPORTED = {
    "attn_pool": "an attentional pooler (CoCa)",
    "ln_attn": "scale_attn's extra LayerNorm",
    "mlp.ln": "scale_fc's extra LayerNorm",
    "ln_q": "qk_norm",
    "logit_scale": "scaled cosine attention",
    "head_scale": "scale_heads",
}


def is_openai_or_open_clip(sd: dict[str, torch.Tensor]) -> bool:
    """A whole CLIP model's state dict (OpenAI's or open_clip's): the image tower under `visual.`."""
    return any(k.startswith("visual.") for k in sd)


def from_state_dict_file(sd: dict[str, torch.Tensor], uri: str, heads: int | None) -> Checkpoint:
    """An OpenAI CLIP (or open_clip) state dict without a config: OpenAI's defaults, QuickGELU."""
    return convert_visual(sd, uri, heads=heads, quick_gelu=True)


def from_open_clip_dir(fs: Any, base: str, uri: str) -> Checkpoint:
    """open_clip_config.json beside open_clip_model.safetensors (or open_clip_pytorch_model.bin)."""
    cfg = json.loads(fs.cat_file(f"{base}/open_clip_config.json"))
    model_cfg = cfg.get("model_cfg", cfg)
    vision = model_cfg.get("vision_cfg", {})
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if fs.exists(f"{base}/{name}"):
            sd = read_weights(fs.cat_file(f"{base}/{name}"), name, uri)
            break
    else:
        raise CheckpointError(f"{uri}: an open_clip directory without open_clip_model.safetensors or "
                              "open_clip_pytorch_model.bin")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise CheckpointError(f"{uri}: a ResNet CLIP image tower (vision_cfg.layers {vision['layers']}) is not a ViT")
    if vision.get("pos_embed_type", "learnable") != "learnable":
        raise CheckpointError(f"{uri}: vision_cfg.pos_embed_type {vision['pos_embed_type']!r} is not supported "
                              "(only learnable position embeddings)")
    # the native tower's heads: width / head_width (a timm trunk's come from its model)
    heads = None if vision.get("timm_model_name") else \
        max(1, int(vision.get("width", 768)) // int(vision.get("head_width", 64)))
    ckpt = convert_visual(sd, uri, heads=heads, quick_gelu=bool(model_cfg.get("quick_gelu")), vision=vision)
    # open_clip runs the tower at vision_cfg.image_size (its preprocess size is the tower's).
    size = _side(vision.get("image_size", ckpt.config.image_size))
    ckpt.preprocess = _preprocess(cfg.get("preprocess_cfg", {}), size, uri)
    ckpt.config = replace(ckpt.config, image_size=size)
    return ckpt


def convert_visual(sd: dict[str, torch.Tensor], uri: str, heads: int | None, quick_gelu: bool,
                   vision: dict | None = None) -> Checkpoint:
    """The `visual.` part of a CLIP state dict -> Checkpoint (native tower or a timm trunk)."""
    from pipeline.model.timm import from_state_dict

    vision = vision or {}
    tower = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    if any(k.startswith("trunk.") for k in tower):
        return _timm_trunk(tower, uri, heads, vision)
    if "conv1.weight" not in tower or "positional_embedding" not in tower:
        found = ", ".join(sorted(tower)[:4])
        what = "a ResNet CLIP (visual.layer1...), which is not a ViT" if "layer1.0.conv1.weight" in tower else \
            f"visual.{found}, ..."
        raise CheckpointError(f"{uri}: a CLIP state dict whose image tower is {what}; vitpipe reads ViT towers "
                              "(visual.conv1, visual.positional_embedding, visual.transformer.resblocks)")
    for part, what in _UNSUPPORTED.items():
        hit = next((k for k in tower if f".{part}." in f".{k}."), None)
        if hit:
            raise CheckpointError(f"{uri}: visual.{hit}: {what} is not supported")
    out = rename_keys(tower, _NATIVE_RULES)
    D = out["cls_token"].shape[-1]
    out["cls_token"] = out["cls_token"].reshape(1, 1, D)
    out["pos_embed"] = out["pos_embed"].reshape(1, -1, D)
    if "proj.weight" in out:
        out["proj.weight"] = out["proj.weight"].T.contiguous()  # (D, E) used as x @ proj -> Linear (E, D)
    eps = float((vision.get("norm_kwargs") or {}).get("eps", 1e-5))
    ckpt = from_state_dict(out, uri, None, heads=heads, family="clip", act="quick_gelu" if quick_gelu else "gelu",
                           layer_norm_eps=eps)
    pool = vision.get("pool_type", "tok")
    if vision.get("attentional_pool"):
        raise CheckpointError(f"{uri}: vision_cfg.attentional_pool (CoCa) is not supported")
    if pool not in ("tok", "avg"):
        raise CheckpointError(f"{uri}: vision_cfg.pool_type {pool!r} is not supported (tok or avg)")
    # open_clip's avg pool is the mean of the patch tokens after ln_post, or before it with
    # final_ln_after_pool (our fc_norm); for the class token the two are the same.
    avg = pool == "avg"
    ckpt.config = replace(ckpt.config, pooling="gap" if avg else "cls",
                          fc_norm=avg and bool(vision.get("final_ln_after_pool")))
    size = ckpt.config.image_size
    ckpt.preprocess = Preprocess(image_size=size, mean=OPENAI_MEAN, std=OPENAI_STD, resize="crop", crop_pct=1.0)
    return ckpt


def _timm_trunk(tower: dict[str, torch.Tensor], uri: str, heads: int | None, vision: dict) -> Checkpoint:
    """open_clip's TimmModel: a timm ViT under `trunk.` and, for timm_proj linear, `head.proj`."""
    from pipeline.model.timm import from_timm_file

    extra = sorted(k for k in tower if not k.startswith(("trunk.", "head.proj.weight")))
    if extra:
        raise CheckpointError(f"{uri}: visual.{extra[0]}: only a linear projection without bias (timm_proj "
                              "linear, timm_proj_bias false) or none is supported after a timm trunk")
    trunk = {k.removeprefix("trunk."): v for k, v in tower.items() if k.startswith("trunk.")}
    name = vision.get("timm_model_name") or ""
    if any(k.startswith(("head.", "head_dist.")) for k in trunk):
        raise CheckpointError(f"{uri}: visual.trunk.head: a timm trunk with its own classifier (timm_proj '') is "
                              "not supported; only timm_proj linear or none")
    so400m_heads = 16 if ("so400m" in name or "huge" in name) else None
    ckpt = from_timm_file(trunk, uri, None, heads or so400m_heads)
    if "quickgelu" in name:  # open_clip's timm trunks take their activation from the timm model
        ckpt.config = replace(ckpt.config, act="quick_gelu")
    pool = vision.get("timm_pool", "avg") if vision else ""  # a bare state dict: the trunk's own
    if pool:
        # open_clip resets the trunk's pooling to timm_pool ('' keeps the model's own).
        pooling = {"avg": "gap", "token": "cls", "map": "map", "": ckpt.config.pooling}.get(pool)
        if pooling is None:
            raise CheckpointError(f"{uri}: vision_cfg.timm_pool {pool!r} is not supported (avg, token, map or '')")
        if pooling == "map" and "attn_pool.latent" not in ckpt.state_dict:
            raise CheckpointError(f"{uri}: vision_cfg.timm_pool map, but the trunk has no attn_pool")
        ckpt.config = replace(ckpt.config, pooling=pooling)
    if "head.proj.weight" in tower:
        ckpt.state_dict["proj.weight"] = tower["head.proj.weight"]
        ckpt.config = replace(ckpt.config, proj_dim=tower["head.proj.weight"].shape[0])
    if ckpt.config.family == "vit":
        ckpt.config = replace(ckpt.config, family="clip")
    return ckpt


def _side(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"a non-square image size {list(size)} is not supported")
        return int(size[0])
    return int(size)


def _preprocess(pp: dict, size: int, uri: str) -> Preprocess:
    """open_clip's preprocess_cfg: resize_mode shortest (shorter side to size, center crop),
    squash (straight to size x size); mean, std; bicubic or bilinear."""
    mode = pp.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise CheckpointError(f"{uri}: preprocess_cfg.resize_mode {mode!r} is not supported (shortest or squash)")
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        raise CheckpointError(f"{uri}: preprocess_cfg.interpolation {interpolation!r} is not supported")
    return Preprocess(image_size=size, mean=tuple(pp.get("mean", OPENAI_MEAN)), std=tuple(pp.get("std", OPENAI_STD)),
                      resize="squash" if mode == "squash" else "crop", crop_pct=1.0, interpolation=interpolation)
