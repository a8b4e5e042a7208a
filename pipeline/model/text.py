"""The text towers of CLIP and SigLIP, and their tokenizers: class names -> text embeddings.

A CLIPModel or SiglipModel directory carries, beside the image tower vit.py runs, a text
Transformer: token + position embeddings, pre-norm blocks (LayerNorm -> attention -> residual;
LayerNorm -> MLP with the tower's activation -> residual), a final LayerNorm, then one token
pooled and projected into the image-text space:

- CLIP: causal attention; pooled at the end-of-text token (transformers' rule: the position
  of the highest token id for configs with the old `eos_token_id` 2, else the first position
  of `eos_token_id`), then `text_projection` (no bias).
- SigLIP: no mask (every prompt is padded to the context length, as it was trained); pooled
  at the last position, then its `head` Linear.

Module names follow transformers' (after `text_model.`), so its weights load by name; open_clip
directories' native text tower (packed q/k/v, x @ text_projection, pooled by argmax) is renamed
into them. The
tokenizer is the `tokenizers` library's, read from the checkpoint's own files (tokenizer.json,
or CLIP's vocab.json + merges.txt built as transformers' CLIPTokenizer builds them), or
SigLIP's spiece.model through sentencepiece, canonicalized as transformers' SiglipTokenizer
does. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model.keys import CheckpointError
from pipeline.model.vit import MLP

_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclass(frozen=True)
class TextConfig:
    family: Literal["clip", "siglip"]
    vocab_size: int
    context: int  # max_position_embeddings: every prompt is padded or truncated to it
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    proj_dim: int  # the shared image-text width
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None  # CLIP's pooling position (see module docstring)

    @property
    def causal(self) -> bool:
        return self.family == "clip"


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # each (B, h, L, D/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, L, D/h)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class TextBlock(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)  # the image tower's (it reads dim, mlp_dim and act only)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embedding = nn.Embedding(cfg.context, cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, L, D)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([TextBlock(cfg) for _ in range(cfg.depth)])


class TextTower(nn.Module):
    """Token ids (B, L) -> text embeddings (B, E), not normalized (as get_text_features)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        # CLIP: text_projection (no bias), outside text_model; SigLIP: text_model.head
        self.proj = nn.Linear(cfg.dim, cfg.proj_dim, bias=cfg.family == "siglip")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)  # (B, L, D)
        for block in self.encoder.layers:
            x = block(x, self.cfg.causal)
        x = self.final_layer_norm(x)
        return self.proj(x[torch.arange(len(ids)), self.pool_positions(ids)])  # (B, E)

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B,): which token stands for the prompt."""
        if self.cfg.family == "siglip":
            return torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long)
        if self.cfg.eos_token_id in (None, 2):  # configs from before transformers' PR #24773
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == self.cfg.eos_token_id).int().argmax(dim=-1)


# --- the tokenizer -----------------------------------------------------------------------------


@dataclass
class TextTokenizer:
    """Prompts -> (B, context) int64 ids, padded/truncated as the tower was trained."""

    encode_one: Any  # str -> list[int], special tokens included, not padded
    context: int
    pad_id: int
    eos_id: int
    digest: str  # sha256 of the tokenizer files: part of the text-embedding cache key

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.full((len(prompts), self.context), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids = self.encode_one(p)
            if len(ids) > self.context:  # truncated, the end-of-text token kept (as SiglipTokenizer)
                ids = ids[: self.context - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out  # (B, context)


def _fast_tokenizer(tok: Any, context: int, pad: str, eos: str, digest: str, source: str) -> TextTokenizer:
    pad_id, eos_id = tok.token_to_id(pad), tok.token_to_id(eos)
    if pad_id is None or eos_id is None:
        raise CheckpointError(f"{source}: the tokenizer has no {pad!r} or {eos!r} token")
    tok.no_padding()
    tok.enable_truncation(context)  # as transformers' fast tokenizers: the post-processor's tokens kept
    return TextTokenizer(lambda p: tok.encode(p).ids, context, pad_id, eos_id, digest)


def clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """CLIP's byte-level BPE from vocab.json + merges.txt, as transformers' CLIPTokenizer builds it:
    NFC, whitespace runs to one space, lowercase; CLIP's split regex; `</w>` ends a word;
    <|startoftext|> ... <|endoftext|> around each prompt."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=eos))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                      add_prefix_space=False)
    return tok


