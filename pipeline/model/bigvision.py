"""JAX checkpoints (.npz): google-research/vision_transformer's ViT, and big_vision's SigLIP.

Flax names, HWIO conv kernels and (in, out) dense kernels; attention kernels keep the heads
as an axis ((D, heads, D/heads)), which is also how the head count is read.
"""

from __future__ import annotations

import io

import torch

from pipeline.decode import Preprocess
from pipeline.model.keys import CheckpointError


def convert_jax_npz(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], int]:
    """google-research/vision_transformer .npz (Flax names, HWIO / (in, out) kernels) -> (state dict, heads)."""
    import numpy as np

    z = np.load(io.BytesIO(data), allow_pickle=False)
    if "pre_logits/kernel" in z:
        raise CheckpointError(f"{source}: has a pre_logits (representation) layer, as ImageNet-21k "
                              "pre-training checkpoints do; use a fine-tuned checkpoint without it")
    t = lambda name: torch.from_numpy(np.ascontiguousarray(z[name]))  # noqa: E731
    dim = z["cls"].shape[-1]
    sd = {
        "cls_token": t("cls").reshape(1, 1, dim),
        "pos_embed": t("Transformer/posembed_input/pos_embedding"),
        "patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": t("embedding/bias"),
        "norm.weight": t("Transformer/encoder_norm/scale"),
        "norm.bias": t("Transformer/encoder_norm/bias"),
    }
    if "head/kernel" in z and z["head/kernel"].size:
        sd["head.weight"], sd["head.bias"] = t("head/kernel").T, t("head/bias")
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in z:
        b, o = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        att = f"{b}/MultiHeadDotProductAttention_1"
        sd[f"{o}.norm1.weight"], sd[f"{o}.norm1.bias"] = t(f"{b}/LayerNorm_0/scale"), t(f"{b}/LayerNorm_0/bias")
        sd[f"{o}.norm2.weight"], sd[f"{o}.norm2.bias"] = t(f"{b}/LayerNorm_2/scale"), t(f"{b}/LayerNorm_2/bias")
        # query/key/value kernels are (D, heads, D/heads): flatten the heads, then (in, out) -> (out, in).
        sd[f"{o}.attn.qkv.weight"] = torch.cat([t(f"{att}/{n}/kernel").reshape(dim, dim).T
                                                for n in ("query", "key", "value")])
        sd[f"{o}.attn.qkv.bias"] = torch.cat([t(f"{att}/{n}/bias").reshape(dim) for n in ("query", "key", "value")])
        sd[f"{o}.attn.proj.weight"] = t(f"{att}/out/kernel").reshape(dim, dim).T  # (heads, D/h, D) -> (D, D)
        sd[f"{o}.attn.proj.bias"] = t(f"{att}/out/bias")
        sd[f"{o}.mlp.fc1.weight"], sd[f"{o}.mlp.fc1.bias"] = t(f"{b}/MlpBlock_3/Dense_0/kernel").T, t(f"{b}/MlpBlock_3/Dense_0/bias")
        sd[f"{o}.mlp.fc2.weight"], sd[f"{o}.mlp.fc2.bias"] = t(f"{b}/MlpBlock_3/Dense_1/kernel").T, t(f"{b}/MlpBlock_3/Dense_1/bias")
        i += 1
    if i == 0:
        raise CheckpointError(f"{source}: no Transformer/encoderblock_0 in the .npz; is it a ViT checkpoint?")
    heads = z["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
    return sd, int(heads)


# big_vision's ViT (big_vision/models/vit.py) as SigLIP's image tower saves it: under
# params/img/ (a two-tower model), params/ (an image model alone), or without params/.
_BIG_VISION_PREFIXES = ("params/img/", "img/", "params/", "")


def is_big_vision(z) -> bool:
    return any(f"{p}embedding/kernel" in z and f"{p}pos_embedding" in z for p in _BIG_VISION_PREFIXES)


def convert_big_vision_npz(z, source: str) -> tuple[dict[str, torch.Tensor], int, bool]:
    """big_vision ViT params ("/"-flattened) -> (state dict in our names, heads, the image tower
    of a two-tower (contrastive) model?).

    Unlike the 2020 ViT, big_vision adds positions to the patches only, then prepends the
    class token (pool_type tok) without one: a zero row stands for it here. Blocks are
    Transformer/encoderblock_i/..., or one Transformer/encoderblock/... stacked along a first
    axis of depth (a scanned model). The MAP head (pool_type map) is MAPHead_0."""
    import numpy as np

    prefix = next(p for p in _BIG_VISION_PREFIXES if f"{p}embedding/kernel" in z and f"{p}pos_embedding" in z)

    def t(name: str, idx: int | None = None) -> torch.Tensor:
        a = z[prefix + name]
        return torch.from_numpy(np.ascontiguousarray(a if idx is None else a[idx])).float()

    def dense(o: str, name: str, idx: int | None = None) -> dict[str, torch.Tensor]:
        return {f"{o}.weight": t(f"{name}/kernel", idx).T, f"{o}.bias": t(f"{name}/bias", idx)}

    def norm(o: str, name: str, idx: int | None = None) -> dict[str, torch.Tensor]:
        return {f"{o}.weight": t(f"{name}/scale", idx), f"{o}.bias": t(f"{name}/bias", idx)}

    def heads_in(name: str, idx: int | None = None) -> torch.Tensor:
        return t(f"{name}/kernel", idx).flatten(1).T  # (D, heads, D/h) -> (out D, in D)

    pos = t("pos_embedding")  # (1, N, D)
    D = pos.shape[-1]
    class_token = f"{prefix}cls" in z
    sd = {"patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
          "patch_embed.proj.bias": t("embedding/bias")}
    if class_token:
        sd["cls_token"] = t("cls").reshape(1, 1, D)
        pos = torch.cat([pos.new_zeros(1, 1, D), pos], dim=1)
    sd["pos_embed"] = pos
    sd |= norm("norm", "Transformer/encoder_norm")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in z
    depth = z[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if scanned else \
        sum(1 for k in z if k.startswith(f"{prefix}Transformer/encoderblock_") and k.endswith("/LayerNorm_0/scale"))
    if depth == 0:
        raise CheckpointError(f"{source}: no {prefix}Transformer/encoderblock_0 in the .npz; is it a ViT?")
    for i in range(depth):
        b, idx = (("Transformer/encoderblock", i) if scanned else (f"Transformer/encoderblock_{i}", None))
        o, att = f"blocks.{i}", f"{b}/MultiHeadDotProductAttention_0"
        sd |= norm(f"{o}.norm1", f"{b}/LayerNorm_0", idx) | norm(f"{o}.norm2", f"{b}/LayerNorm_1", idx)
        sd[f"{o}.attn.qkv.weight"] = torch.cat([heads_in(f"{att}/{n}", idx) for n in ("query", "key", "value")])
        sd[f"{o}.attn.qkv.bias"] = torch.cat([t(f"{att}/{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")])
        sd[f"{o}.attn.proj.weight"] = t(f"{att}/out/kernel", idx).reshape(-1, D).T  # (heads, D/h, D) -> (D, D)
        sd[f"{o}.attn.proj.bias"] = t(f"{att}/out/bias", idx)
        sd |= dense(f"{o}.mlp.fc1", f"{b}/MlpBlock_0/Dense_0", idx) | dense(f"{o}.mlp.fc2", f"{b}/MlpBlock_0/Dense_1", idx)
    heads_key = "Transformer/encoderblock" if scanned else "Transformer/encoderblock_0"
    heads = z[f"{prefix}{heads_key}/MultiHeadDotProductAttention_0/query/kernel"].shape[-2]
    if f"{prefix}MAPHead_0/probe" in z:
        h, att = "MAPHead_0", "MAPHead_0/MultiHeadDotProductAttention_0"
        sd["attn_pool.latent"] = t(f"{h}/probe").reshape(1, 1, D)
        sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = heads_in(f"{att}/query"), t(f"{att}/query/bias").reshape(-1)
        sd["attn_pool.kv.weight"] = torch.cat([heads_in(f"{att}/{n}") for n in ("key", "value")])
        sd["attn_pool.kv.bias"] = torch.cat([t(f"{att}/{n}/bias").reshape(-1) for n in ("key", "value")])
        sd["attn_pool.proj.weight"] = t(f"{att}/out/kernel").reshape(-1, D).T
        sd["attn_pool.proj.bias"] = t(f"{att}/out/bias")
        sd |= norm("attn_pool.norm", f"{h}/LayerNorm_0")
        sd |= dense("attn_pool.mlp.fc1", f"{h}/MlpBlock_0/Dense_0") | dense("attn_pool.mlp.fc2", f"{h}/MlpBlock_0/Dense_1")
    if f"{prefix}pre_logits/kernel" in z:
        raise CheckpointError(f"{source}: has a pre_logits (representation) layer; vitpipe's ViT has none")
    if f"{prefix}head/kernel" in z:
        sd |= dense("head", "head")
    return sd, int(heads), prefix in ("params/img/", "img/")


def from_npz(data: bytes, source: str, heads: int | None = None):
    """A .npz: the original ViT (google-research/vision_transformer: cls, Transformer/posembed_input)
    or big_vision's (SigLIP's image tower: [params/img/]embedding, pos_embedding, MAPHead_0) -> Checkpoint."""
    import numpy as np

    from pipeline.model.timm import from_state_dict

    z = np.load(io.BytesIO(data), allow_pickle=False)
    if "Transformer/posembed_input/pos_embedding" in z:
        sd, npz_heads = convert_jax_npz(data, source)
        return from_state_dict(sd, source, None, heads=heads or npz_heads, resize="squash")
    if not is_big_vision(z):
        first = ", ".join(list(z.files)[:3])
        raise CheckpointError(f"{source}: a .npz with keys {first}, ...: neither the original ViT's "
                              "(Transformer/posembed_input/pos_embedding) nor big_vision's "
                              "([params/img/]embedding/kernel and pos_embedding)")
    sd, npz_heads, two_tower = convert_big_vision_npz(z, source)
    # Flax's nn.gelu is the tanh approximation; SigLIP's preprocessing squashes to size, [-1, 1].
    switches = {"act": "gelu_tanh"}
    if "cls_token" not in sd and (two_tower or "attn_pool.latent" in sd):
        switches["family"] = "siglip"
    ckpt = from_state_dict(sd, source, None, heads=heads or npz_heads, resize="squash", **switches)
    ckpt.preprocess = Preprocess(image_size=ckpt.config.image_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                                 resize="squash", interpolation="bilinear")
    return ckpt
