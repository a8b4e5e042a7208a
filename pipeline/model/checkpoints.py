"""Checkpoints from the formats users have -> our ViT state dict, config, preprocessing, labels.

One reader per source format, each in its own module, all sharing keys.rename_keys:

- ours.py: vitpipe's `.safetensors` with its config, preprocessing and labels in the header
  (`builtin:digits` names the small demo model shipped in `pipeline/assets/`);
- hf.py: Hugging Face `transformers` directories: ViT, DeiT, CLIP, SigLIP, DINOv2;
- timm.py: timm state dicts and timm Hub directories (ViT, DeiT distilled, DINOv2, SigLIP);
- openclip.py: OpenAI CLIP state dicts and open_clip checkpoints;
- bigvision.py: JAX `.npz` (google-research/vision_transformer ViT, big_vision SigLIP);
- dinov2.py: the DINOv2 repository's own `.pth` files;
- none: `checkpoint: null` with an `arch` builds seeded random weights (benchmarks).

Any of them from a local path, any fsspec URI, or hf://ORG/NAME. Weights are read with
safetensors, or `torch.load(weights_only=True)`; never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources

import fsspec
import torch

from pipeline.config import ModelSpec
from pipeline.decode import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: F401 (re-exported)
from pipeline.model.keys import CheckpointError, read_weights
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
        h.update(json.dumps(self.config.id_dict(), sort_keys=True).encode())
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


ACCEPTED = ("a vitpipe or timm .safetensors; a timm, OpenAI CLIP or DINOv2 .pth/.pt/.bin; a JAX or big_vision "
            ".npz; a Hugging Face directory (ViT, DeiT, CLIP, SigLIP, DINOv2); an open_clip directory "
            "(open_clip_config.json); a timm Hub directory; hf://ORG/NAME; builtin:digits")


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
        from pipeline.model.ours import from_ours

        ckpt = from_ours(resources.files("pipeline.assets").joinpath(BUILTIN[uri]).read_bytes(), uri)
    else:
        fs, path = fsspec.core.url_to_fs(hub_snapshot(uri) if uri.startswith("hf://") else uri)
        ckpt = _read_any(fs, path, uri, arch, heads)
    if mean is not None or std is not None:
        ckpt.preprocess = replace(ckpt.preprocess, mean=tuple(mean or ckpt.preprocess.mean),
                                  std=tuple(std or ckpt.preprocess.std))
    if labels:
        ckpt.labels = list(labels)
    if pooling and pooling != ckpt.config.pooling:  # the embedding changes; the head keeps its input
        check_pooling(ckpt.config, pooling, uri)
        ckpt.config = replace(ckpt.config, pooling=pooling, head_pooling=ckpt.config.head_pooling or ckpt.config.pooling)
    if image_size and image_size != ckpt.preprocess.image_size:
        # The positions are resized once, at build, from the checkpoint's own (as each reference does).
        ckpt.preprocess = replace(ckpt.preprocess, image_size=image_size)
        ckpt.config = replace(ckpt.config, image_size=image_size)
    return ckpt


def _read_any(fs, path: str, uri: str, arch: str | None, heads: int | None) -> Checkpoint:
    """Which reader: by what the path is (a directory, and then its files) and its suffix."""
    from pipeline.model import bigvision, hf, openclip, ours, timm

    base = path.rstrip("/")
    if fs.isdir(path):
        if fs.exists(f"{base}/open_clip_config.json"):
            return openclip.from_open_clip_dir(fs, base, uri)
        if not fs.exists(f"{base}/config.json"):
            raise CheckpointError(f"{uri}: a directory without config.json or open_clip_config.json; accepted: "
                                  f"{ACCEPTED}")
        cfg = json.loads(fs.cat_file(f"{base}/config.json"))
        if "architecture" in cfg and "pretrained_cfg" in cfg:
            weights = read_weights(fs.cat_file(f"{base}/model.safetensors"), "model.safetensors", uri)
            return timm.from_timm_hub_dir(fs, base, uri, cfg, heads, weights)
        return hf.from_hf_dir(fs, base, uri)
    if path.endswith(".npz"):
        return bigvision.from_npz(fs.cat_file(path), uri, heads)
    if path.endswith(".safetensors"):
        data = fs.cat_file(path)
        if "vitpipe.config" in ours.safetensors_metadata(data):
            return ours.from_ours(data, uri)
        return _from_state_dict_file(read_weights(data, path, uri), uri, arch, heads)
    if path.endswith((".pth", ".pt", ".bin")):
        return _from_state_dict_file(read_weights(fs.cat_file(path), path, uri), uri, arch, heads)
    raise CheckpointError(f"{uri}: unknown checkpoint format; accepted: {ACCEPTED}")


def _from_state_dict_file(sd: dict[str, torch.Tensor], uri: str, arch: str | None, heads: int | None) -> Checkpoint:
    """A bare state dict: OpenAI CLIP, the DINOv2 repository's, or timm's, told apart by their keys."""
    from pipeline.model import dinov2, openclip, timm

    if openclip.is_openai_or_open_clip(sd):
        return openclip.from_state_dict_file(sd, uri, heads)
    if dinov2.is_dinov2_original(sd):
        return dinov2.from_dinov2_pth(sd, uri, heads)
    if "patch_embed.proj.weight" in sd:
        return timm.from_timm_file(sd, uri, arch, heads)
    first = ", ".join(list(sd)[:3])
    raise CheckpointError(f"{uri}: found a state dict with keys {first}, ... that no reader places; accepted: "
                          f"{ACCEPTED}")


def check_pooling(cfg: ViTConfig, pooling: str, source: str | None) -> None:
    """A pooling the model cannot give is refused by name, before any cluster work."""
    if pooling in ("cls", "cls+gap") and not cfg.class_token:
        raise CheckpointError(f"{source}: model.pooling {pooling}: this {cfg.family} model has no class token; "
                              "use map (its attention-pooling head) or gap")
    if pooling == "map" and "map" not in (cfg.pooling, cfg.head_pooling):
        raise CheckpointError(f"{source}: model.pooling map: this {cfg.family} model has no attention-pooling "
                              "head; use cls, gap or cls+gap")


def random_checkpoint(arch: str, image_size: int | None = None, num_classes: int | None = None,
                      seed: int = 0) -> Checkpoint:
    """Seeded random weights of a named arch: for benchmarks, where only speed matters."""
    cfg = config_for_arch(arch, image_size=image_size, num_classes=num_classes)
    torch.manual_seed(seed)
    model = ViT(cfg)
    labels = [f"class_{i}" for i in range(cfg.num_classes)]
    return Checkpoint(cfg, model.state_dict(), family_preprocess(cfg), labels, f"random:{arch}")


def family_preprocess(cfg: ViTConfig) -> Preprocess:
    """The family's reference preprocessing at the config's size, for weights that come without one."""
    if cfg.family == "clip":
        from pipeline.model.hf import OPENAI_MEAN, OPENAI_STD

        return Preprocess(image_size=cfg.image_size, mean=OPENAI_MEAN, std=OPENAI_STD, crop_pct=1.0)
    if cfg.family == "siglip":
        return Preprocess(image_size=cfg.image_size, mean=(0.5,) * 3, std=(0.5,) * 3, resize="squash",
                          interpolation="bilinear")
    return Preprocess(image_size=cfg.image_size)


def save_checkpoint(path: str, model: ViT, preprocess: Preprocess, labels: list[str]) -> None:
    """Write vitpipe's single-file format (ours.py)."""
    from pipeline.model.ours import save_checkpoint as save

    save(path, model, preprocess, labels)


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
        cfg = model.cfg
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], cfg.grid, cfg.pos_tokens, cfg.pos_interp)
    model.load_state_dict(sd, strict=True)


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
    patterns = [file] if file else ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin", "*.pth", "*.npz"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                   cache_dir=os.environ.get("HF_HUB_CACHE"), local_files_only=offline)
    except Exception as e:  # not found, no network and not cached, gated repo without HF_TOKEN
        raise CheckpointError(f"{uri}: could not get {repo_id} from the Hugging Face Hub or its cache "
                              f"({type(e).__name__}: {e}); check the name, the network, or HF_TOKEN") from e
    return os.path.join(folder, file) if file else folder


def load_model(m: ModelSpec, cache_uri: str | None = None) -> Checkpoint:
    """The job's checkpoint (model section of a job spec) with its overrides applied; with class
    names, their text embeddings come from (or go into) the engine cache at `cache_uri`."""
    labels = None
    if m.labels:
        with fsspec.open(m.labels, "r") as f:
            text = f.read()
        labels = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    ckpt = load_checkpoint(m.checkpoint, m.arch, m.pooling, m.image_size, m.num_classes, m.mean, m.std, labels,
                           m.heads)
    if m.class_names is not None:  # zero-shot: the names' text embeddings become the head
        from pipeline import zeroshot

        ckpt = zeroshot.apply(ckpt, m.checkpoint, m.class_names, m.prompts, cache_uri)
    return ckpt