def siglip_canonical(text: str) -> str:
    """transformers' SiglipTokenizer.canonicalize_text: lowercase, punctuation out, spaces collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(fs: Any, base: str, family: str, context: int, source: str) -> TextTokenizer:
    """The checkpoint's own tokenizer files: tokenizer.json, vocab.json + merges.txt (CLIP), or
    spiece.model (SigLIP); the pad token from tokenizer_config.json / special_tokens_map.json."""
    from tokenizers import Tokenizer

    def has(name: str) -> bool:
        return fs.exists(f"{base}/{name}")

    special = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if has(name):
            special = {k: v.get("content", v) if isinstance(v, dict) else v
                       for k, v in json.loads(fs.cat_file(f"{base}/{name}")).items()} | special
    eos = special.get("eos_token") or ("<|endoftext|>" if family == "clip" else "</s>")
    pad = special.get("pad_token") or eos
    if not isinstance(eos, str) or not isinstance(pad, str):
        eos, pad = ("<|endoftext|>",) * 2 if family == "clip" else ("</s>",) * 2
    if has("tokenizer.json"):
        data = fs.cat_file(f"{base}/tokenizer.json")
        return _fast_tokenizer(Tokenizer.from_str(data.decode()), context, pad, eos, _digest(data), source)
    if family == "clip" and has("vocab.json") and has("merges.txt"):
        vocab_b, merges_b = fs.cat_file(f"{base}/vocab.json"), fs.cat_file(f"{base}/merges.txt")
        lines = [ln for ln in merges_b.decode().splitlines() if ln and not ln.startswith("#version")]
        merges = [tuple(ln.split(" ", 1)) for ln in lines]
        tok = clip_bpe(json.loads(vocab_b), merges)
        return _fast_tokenizer(tok, context, pad, eos, _digest(vocab_b + merges_b), source)
    if family == "siglip" and has("spiece.model"):
        return _sentencepiece(fs.cat_file(f"{base}/spiece.model"), context, pad, eos, source)
    wanted = "tokenizer.json, or vocab.json and merges.txt" if family == "clip" else "tokenizer.json or spiece.model"
    raise CheckpointError(f"{source}: no tokenizer beside the text tower (looked for {wanted}); class names need "
                          "the checkpoint's own tokenizer files")


def _sentencepiece(model: bytes, context: int, pad: str, eos: str, source: str) -> TextTokenizer:
    """SigLIP's spiece.model: canonicalized text, sentencepiece pieces, </s> at the end."""
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise CheckpointError(f"{source}: spiece.model needs the sentencepiece package "
                              "(pip install sentencepiece)") from e
    sp = spm.SentencePieceProcessor(model_proto=model)
    pad_id, eos_id = sp.piece_to_id(pad), sp.piece_to_id(eos)

    def encode(p: str) -> list[int]:
        return list(sp.encode(siglip_canonical(p))) + [eos_id]

    return TextTokenizer(encode, context, pad_id, eos_id, _digest(model))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading a checkpoint's text tower -----------------------------------------------------------


