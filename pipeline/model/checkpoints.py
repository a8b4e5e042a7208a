"""Checkpoints from the formats users have -> our ViT state dict, config, preprocessing, labels.

Formats read here (from a local path or any fsspec URI):

- ours: one `.safetensors` file whose header metadata holds `vitpipe.config`,
  `vitpipe.preprocess` and `vitpipe.labels` (JSON strings). `builtin:digits` names
  the small demo model shipped in `pipeline/assets/`.
- Hugging Face `transformers` ViT: a directory with config.json, model.safetensors
  (or pytorch_model.bin) and optionally preprocessor_config.json.
- none: `checkpoint: null` with an `arch` builds seeded random weights (benchmarks).

Weights are read with safetensors, or `torch.load(weights_only=True)`; never pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pipeline.config import ModelSpec
from pipeline.decode import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: F401 (re-exported)
from pipeline.model.vit import ViT, ViTConfig, config_for_arch, resize_pos_embed

BUILTIN = {"builtin:digits": "digits_vit.safetensors"}


@dataclass
class Checkpoint:
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: Preprocess
    labels: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def model_id(self) -> str:
        """sha256 over weights + arch + preprocessing: what caches and provenance key on."""
        h = hashlib.sha256()
        config = {k: v for k, v in self.config.to_dict().items() if not (k == "head_pooling" and v is None)}
        h.update(json.dumps(config, sort_keys=True).encode())  # (ids from before head_pooling stay the same)
        h.update(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
        for name in sorted(self.state_dict):
            t = self.state_dict[name].detach().contiguous().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def build(self) -> ViT:
        model = ViT(self.config)
        load_into(model, self.state_dict, self.source)
        return model.eval()


class CheckpointError(ValueError):
    """A checkpoint that cannot become our ViT: the message names the file and the key."""


def load_checkpoint(uri: str | None, arch: str | None = None, pooling: str | None = None,
                    image_size: int | None = None, num_classes: int | None = None,
                    mean: tuple | None = None, std: tuple | None = None,
                    labels: list[str] | None = None, heads: int | None = None) -> Checkpoint:
    """Read any supported checkpoint; job-spec fields override what the checkpoint says."""
    if uri is None:
        if arch is None:
            raise CheckpointError("model.checkpoint is empty: give a checkpoint URI, or model.arch for random weights")
        ckpt = random_checkpoint(arch, image_size=image_size, num_classes=num_classes)
    elif uri in BUILTIN:
        data = resources.files("pipeline.assets").joinpath(BUILTIN[uri]).read_bytes()
        ckpt = _from_ours(data, uri)
    else:
        fs, path = fsspec.core.url_to_fs(hub_snapshot(uri) if uri.startswith("hf://") else uri)
        if fs.isdir(path):
            ckpt = _from_hf_dir(fs, path, uri, heads)
        elif path.endswith(".npz"):
            sd, npz_heads = convert_jax_npz(fs.cat_file(path), uri)
            ckpt = from_state_dict(sd, uri, arch, heads=heads or npz_heads, resize="squash")
        elif path.endswith(".safetensors"):
            data = fs.cat_file(path)
            if "vitpipe.config" in _safetensors_metadata(data):
                ckpt = _from_ours(data, uri)
            else:  # a timm state dict saved as safetensors
                ckpt = from_state_dict(convert_timm_state_dict(load_safetensors_bytes(data)), uri, arch, heads)
        elif path.endswith((".pth", ".pt", ".bin")):
            sd = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
            ckpt = from_state_dict(convert_timm_state_dict(sd), uri, arch, heads)
        else:
            raise CheckpointError(f"{uri}: unknown checkpoint format; expected a vitpipe or timm .safetensors, "
                                  "a timm .pth/.bin, a JAX .npz, or a Hugging Face ViT directory")
    if mean is not None or std is not None:
        ckpt.preprocess = replace(ckpt.preprocess, mean=tuple(mean or ckpt.preprocess.mean),
                                  std=tuple(std or ckpt.preprocess.std))
    if labels:
        ckpt.labels = list(labels)
    if pooling and pooling != ckpt.config.pooling:  # the embedding changes; the head keeps its input
        ckpt.config = replace(ckpt.config, pooling=pooling, head_pooling=ckpt.config.head_pooling or ckpt.config.pooling)
    if image_size and image_size != ckpt.preprocess.image_size:
        # Position embeddings are interpolated at run time (ViT._pos_embed_for).
        ckpt.preprocess = replace(ckpt.preprocess, image_size=image_size)
    return ckpt


def random_checkpoint(arch: str, image_size: int | None = None, num_classes: int | None = None,
                      seed: int = 0) -> Checkpoint:
    """Seeded random weights of a named arch: for benchmarks, where only speed matters."""
    cfg = config_for_arch(arch, image_size=image_size, num_classes=num_classes)
    torch.manual_seed(seed)
    model = ViT(cfg)
    labels = [f"class_{i}" for i in range(cfg.num_classes)]
    return Checkpoint(cfg, model.state_dict(), Preprocess(image_size=cfg.image_size), labels, f"random:{arch}")


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


def load_into(model: ViT, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in state_dict:
            raise CheckpointError(f"{source}: missing key {name!r} (shape {tuple(t.shape)}) for this arch")
        if name == "pos_embed" and state_dict[name].shape[1] != t.shape[1]:
            continue  # resized below
        if state_dict[name].shape != t.shape:
            raise CheckpointError(f"{source}: key {name!r} has shape {tuple(state_dict[name].shape)}, "
                                  f"the arch expects {tuple(t.shape)}; check model.arch / image size")
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r}; is this checkpoint for another model?")
    sd = dict(state_dict)
    if sd["pos_embed"].shape[1] != expected["pos_embed"].shape[1]:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.cfg.grid)
    model.load_state_dict(sd, strict=True)


def _from_ours(data: bytes, source: str) -> Checkpoint:
    meta = _safetensors_metadata(data)
    if "vitpipe.config" not in meta:
        raise CheckpointError(f"{source}: a .safetensors file without vitpipe metadata; "
                              "set model.arch, or convert it with pipeline.model.checkpoints.save_checkpoint")
    cfg = ViTConfig(**json.loads(meta["vitpipe.config"]))
    pre = Preprocess.from_dict(json.loads(meta["vitpipe.preprocess"]))
    labels = json.loads(meta.get("vitpipe.labels", "[]"))
    return Checkpoint(cfg, load_safetensors_bytes(data), pre, labels, source)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header is 8 bytes of length then JSON; metadata sits under __metadata__."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


# --- Hugging Face transformers ViT -------------------------------------------------------------

_HF_RENAMES = [
    # classic on-disk names (transformers 4.x checkpoints on the Hub)
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^vit\.encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    # transformers 5.x in-memory names
    (r"^vit\.layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^vit\.layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^vit\.layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_QKV = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViT names -> ours; separate q/k/v projections fused into one qkv."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name.startswith("vit.pooler."):
            continue  # ViTModel's tanh pooler is not part of the classifier path
        new = name
        for pat, rep in _HF_RENAMES:
            new, n = re.subn(pat, rep, name)
            if n:
                break
        else:
            new = name  # left as is: load_into names it if it does not belong
        m = re.match(r"^blocks\.(\d+)\.attn\.(query|key|value|q|k|v)\.(weight|bias)$", new)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[_QKV[m.group(2)]] = t
        else:
            out[new] = t
    for (i, kind), qkv in parts.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def _from_hf_dir(fs: Any, path: str, source: str, heads: int | None = None) -> Checkpoint:
    cfg_path = f"{path.rstrip('/')}/config.json"
    if not fs.exists(cfg_path):
        raise CheckpointError(f"{source}: a directory without config.json; expected a Hugging Face ViT directory")
    hf = json.loads(fs.cat_file(cfg_path))
    if "architecture" in hf and "pretrained_cfg" in hf:
        return _from_timm_hub_dir(fs, path, source, hf, heads)
    if hf.get("model_type") != "vit":
        raise CheckpointError(f"{source}: config.json model_type is {hf.get('model_type')!r}, expected 'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only 'gelu')")
    id2label = hf.get("id2label") or {}
    num_classes = len(id2label) if hf.get("architectures", [""])[0].endswith("ForImageClassification") else 0
    cfg = ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
                    dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                    mlp_dim=hf["intermediate_size"], num_classes=num_classes, pooling="cls",
                    qkv_bias=hf.get("qkv_bias", True), layer_norm_eps=hf.get("layer_norm_eps", 1e-12))
    pre = Preprocess(image_size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")
    pp_path = f"{path.rstrip('/')}/preprocessor_config.json"
    if fs.exists(pp_path):
        pp = json.loads(fs.cat_file(pp_path))
        size = pp.get("size", cfg.image_size)
        size = size.get("height", cfg.image_size) if isinstance(size, dict) else size
        pre = Preprocess(image_size=int(size), mean=tuple(pp.get("image_mean", pre.mean)),
                         std=tuple(pp.get("image_std", pre.std)), resize="squash")
    weights = _read_hf_weights(fs, path, source)
    labels = [id2label[str(i)] for i in range(num_classes)] if num_classes else []
    return Checkpoint(cfg, convert_hf_state_dict(weights), pre, labels, source)


def _from_timm_hub_dir(fs: Any, path: str, source: str, cfg: dict, heads: int | None = None) -> Checkpoint:
    """A timm model as timm pushes it to the Hub: config.json (architecture, pretrained_cfg with
    input size, mean/std, crop, and optionally label_names) beside model.safetensors."""
    arch = cfg["architecture"]
    if not arch.startswith("vit_"):
        raise CheckpointError(f"{source}: timm architecture {arch!r} is not a plain ViT (vit_*)")
    sd = convert_timm_state_dict(_read_hf_weights(fs, path, source))
    ckpt = from_state_dict(sd, source, None, heads=heads or (16 if "huge" in arch else None))
    pc = cfg["pretrained_cfg"]
    size = int(pc.get("input_size", [3, ckpt.config.image_size])[-1])
    ckpt.preprocess = Preprocess(image_size=size, mean=tuple(pc.get("mean", IMAGENET_MEAN)),
                                 std=tuple(pc.get("std", IMAGENET_STD)),
                                 resize="squash" if pc.get("crop_mode") == "squash" else "crop",
                                 crop_pct=float(pc.get("crop_pct", 0.875)))
    names = cfg.get("label_names") or []
    if len(names) == ckpt.config.num_classes:
        ckpt.labels = list(names)
    return ckpt


def _read_hf_weights(fs: Any, path: str, source: str) -> dict[str, torch.Tensor]:
    base = path.rstrip("/")
    if fs.exists(f"{base}/model.safetensors"):
        return load_safetensors_bytes(fs.cat_file(f"{base}/model.safetensors"))
    if fs.exists(f"{base}/pytorch_model.bin"):
        return torch.load(io.BytesIO(fs.cat_file(f"{base}/pytorch_model.bin")), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{source}: no model.safetensors or pytorch_model.bin in the directory")


def hub_snapshot(uri: str) -> str:
    """hf://ORG/NAME[@REVISION][/FILE] -> that repo's files in the local Hugging Face cache.

    A snapshot, not a remote filesystem: every actor of a node reads the weights from one
    local copy, downloaded once (huggingface_hub verifies and caches it). HF_TOKEN,
    HF_ENDPOINT and HF_HUB_CACHE come from the environment; HF_HUB_OFFLINE=1 (or no network)
    uses the cache only, so a nightly job keeps running when the Hub is down.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{uri}: hf:// checkpoints need huggingface_hub: pip install 'vit-pipeline[hf]'") from e
    parts = uri[len("hf://"):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{uri}: expected hf://ORG/NAME[@REVISION][/FILE], e.g. hf://google/vit-base-patch16-224")
    name, _, revision = parts[1].partition("@")
    repo_id, file = f"{parts[0]}/{name}", "/".join(parts[2:])
    patterns = [file] if file else ["*.json", "*.txt", "*.safetensors", "*.bin", "*.pth", "*.npz"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                   cache_dir=os.environ.get("HF_HUB_CACHE"), local_files_only=offline)
    except Exception as e:  # not found, no network and not cached, gated repo without HF_TOKEN
        raise CheckpointError(f"{uri}: could not get {repo_id} from the Hugging Face Hub or its cache "
                              f"({type(e).__name__}: {e}); check the name, the network, or HF_TOKEN") from e
    return os.path.join(folder, file) if file else folder


# --- timm and the original JAX checkpoints -----------------------------------------------------

def from_state_dict(sd: dict[str, torch.Tensor], source: str, arch: str | None, heads: int | None = None,
                    resize: str = "crop") -> Checkpoint:
    """A state dict in our names (timm's) without a config: sizes come from the shapes.

    The head count is not in the weights: `heads`, else the arch's, else dim / 64 (true of
    every timm and JAX ViT but ViT-H/14, which has 16 heads of 80).
    """
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        first = next(iter(sd), None)
        raise CheckpointError(f"{source}: not a ViT state dict (no cls_token / patch_embed.proj.weight; "
                              f"first key {first!r})")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    heads = heads or (config_for_arch(arch).heads if arch else max(1, dim // 64))
    pooling = "gap" if "fc_norm.weight" in sd else "cls"
    if pooling == "gap":  # timm avg-pool models: no norm on the tokens, fc_norm after pooling
        sd = dict(sd)
        sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    cfg = ViTConfig(image_size=grid * patch, patch_size=patch, in_chans=in_chans, dim=dim, depth=depth, heads=heads,
                    mlp_dim=mlp_dim, num_classes=num_classes, pooling=pooling, fc_norm=pooling == "gap")
    pre = Preprocess(image_size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=resize)
    return Checkpoint(cfg, sd, pre, [f"class_{i}" for i in range(num_classes)], source)


def convert_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's VisionTransformer names are ours (by design); drop what we do not use."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("head.fc."):  # newer timm heads
            k = k.replace("head.fc.", "head.")
        if k in ("norm.weight", "norm.bias") and "fc_norm.weight" in sd and sd[k].numel() == 0:
            continue
        out[k] = v
    return out


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


def load_model(m: ModelSpec) -> Checkpoint:
    """The job's checkpoint (model section of a job spec) with its overrides applied."""
    labels = None
    if m.labels:
        with fsspec.open(m.labels, "r") as f:
            text = f.read()
        labels = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    return load_checkpoint(m.checkpoint, m.arch, m.pooling, m.image_size, m.num_classes, m.mean, m.std, labels,
                           m.heads)
