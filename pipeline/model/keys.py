"""The one key-renaming helper every checkpoint reader shares, and the reading of weight files.

Each reader (hf.py, timm.py, openclip.py, bigvision.py, dinov2.py) states its format as a
list of (regex, replacement) rules into our names (vit.py's, which are timm's); what the
rules leave alone is kept, so load_into names any key that does not belong.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

Rules = list[tuple[str, str]]


class CheckpointError(ValueError):
    """A checkpoint that cannot become our ViT: the message names the file and the key."""


def rename_keys(sd: dict[str, torch.Tensor], rules: Rules, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to each key; keys matching a `drop` regex are left out.

    Separate q/k/v projections (blocks.i.attn.{q,k,v}.*) are then fused into one qkv, the
    layout vit.py's Attention holds."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if any(re.search(d, name) for d in drop):
            continue
        new = name
        for pat, rep in rules:
            new, n = re.subn(pat, rep, name)
            if n:
                break
        else:
            new = name
        out[new] = t
    return fuse_qkv(out)


def fuse_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """blocks.i.attn.{q,k,v}.{weight,bias} -> blocks.i.attn.qkv.{weight,bias} (q, k, v stacked)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = re.match(r"^(blocks\.\d+\.attn)\.(q|k|v)\.(weight|bias)$", name)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
        else:
            out[name] = t
    for (where, kind), qkv in parts.items():
        out[f"{where}.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def split_packed_attention(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """torch.nn.MultiheadAttention's packed `in_proj` (q, k, v stacked) under `prefix` ->
    the attention-pool head's q and kv (SigLIP's MAP head in transformers and big_vision)."""
    sd = dict(sd)
    for kind in ("weight", "bias"):
        packed = sd.pop(f"{prefix}.in_proj.{kind}", None)
        if packed is not None:
            d = packed.shape[0] // 3
            sd[f"{prefix}.q.{kind}"], sd[f"{prefix}.kv.{kind}"] = packed[:d], packed[d:]
    return sd


def read_weights(data: bytes, name: str, source: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file read with weights_only=True (never arbitrary pickle).

    A torch file that wraps its weights ({"state_dict": ...}, {"model": ...}) is unwrapped."""
    if name.endswith(".safetensors"):
        return load_safetensors_bytes(data)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, a truncated file
        if "TorchScript" in str(e):  # OpenAI's CLIP .pt files are TorchScript archives, code and all
            raise CheckpointError(f"{source}: {name} is a TorchScript archive (as OpenAI's CLIP .pt files are), "
                                  "which is not read (it would run its code); re-save its state dict once where "
                                  "you trust it: torch.save(torch.jit.load(path, map_location='cpu').state_dict(), "
                                  "'ViT-B-32.pth'), or as .safetensors") from None
        raise CheckpointError(f"{source}: {name} could not be read as torch weights with weights_only=True "
                              f"({type(e).__name__}: {e}); save it as .safetensors") from None
    return unwrap(sd)


def unwrap(sd: Any) -> dict[str, torch.Tensor]:
    """{"state_dict": sd} / {"model": sd} / {"module": sd} -> sd; a "module." prefix is dropped."""
    while isinstance(sd, dict) and len(sd) <= 4 and any(k in sd for k in ("state_dict", "model", "module")):
        inner = next(sd[k] for k in ("state_dict", "model", "module") if k in sd)
        if not isinstance(inner, dict):
            break
        sd = inner
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