@dataclass
class TextModel:
    """What zero-shot labels need from a checkpoint: the tower, its tokenizer, and the scale
    (and SigLIP's bias) that turn cosines into logits."""

    tower: TextTower
    tokenizer: TextTokenizer
    logit_scale: float  # already exponentiated
    logit_bias: float  # SigLIP; 0 for CLIP
    digest: str = ""  # sha256 of the tower's weights: part of the text-embedding cache key

    @torch.inference_mode()
    def embed(self, prompts: list[str], batch: int = 256) -> torch.Tensor:
        """Prompts -> (P, E) L2-normalized text embeddings, `batch` prompts at a time."""
        out = [F.normalize(self.tower(self.trimmed(self.tokenizer(prompts[i : i + batch]))), dim=-1)
               for i in range(0, len(prompts), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.tower.cfg.proj_dim)

    def trimmed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L'): a causal tower's padding after the last pooled token cut off. Exact (no
        token attends to a later one) and, for prompts of ~10 tokens in CLIP's 77, ~6x less work;
        SigLIP's unmasked tower pools at the last position and needs all of it."""
        if not self.tower.cfg.causal:
            return ids
        return ids[:, : int(self.tower.pool_positions(ids).max()) + 1]


def load_text_model(uri: str) -> TextModel:
    """A CLIPModel or SiglipModel directory (any fsspec URI, or hf://) -> its text tower."""
    from pipeline.model.checkpoints import hub_snapshot
    from pipeline.model.hf import _read_weights

    fs, path = fsspec.core.url_to_fs(hub_snapshot(uri) if uri.startswith("hf://") else uri)
    base = path.rstrip("/")
    if fs.isdir(path) and fs.exists(f"{base}/open_clip_config.json"):
        return _open_clip_text(fs, base, uri)
    if not fs.isdir(path) or not fs.exists(f"{base}/config.json"):
        raise CheckpointError(f"{uri}: class names need a checkpoint with a text tower: a Hugging Face CLIPModel or "
                              "SiglipModel directory")
    hf = json.loads(fs.cat_file(f"{base}/config.json"))
    kind = hf.get("model_type")
    if kind not in ("clip", "siglip") or "text_config" not in hf:
        raise CheckpointError(f"{uri}: model_type {kind!r} has no text tower; class names need a CLIPModel or "
                              "SiglipModel directory (model_type clip or siglip), whose text tower and tokenizer "
                              "give the labels")
    weights = _read_weights(fs, base, uri)
    cfg = text_config(hf, weights, uri)
    tower = TextTower(cfg)
    sd = {k.removeprefix("text_model."): v for k, v in weights.items() if k.startswith("text_model.")}
    sd = {("proj." + k.removeprefix("head.")) if k.startswith("head.") else k: v for k, v in sd.items()}
    if cfg.family == "clip":
        sd["proj.weight"] = weights["text_projection.weight"]
    missing = sorted(set(tower.state_dict()) - set(sd))
    if missing:
        raise CheckpointError(f"{uri}: the text tower lacks {missing[0]!r}")
    tower.load_state_dict({k: v.float() for k, v in sd.items() if k in tower.state_dict()}, strict=True)
    return _text_model(fs, base, tower, weights, uri)


def _text_model(fs: Any, base: str, tower: TextTower, weights: dict[str, torch.Tensor], uri: str) -> TextModel:
    tokenizer = load_tokenizer(fs, base, tower.cfg.family, tower.cfg.context, uri)
    scale = float(weights["logit_scale"].float().exp()) if "logit_scale" in weights else 1.0
    bias = float(weights["logit_bias"].float()) if "logit_bias" in weights else 0.0
    return TextModel(tower.eval(), tokenizer, scale, bias, _weights_digest(tower.state_dict(), scale, bias))


# open_clip's native text tower (transformer.py's TextTransformer) into the names above.
_OPEN_CLIP_RULES = [
    (r"^token_embedding\.weight$", "embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.ln_(1|2)\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^ln_final\.", "final_layer_norm."),
]


def _open_clip_text(fs: Any, base: str, uri: str) -> TextModel:
    """An open_clip directory's native text tower: causal, pooled at the highest token id (its
    `argmax` pool type, the end-of-text token in CLIP's vocabulary), then x @ text_projection;
    the tokenizer from the directory's own files (the Hub's open_clip repositories carry them)."""
    from pipeline.model.keys import read_weights, rename_keys

    model_cfg = json.loads(fs.cat_file(f"{base}/open_clip_config.json"))
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    t = model_cfg.get("text_cfg", {})
    odd = {k: t[k] for k in ("hf_model_name", "embed_cls", "no_causal_mask", "final_ln_after_pool") if t.get(k)}
    if t.get("pool_type", "argmax") != "argmax" or odd:
        raise CheckpointError(f"{uri}: open_clip text_cfg {odd or {'pool_type': t['pool_type']}} is not supported "
                              "(only the native causal tower pooled by argmax)")
    name = next((n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                 if fs.exists(f"{base}/{n}")), None)
    if name is None:
        raise CheckpointError(f"{uri}: an open_clip directory without open_clip_model.safetensors")
    weights = read_weights(fs.cat_file(f"{base}/{name}"), name, uri)
    if "text_projection" not in weights or "token_embedding.weight" not in weights:
        raise CheckpointError(f"{uri}: no native text tower (token_embedding, text_projection) in {name}")
    sd = rename_keys({k: v for k, v in weights.items() if not k.startswith("visual.")}, _OPEN_CLIP_RULES)
    for k in [k for k in sd if k.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))]:
        block, kind = k.split(".")[2], k.rsplit("_", 1)[1]  # transformer.resblocks.I.attn.in_proj_{weight,bias}
        for part, chunk in zip(("q", "k", "v"), sd.pop(k).chunk(3), strict=True):  # (3D, ...) -> (D, ...) each
            sd[f"encoder.layers.{block}.self_attn.{part}_proj.{kind}"] = chunk
    sd["proj.weight"] = sd.pop("text_projection").T  # applied as x @ proj: (D, E) -> Linear (E, D)
    vocab, dim = sd["embeddings.token_embedding.weight"].shape
    cfg = TextConfig(family="clip", vocab_size=vocab, context=sd["embeddings.position_embedding.weight"].shape[0],
                     dim=dim, depth=len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}),
                     heads=int(t.get("heads", 8)), mlp_dim=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                     proj_dim=sd["proj.weight"].shape[0], act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                     eos_token_id=None)
    tower = TextTower(cfg)
    keep = {k: v.float() for k, v in sd.items() if k in tower.state_dict()}
    missing = sorted(set(tower.state_dict()) - set(keep))
    if missing:
        raise CheckpointError(f"{uri}: the open_clip text tower lacks {missing[0]!r}")
    tower.load_state_dict(keep, strict=True)
    return _text_model(fs, base, tower, weights, uri)


