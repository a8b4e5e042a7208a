"""JAX checkpoints (.npz): google-research/vision_transformer's ViT, and big_vision's SigLIP.

Flax names, HWIO conv kernels and (in, out) dense kernels; attention kernels keep the heads
as an axis ((D, heads, D/heads)), which is also how the head count is read.
"""

from __future__ import annotations

import io

import torch

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




def from_npz(data: bytes, source: str, heads: int | None = None):
    """A .npz: the original ViT (google-research/vision_transformer) -> Checkpoint."""
    from pipeline.model.timm import from_state_dict

    sd, npz_heads = convert_jax_npz(data, source)
    return from_state_dict(sd, source, None, heads=heads or npz_heads, resize="squash")
