"""vitpipe's own format: one `.safetensors` file whose header metadata holds `vitpipe.config`,
`vitpipe.preprocess` and `vitpipe.labels` (JSON strings): everything a run needs in one file."""

from __future__ import annotations

import json

import fsspec
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pipeline.decode import Preprocess
from pipeline.model.checkpoints import Checkpoint
from pipeline.model.keys import CheckpointError
from pipeline.model.vit import ViT, ViTConfig


def from_ours(data: bytes, source: str) -> Checkpoint:
    meta = safetensors_metadata(data)
    if "vitpipe.config" not in meta:
        raise CheckpointError(f"{source}: a .safetensors file without vitpipe metadata; "
                              "set model.arch, or convert it with pipeline.model.checkpoints.save_checkpoint")
    cfg = ViTConfig(**json.loads(meta["vitpipe.config"]))
    pre = Preprocess.from_dict(json.loads(meta["vitpipe.preprocess"]))
    labels = json.loads(meta.get("vitpipe.labels", "[]"))
    return Checkpoint(cfg, load_safetensors_bytes(data), pre, labels, source)


def save_checkpoint(path: str, model: ViT, preprocess: Preprocess, labels: list[str]) -> None:
    """Write our single-file format: weights + config, preprocessing and labels in the header."""
    meta = {
        "vitpipe.config": json.dumps(model.cfg.to_dict()),
        "vitpipe.preprocess": json.dumps(preprocess.to_dict()),
        "vitpipe.labels": json.dumps(labels),
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with fsspec.open(path, "wb") as f:
        f.write(save_safetensors_bytes(tensors, metadata=meta))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header is 8 bytes of length then JSON; metadata sits under __metadata__."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}) or {}