def _weights_digest(sd: dict[str, torch.Tensor], scale: float, bias: float) -> str:
    h = hashlib.sha256(json.dumps([scale, bias]).encode())
    for name in sorted(sd):
        h.update(name.encode())
        h.update(sd[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def text_config(hf: dict, weights: dict[str, torch.Tensor], source: str) -> TextConfig:
    """config.json's text_config (and the weights' shapes) -> TextConfig."""
    siglip = hf["model_type"] == "siglip"
    t = hf["text_config"]
    act = t.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if act not in _ACTS:
        raise CheckpointError(f"{source}: text hidden_act {act!r} is not supported (one of {', '.join(_ACTS)})")
    vocab, dim = weights["text_model.embeddings.token_embedding.weight"].shape
    context = weights["text_model.embeddings.position_embedding.weight"].shape[0]
    proj = weights["text_model.head.weight" if siglip else "text_projection.weight"].shape[0]
    depth = len({k.split(".")[3] for k in weights if k.startswith("text_model.encoder.layers.")})
    return TextConfig(family="siglip" if siglip else "clip", vocab_size=vocab, context=context, dim=dim, depth=depth,
                      heads=t.get("num_attention_heads", 8), mlp_dim=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                      proj_dim=proj, act=_ACTS[act], layer_norm_eps=t.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
                      eos_token_id=None if siglip else t.get("eos_token_id", 2))
