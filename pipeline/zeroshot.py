"""Labels from class names (zero-shot): the user's names, through the checkpoint's own text tower,
become the head of the image model.

Each name is put into prompt templates ("a photo of a {}."), every prompt is embedded by the
text tower (text.py) and L2-normalized, the prompts of a name are averaged and normalized again
(the CLIP paper's prompt ensembling). The (C, E) matrix of those embeddings, times the
checkpoint's `logit_scale.exp()` (plus SigLIP's `logit_bias`), is folded into the ViT's head,
which then sees the L2-normalized image embedding (vit.ViTConfig.head_on_embedding): the model
actors do one matrix product more per batch and nothing else, every engine (torch, ONNX,
TensorRT) gets it for free, and the model id covers the text embeddings since they are weights.

Scores: CLIP's softmax over scale * cosine; SigLIP's per-class sigmoid of scale * cosine + bias,
which does not sum to 1 over the classes (vit.ViTConfig.scores; predict.top_k applies it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec
import torch
import torch.nn.functional as F

from pipeline.model.keys import CheckpointError

log = logging.getLogger(__name__)

# The CLIP paper's 80 ImageNet templates (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
IMAGENET80 = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
# The 7 the same notebook found to do as well as the 80 on ImageNet, and the plain one.
SHORT = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
         "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"imagenet80": IMAGENET80, "short": SHORT, "photo": ("a photo of a {}.",)}

NameEntry = str | dict[str, list[str]]  # a name, or {name: [its own prompts or templates]}


@dataclass(frozen=True)
class LabelSet:
    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]  # per name, the texts its embedding averages

    @property
    def key(self) -> dict:
        """What the text embeddings depend on, besides the model and tokenizer (the cache key)."""
        return {"names": list(self.names), "prompts": [list(p) for p in self.prompts]}


# --- checks, shared by the spec (inline lists) and the loader (files) -------------------------------


def check_names(entries: list[NameEntry], where: str = "model.class_names") -> list[tuple[str, list[str] | None]]:
    """Entries -> (name, own prompts or None); an empty set, an empty or duplicate name, or a name
    with an empty prompt list is refused by name. Duplicates are compared case-insensitively
    (CLIP's tokenizer lowercases: "Cat" and "cat" would be one label twice)."""
    if not entries:
        raise ValueError(f"{where}: the set of class names is empty")
    out: list[tuple[str, list[str] | None]] = []
    seen: dict[str, str] = {}
    for e in entries:
        if isinstance(e, dict):
            if len(e) != 1:
                raise ValueError(f"{where}: an entry with its own prompts is one mapping name: [prompts], got {e!r}")
            (name, own), = e.items()
            if isinstance(own, str):
                own = [own]
            if not own or not all(isinstance(p, str) and p.strip() for p in own):
                raise ValueError(f"{where}: {name!r} has an empty list of prompts")
        else:
            name, own = e, None
        name = str(name).strip()
        if not name:
            raise ValueError(f"{where}: an empty class name")
        if name.casefold() in seen:
            raise ValueError(f"{where}: duplicate class name {name!r} (also given as {seen[name.casefold()]!r})")
        seen[name.casefold()] = name
        out.append((name, list(own) if own else None))
    return out


def check_templates(templates: list[str], where: str = "model.prompts") -> list[str]:
    if not templates:
        raise ValueError(f"{where}: no prompt templates")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"{where}: template {t!r} has no {{}} for the class name")
    return list(templates)


def is_template_set(prompts: Any) -> bool:
    return isinstance(prompts, str) and prompts in TEMPLATE_SETS


# --- the label set ----------------------------------------------------------------------------


def _lines(uri: str) -> list[str]:
    with fsspec.open(uri, "r") as f:
        return [ln.strip() for ln in f.read().splitlines() if ln.strip()]


def label_set(class_names: list[NameEntry] | str, prompts: list[str] | str) -> LabelSet:
    """model.class_names (a list, or a text file with one name per line) x model.prompts (a named
    set, a list, or a text file with one template per line) -> the prompts of each name. A name's
    own prompts replace the templates; one with `{}` is a template, one without a whole prompt."""
    entries = _lines(class_names) if isinstance(class_names, str) else class_names
    where = f"model.class_names ({class_names})" if isinstance(class_names, str) else "model.class_names"
    named = check_names(entries, where)
    if isinstance(prompts, str):
        templates = list(TEMPLATE_SETS[prompts]) if is_template_set(prompts) else _lines(prompts)
        templates = check_templates(templates, f"model.prompts ({prompts})")
    else:
        templates = check_templates(prompts)
    out = []
    for name, own in named:
        texts = own or templates
        out.append(tuple(t.replace("{}", name) if "{}" in t else t for t in texts))
    return LabelSet(tuple(n for n, _ in named), tuple(out))


