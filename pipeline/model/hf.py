"""Hugging Face `transformers` directories -> our ViT: ViT, DeiT, CLIP, SigLIP, DINOv2.

A directory holds config.json, model.safetensors (or pytorch_model.bin) and usually
preprocessor_config.json. config.json's `model_type` says the family; its vision part gives
the sizes and the switches (vit.py), the preprocessor config the resize, crop and mean/std.
Only the image tower is read here: a CLIPModel's or SiglipModel's text tower is read by text.py,
when model.class_names asks for labels from names (zeroshot.py).

The names on disk are those of transformers 4.x, which 5.x still writes for these models;
5.x's in-memory ViT names (vit.layers.N.attention.q_proj) are read too, and a standalone
vision tower may come with or without the `vision_model.` prefix.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch

from pipeline.decode import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from pipeline.model.checkpoints import Checkpoint
from pipeline.model.keys import (
    CheckpointError,
    Rules,
    read_weights,
    rename_keys,
    split_packed_attention,
)
from pipeline.model.vit import ViTConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACCEPTED = ("vit", "deit", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2",
            "dinov2_with_registers")

# --- the key names of each family, into ours ----------------------------------------------------

_VIT_RULES: Rules = [
    (r"^(?:vit|deit)\.embeddings\.cls_token$", "cls_token"),
    (r"^(?:vit|deit)\.embeddings\.distillation_token$", "dist_token"),
    (r"^(?:vit|deit)\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^(?:vit|deit)\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k."),
    (r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v."),
    # transformers 5.x in-memory names
    (r"^vit\.layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^vit\.layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^vit\.layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"^(?:vit|deit)\.layernorm\.", "norm."),
    (r"^(?:classifier|cls_classifier)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]
_VIT_DROP = (r"^(?:vit|deit)\.pooler\.",)  # ViTModel's tanh pooler is not on the classifier's path

# CLIP and SigLIP vision towers (after the `vision_model.` prefix is taken off).
_TOWER_RULES: Rules = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
    (r"^visual_projection\.", "proj."),
    (r"^head\.probe$", "attn_pool.latent"),
    (r"^head\.attention\.in_proj_(weight|bias)$", r"attn_pool.in_proj.\1"),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."),
    (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."),
]

_DINOV2_RULES: Rules = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(1|2)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(1|2)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc1|weights_in)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc2|weights_out)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
_DINOV2_DROP = (r"^embeddings\.mask_token$",)  # for masked-image training only


def from_hf_dir(fs: Any, path: str, source: str) -> Checkpoint:
    """A transformers directory of any family vitpipe reads; anything else is refused by name."""
    base = path.rstrip("/")
    hf = json.loads(fs.cat_file(f"{base}/config.json"))
    kind = hf.get("model_type")
    if kind == "siglip2":
        raise CheckpointError(f"{source}: a SigLIP 2 NaFlex checkpoint (model_type siglip2) has no fixed patch "
                              "grid, which vitpipe's fixed-size batches need; use a fixed-resolution SigLIP 2 "
                              "checkpoint (model_type siglip, e.g. google/siglip2-base-patch16-224)")
    if kind not in ACCEPTED:
        raise CheckpointError(f"{source}: config.json has model_type {kind!r}; vitpipe reads Hugging Face "
                              f"directories of model_type {', '.join(ACCEPTED)}")
    weights = _read_weights(fs, base, source)
    pp = _read_json(fs, f"{base}/preprocessor_config.json")
    if kind in ("vit", "deit"):
        return _vit_or_deit(hf, weights, pp, source)
    if kind in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
        return _clip_or_siglip(hf, weights, pp, source)
    return _dinov2(hf, weights, pp, source)


def _vit_or_deit(hf: dict, weights: dict, pp: dict | None, source: str) -> Checkpoint:
    deit = hf["model_type"] == "deit"
    arch = (hf.get("architectures") or [""])[0]
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only 'gelu')")
    id2label = hf.get("id2label") or {}
    has_head = arch.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
    num_classes = len(id2label) if has_head else 0
    sd = rename_keys(weights, _VIT_RULES, _VIT_DROP)
    distilled = "dist_token" in sd
    cfg = ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
                    dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                    mlp_dim=hf["intermediate_size"], num_classes=num_classes, pooling="cls",
                    qkv_bias=hf.get("qkv_bias", True), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                    family="deit" if deit else "vit", distill_token=distilled)
    if deit:  # DeiT's reference processor: shorter side 256, center crop 224, ImageNet mean/std
        default = Preprocess(image_size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="crop",
                             crop_pct=224 / 256)
    else:
        default = Preprocess(image_size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")
    labels = [id2label[str(i)] for i in range(num_classes)] if num_classes else []
    return Checkpoint(cfg, sd, preprocess_from(pp, default), labels, source)


def _clip_or_siglip(hf: dict, weights: dict, pp: dict | None, source: str) -> Checkpoint:
    siglip = hf["model_type"].startswith("siglip")
    vision = hf.get("vision_config", hf)  # CLIPModel / SiglipModel nest it; a vision tower is it
    # transformers 5.x may save a standalone vision tower without the `vision_model.` prefix
    tower = {k.removeprefix("vision_model."): v for k, v in weights.items()
             if not k.startswith(("text_model.", "text_projection.", "logit_"))}
    sd = rename_keys(tower, _TOWER_RULES)
    if "cls_token" in sd:
        sd["cls_token"] = sd["cls_token"].reshape(1, 1, -1)
    sd["pos_embed"] = sd["pos_embed"].unsqueeze(0)  # (T, D) -> (1, T, D)
    sd = split_packed_attention(sd, "attn_pool")
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    acts = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if act not in acts:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (one of {', '.join(acts)})")
    D = vision.get("hidden_size", 768)
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 32 if not siglip else 16)
    common = dict(image_size=size, patch_size=patch, in_chans=vision.get("num_channels", 3), dim=D,
                  depth=vision.get("num_hidden_layers", 12), heads=vision.get("num_attention_heads", 12),
                  mlp_dim=vision.get("intermediate_size", 3072), num_classes=0, act=acts[act],
                  layer_norm_eps=vision.get("layer_norm_eps", 1e-6 if siglip else 1e-5))
    if siglip:
        has_head = "attn_pool.latent" in sd
        cfg = ViTConfig(**common, family="siglip", class_token=False, pooling="map" if has_head else "gap")
        default = Preprocess(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash",
                             interpolation="bilinear")
    else:
        proj = sd["proj.weight"].shape[0] if "proj.weight" in sd else 0
        cfg = ViTConfig(**common, family="clip", patch_bias=False, pre_norm=True, proj_dim=proj)
        default = Preprocess(image_size=size, mean=OPENAI_MEAN, std=OPENAI_STD, resize="crop", crop_pct=1.0)
    return Checkpoint(cfg, sd, preprocess_from(pp, default), [], source)


def _dinov2(hf: dict, weights: dict, pp: dict | None, source: str) -> Checkpoint:
    sd = rename_keys(weights, _DINOV2_RULES, _DINOV2_DROP)
    registers = hf.get("num_register_tokens", 0) if hf["model_type"] == "dinov2_with_registers" else 0
    swiglu = bool(hf.get("use_swiglu_ffn", False))
    D = hf["hidden_size"]
    mlp_dim = sd["blocks.0.mlp.fc2.weight"].shape[1] if "blocks.0.mlp.fc2.weight" in sd else int(D * hf.get("mlp_ratio", 4))
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only 'gelu')")
    # transformers' DINOv2 resizes positions bicubic; its DINOv2-with-registers antialiased.
    cfg = ViTConfig(image_size=hf.get("image_size", 518), patch_size=hf["patch_size"],
                    in_chans=hf.get("num_channels", 3), dim=D, depth=hf["num_hidden_layers"],
                    heads=hf["num_attention_heads"], mlp_dim=mlp_dim, num_classes=0, pooling="cls",
                    qkv_bias=hf.get("qkv_bias", True), layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
                    family="dinov2", registers=registers, layer_scale=True, ffn="swiglu" if swiglu else "mlp",
                    pos_interp="bicubic_aa" if registers or hf["model_type"] == "dinov2_with_registers" else "bicubic")
    default = Preprocess(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="crop", crop_pct=224 / 256)
    pre = preprocess_from(pp, default)
    # Trained at 518 px, run at the processor's crop (224): the positions are resized once, at load.
    return Checkpoint(replace(cfg, image_size=pre.image_size), sd, pre, [], source)


def preprocess_from(pp: dict | None, default: Preprocess) -> Preprocess:
    """preprocessor_config.json -> Preprocess: {height, width} squashes; {shortest_edge} with a
    crop_size resizes the shorter side then center-crops (crop_pct = crop / shortest edge)."""
    if not pp:
        return default
    size, crop = pp.get("size"), pp.get("crop_size")
    mean = tuple(pp.get("image_mean", default.mean))
    std = tuple(pp.get("image_std", default.std))
    interpolation = {2: "bilinear", 3: "bicubic"}.get(pp.get("resample"), default.interpolation)
    if isinstance(size, dict) and "shortest_edge" in size:
        short = int(size["shortest_edge"])
        out = int(crop["height"] if isinstance(crop, dict) else crop or short) if pp.get("do_center_crop", True) else short
        return Preprocess(image_size=out, mean=mean, std=std, resize="crop", crop_pct=out / short,
                          interpolation=interpolation)
    if isinstance(size, dict):
        side = int(size.get("height", default.image_size))
    elif size is not None:
        side = int(size)
    else:
        side = default.image_size
    return Preprocess(image_size=side, mean=mean, std=std, resize="squash", interpolation=interpolation)


def _read_weights(fs: Any, base: str, source: str) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if fs.exists(f"{base}/{name}"):
            return read_weights(fs.cat_file(f"{base}/{name}"), name, source)
    if fs.exists(f"{base}/model.safetensors.index.json"):  # sharded: every shard's tensors together
        index = json.loads(fs.cat_file(f"{base}/model.safetensors.index.json"))
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out |= read_weights(fs.cat_file(f"{base}/{shard}"), shard, source)
        return out
    raise CheckpointError(f"{source}: no model.safetensors or pytorch_model.bin in the directory")


def _read_json(fs: Any, path: str) -> dict | None:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None