def class_embeddings(text: Any, labels: LabelSet, batch: int = 256) -> torch.Tensor:
    """Each name's embedding (C, E), as the CLIP paper: every prompt normalized, the prompts of a
    name averaged, then normalized again. `text` is a text.TextModel."""
    flat = [p for ps in labels.prompts for p in ps]
    owner = torch.repeat_interleave(torch.arange(len(labels.names)), torch.tensor([len(ps) for ps in labels.prompts]))
    emb = text.embed(flat, batch)  # (P, E), unit rows
    summed = torch.zeros(len(labels.names), emb.shape[1]).index_add_(0, owner, emb)  # (C, E)
    return F.normalize(summed, dim=-1)  # the mean's direction: dividing by the count would not change it


def fold_head(ckpt: Any, emb: torch.Tensor, scale: float, bias: float, names: tuple[str, ...]) -> Any:
    """A checkpoint whose head is scale * emb (+ bias): logits = scale * cos(image, name) + bias."""
    cfg = ckpt.config
    scores = "sigmoid" if cfg.family == "siglip" else "softmax"
    sd = dict(ckpt.state_dict)
    sd["head.weight"] = (scale * emb).to(torch.float32).contiguous()  # (C, E)
    sd["head.bias"] = torch.full((len(names),), bias if scores == "sigmoid" else 0.0, dtype=torch.float32)
    config = replace(cfg, num_classes=len(names), head_on_embedding=True, scores=scores)
    return replace(ckpt, config=config, state_dict=sd, labels=list(names))


@dataclass(frozen=True)
class TextCacheKey:
    """Where a label set's text embeddings live in the engine cache (engines/cache.py keys on any
    frozen dataclass with a `name`): computed once, then every actor and every nightly run reads
    them. The image model id alone would not do: the text tower's weights are not in it."""

    model_id: str  # the image tower's (checkpoints.Checkpoint.model_id, before the head is folded)
    text_id: str  # the text tower's weights, logit scale and bias (text.TextModel.digest)
    tokenizer: str  # sha256 of the tokenizer files
    labels: str  # sha256 of the names and each name's prompts

    @property
    def name(self) -> str:
        return "text-embeddings-" + hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def text_embeddings(ckpt: Any, text: Any, labels: LabelSet, cache_uri: str | None = None) -> tuple[torch.Tensor, str]:
    """The label set's (C, E) class embeddings from the engine cache, or computed and stored there;
    and what the cache did ("hit", "built", ...)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from pipeline.engines.cache import EngineCache

    key = TextCacheKey(ckpt.model_id, text.digest, text.tokenizer.digest,
                       hashlib.sha256(json.dumps(labels.key).encode()).hexdigest())
    result = EngineCache(cache_uri).get_or_build(key, lambda: st_save({"emb": class_embeddings(text, labels)}))
    log.info("zero-shot text embeddings for %d names: %s (%s)", len(labels.names), result.status, key.name)
    return st_load(result.data)["emb"], result.status


def apply(ckpt: Any, checkpoint_uri: str | None, class_names: list[NameEntry] | str,
          prompts: list[str] | str, cache_uri: str | None = None) -> Any:
    """The job's checkpoint with the class names' head folded in (checkpoints.load_model calls it)."""
    from pipeline.model.text import load_text_model

    cfg = ckpt.config
    if cfg.num_classes > 0:
        raise CheckpointError(f"{checkpoint_uri}: this checkpoint has a trained head of {cfg.num_classes} classes; "
                              "model.class_names labels from names instead: use a checkpoint without a head "
                              "(a CLIPModel or SiglipModel directory), or drop model.class_names")
    if cfg.family not in ("clip", "siglip") or checkpoint_uri is None:
        raise CheckpointError(f"{checkpoint_uri}: model.class_names needs a CLIP or SigLIP checkpoint with its text "
                              f"tower (this one is {cfg.family})")
    labels = label_set(class_names, prompts)
    text = load_text_model(checkpoint_uri)
    if text.tower.cfg.proj_dim != cfg.embed_dim:
        raise CheckpointError(f"{checkpoint_uri}: the text tower embeds in {text.tower.cfg.proj_dim} dimensions, "
                              f"the image tower in {cfg.embed_dim}")
    emb, _ = text_embeddings(ckpt, text, labels, cache_uri)  # (C, E)
    return fold_head(ckpt, emb, text.logit_scale, text.logit_bias, labels.names)
