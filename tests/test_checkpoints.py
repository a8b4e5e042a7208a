"""Checkpoint formats against an oracle that is not our code: transformers' ViT on the same weights.

The timm and JAX fixtures are written here from the transformers weights, following the
published layouts (not our converter):
- timm VisionTransformer state dict: cls_token (1,1,D), pos_embed (1,1+N,D),
  patch_embed.proj.{weight,bias}, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*,
  norm.*, head.* (timm.models.vision_transformer);
- google-research/vision_transformer .npz: embedding/kernel (P,P,C,D) HWIO, cls (1,1,D),
  Transformer/posembed_input/pos_embedding, Transformer/encoderblock_i/{LayerNorm_0,LayerNorm_2}/
  {scale,bias}, .../MultiHeadDotProductAttention_1/{query,key,value}/kernel (D,heads,D/heads) and
  bias (heads,D/heads), .../out/kernel (heads,D/heads,D), .../MlpBlock_3/Dense_{0,1}/{kernel,bias}
  with (in,out) kernels, Transformer/encoder_norm/*, head/{kernel,bias}.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.model.checkpoints import CheckpointError, load_checkpoint

transformers = pytest.importorskip("transformers")
D, HEADS, LAYERS, P, SIZE, CLASSES = 64, 4, 3, 8, 48, 5


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 intermediate_size=4 * D, image_size=SIZE, patch_size=P, num_labels=CLASSES,
                                 layer_norm_eps=1e-6)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _hf_weights(hf) -> dict[str, torch.Tensor]:
    """Per-layer tensors by role, read from transformers' modules (its names differ across versions)."""
    vit = hf.vit
    layers = vit.encoder.layer if hasattr(vit, "encoder") else vit.layers
    out = {"cls": vit.embeddings.cls_token, "pos": vit.embeddings.position_embeddings,
           "conv_w": vit.embeddings.patch_embeddings.projection.weight,
           "conv_b": vit.embeddings.patch_embeddings.projection.bias,
           "norm_w": vit.layernorm.weight, "norm_b": vit.layernorm.bias,
           "head_w": hf.classifier.weight, "head_b": hf.classifier.bias}
    for i, layer in enumerate(layers):
        att = layer.attention
        q, k, v, o = ((att.attention.query, att.attention.key, att.attention.value, att.output.dense)
                      if hasattr(att, "attention") else (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
        fc1, fc2 = ((layer.intermediate.dense, layer.output.dense) if hasattr(layer, "intermediate")
                    else (layer.mlp.fc1, layer.mlp.fc2))
        out.update({f"{i}.ln1_w": layer.layernorm_before.weight, f"{i}.ln1_b": layer.layernorm_before.bias,
                    f"{i}.ln2_w": layer.layernorm_after.weight, f"{i}.ln2_b": layer.layernorm_after.bias,
                    f"{i}.q": q, f"{i}.k": k, f"{i}.v": v, f"{i}.o": o, f"{i}.fc1": fc1, f"{i}.fc2": fc2})
    return out


def hf_from_ours(ckpt, labels: list[str]):
    """A transformers ViT holding our checkpoint's weights: how the job-spec tests get an HF
    directory and a JAX .npz of the trained digits model (written by save_pretrained / jax_npz)."""
    c, sd = ckpt.config, ckpt.state_dict
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=c.dim, num_hidden_layers=c.depth, num_attention_heads=c.heads, intermediate_size=c.mlp_dim,
        image_size=c.image_size, patch_size=c.patch_size, num_labels=c.num_classes, layer_norm_eps=c.layer_norm_eps,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})).eval()
    w = _hf_weights(hf)
    ours = {"cls": "cls_token", "pos": "pos_embed", "conv_w": "patch_embed.proj.weight",
            "conv_b": "patch_embed.proj.bias", "norm_w": "norm.weight", "norm_b": "norm.bias",
            "head_w": "head.weight", "head_b": "head.bias"}
    with torch.no_grad():
        for role, name in ours.items():
            w[role].copy_(sd[name])
        for i in range(c.depth):
            b = f"blocks.{i}"
            for role, name in (("ln1_w", "norm1.weight"), ("ln1_b", "norm1.bias"),
                               ("ln2_w", "norm2.weight"), ("ln2_b", "norm2.bias")):
                w[f"{i}.{role}"].copy_(sd[f"{b}.{name}"])
            for kind in ("weight", "bias"):
                for n, part in zip("qkv", sd[f"{b}.attn.qkv.{kind}"].chunk(3), strict=True):
                    getattr(w[f"{i}.{n}"], kind).copy_(part)
                for n, name in (("o", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                    getattr(w[f"{i}.{n}"], kind).copy_(sd[f"{b}.{name}.{kind}"])
    return hf


def timm_state_dict(hf) -> dict[str, torch.Tensor]:
    w = _hf_weights(hf)
    sd = {"cls_token": w["cls"], "pos_embed": w["pos"], "patch_embed.proj.weight": w["conv_w"],
          "patch_embed.proj.bias": w["conv_b"], "norm.weight": w["norm_w"], "norm.bias": w["norm_b"],
          "head.weight": w["head_w"], "head.bias": w["head_b"]}
    for i in range(hf.config.num_hidden_layers):
        b = f"blocks.{i}"
        sd |= {f"{b}.norm1.weight": w[f"{i}.ln1_w"], f"{b}.norm1.bias": w[f"{i}.ln1_b"],
               f"{b}.norm2.weight": w[f"{i}.ln2_w"], f"{b}.norm2.bias": w[f"{i}.ln2_b"],
               f"{b}.attn.qkv.weight": torch.cat([w[f"{i}.{n}"].weight for n in "qkv"]),
               f"{b}.attn.qkv.bias": torch.cat([w[f"{i}.{n}"].bias for n in "qkv"]),
               f"{b}.attn.proj.weight": w[f"{i}.o"].weight, f"{b}.attn.proj.bias": w[f"{i}.o"].bias,
               f"{b}.mlp.fc1.weight": w[f"{i}.fc1"].weight, f"{b}.mlp.fc1.bias": w[f"{i}.fc1"].bias,
               f"{b}.mlp.fc2.weight": w[f"{i}.fc2"].weight, f"{b}.mlp.fc2.bias": w[f"{i}.fc2"].bias}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def jax_npz(hf) -> bytes:
    w = {k: v.detach().numpy() for k, v in _hf_weights(hf).items() if not hasattr(v, "weight")}
    mods = {k: v for k, v in _hf_weights(hf).items() if hasattr(v, "weight")}
    arrays = {"cls": w["cls"], "Transformer/posembed_input/pos_embedding": w["pos"],
              "embedding/kernel": w["conv_w"].transpose(2, 3, 1, 0), "embedding/bias": w["conv_b"],
              "Transformer/encoder_norm/scale": w["norm_w"], "Transformer/encoder_norm/bias": w["norm_b"],
              "head/kernel": w["head_w"].T, "head/bias": w["head_b"]}
    D, HEADS = hf.config.hidden_size, hf.config.num_attention_heads  # noqa: N806 (the module's names)
    hd = D // HEADS
    for i in range(hf.config.num_hidden_layers):
        b = f"Transformer/encoderblock_{i}"
        att = f"{b}/MultiHeadDotProductAttention_1"
        arrays |= {f"{b}/LayerNorm_0/scale": w[f"{i}.ln1_w"], f"{b}/LayerNorm_0/bias": w[f"{i}.ln1_b"],
                   f"{b}/LayerNorm_2/scale": w[f"{i}.ln2_w"], f"{b}/LayerNorm_2/bias": w[f"{i}.ln2_b"]}
        for name, n in (("query", "q"), ("key", "k"), ("value", "v")):
            lin = mods[f"{i}.{n}"]
            arrays[f"{att}/{name}/kernel"] = lin.weight.detach().numpy().T.reshape(D, HEADS, hd)
            arrays[f"{att}/{name}/bias"] = lin.bias.detach().numpy().reshape(HEADS, hd)
        o = mods[f"{i}.o"]
        arrays[f"{att}/out/kernel"] = o.weight.detach().numpy().T.reshape(HEADS, hd, D)
        arrays[f"{att}/out/bias"] = o.bias.detach().numpy()
        for j, n in ((0, "fc1"), (1, "fc2")):
            lin = mods[f"{i}.{n}"]
            arrays[f"{b}/MlpBlock_3/Dense_{j}/kernel"] = lin.weight.detach().numpy().T
            arrays[f"{b}/MlpBlock_3/Dense_{j}/bias"] = lin.bias.detach().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _assert_parity(ckpt, hf, size=SIZE):
    ours = ckpt.build()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=size != SIZE).logits
        _, logits = ours(x)
    assert (logits - ref).abs().max().item() < 1e-4


def test_timm_safetensors_and_pth(tmp_path, hf):
    sd = timm_state_dict(hf)
    save_file(sd, str(tmp_path / "vit.safetensors"))
    torch.save(sd, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        ckpt = load_checkpoint(str(tmp_path / name), heads=HEADS)
        assert (ckpt.config.dim, ckpt.config.depth, ckpt.config.heads, ckpt.config.patch_size) == (D, LAYERS, HEADS, P)
        _assert_parity(ckpt, hf)


def test_timm_at_another_image_size_interpolates_positions(tmp_path, hf):
    save_file(timm_state_dict(hf), str(tmp_path / "vit.safetensors"))
    ckpt = load_checkpoint(str(tmp_path / "vit.safetensors"), image_size=64, heads=HEADS)  # 48 px: 6x6 -> 8x8
    assert ckpt.preprocess.image_size == 64
    _assert_parity(ckpt, hf, size=64)


def test_jax_npz(tmp_path, hf):
    (tmp_path / "ViT-test.npz").write_bytes(jax_npz(hf))
    ckpt = load_checkpoint(str(tmp_path / "ViT-test.npz"))
    assert ckpt.config.depth == LAYERS and ckpt.config.num_classes == CLASSES
    assert ckpt.config.heads == HEADS  # read from the query kernel's shape
    _assert_parity(ckpt, hf)


def test_jax_npz_with_pre_logits_is_refused(tmp_path, hf):
    z = dict(np.load(io.BytesIO(jax_npz(hf))))
    z["pre_logits/kernel"] = np.zeros((D, D), np.float32)
    buf = io.BytesIO()
    np.savez(buf, **z)
    (tmp_path / "in21k.npz").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="pre_logits"):
        load_checkpoint(str(tmp_path / "in21k.npz"))


def test_hf_directory_with_preprocessor_config_and_interpolation(tmp_path, hf):
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 48, "width": 48}}')
    ckpt = load_checkpoint(str(tmp_path / "hf"), image_size=64)
    assert ckpt.preprocess.mean == (0.1, 0.2, 0.3) and ckpt.preprocess.resize == "squash"
    _assert_parity(ckpt, hf, size=64)


def test_bad_key_is_named(tmp_path, hf):
    sd = timm_state_dict(hf)
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:, :10].contiguous()
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        load_checkpoint(str(tmp_path / "bad.safetensors"), heads=HEADS).build()


def test_labels_and_normalization_overrides(hf, tmp_path):
    save_file(timm_state_dict(hf), str(tmp_path / "vit.safetensors"))
    ckpt = load_checkpoint(str(tmp_path / "vit.safetensors"), mean=(0.485, 0.456, 0.406), labels=list("abcde"),
                           heads=HEADS)
    assert ckpt.labels == list("abcde") and ckpt.preprocess.mean == (0.485, 0.456, 0.406)


def _hub_cache_repo(cache, repo_id: str, files: dict[str, bytes]) -> str:
    """A repo as huggingface_hub caches it (docs: "Manage huggingface_hub cache-system"):
    models--ORG--NAME/refs/main holds the commit, snapshots/COMMIT/ holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return commit


def test_hf_uris_load_timm_and_transformers_repos_from_the_hub_cache(tmp_path, hf, monkeypatch):
    """hf://ORG/NAME goes through huggingface_hub.snapshot_download for real; offline, it serves
    the repo from the local cache, which this test fills (no network here)."""
    import json

    from safetensors.torch import save as save_bytes

    cache = tmp_path / "hub"
    labels = [f"thing_{i}" for i in range(CLASSES)]
    timm_config = {"architecture": "vit_tiny_patch8_48", "num_classes": CLASSES, "global_pool": "token",
                   "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3,
                                      "crop_pct": 0.9, "crop_mode": "center", "num_classes": CLASSES},
                   "label_names": labels}
    _hub_cache_repo(cache, "acme/vit-timm", {"config.json": json.dumps(timm_config).encode(),
                                             "model.safetensors": save_bytes(timm_state_dict(hf))})
    hf.save_pretrained(tmp_path / "hfdir")
    _hub_cache_repo(cache, "acme/vit-hf", {p.name: p.read_bytes() for p in (tmp_path / "hfdir").iterdir()})
    _hub_cache_repo(cache, "acme/vit-jax", {"ViT-T_8.npz": jax_npz(hf)})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    timm = load_checkpoint("hf://acme/vit-timm", heads=HEADS)
    assert timm.labels == labels and timm.preprocess.crop_pct == 0.9 and timm.source == "hf://acme/vit-timm"
    _assert_parity(timm, hf)
    _assert_parity(load_checkpoint("hf://acme/vit-hf@main"), hf)
    _assert_parity(load_checkpoint("hf://acme/vit-jax/ViT-T_8.npz"), hf)
    with pytest.raises(CheckpointError, match="acme/missing.*HF_TOKEN"):
        load_checkpoint("hf://acme/missing")
    with pytest.raises(CheckpointError, match="expected hf://ORG/NAME"):
        load_checkpoint("hf://just-a-name")


@pytest.mark.parametrize("pooling", ["cls", "gap"])
def test_labels_come_from_the_head_as_trained_whatever_the_embedding_pools(tmp_path, hf, pooling):
    """A transformers ViT (its head trained on the class token) with model.pooling cls or gap: the
    embedding is what was asked for (transformers' class token, or its mean of patch tokens), and the
    logits are transformers' logits either way."""
    hf.save_pretrained(tmp_path / "hf")
    ckpt = load_checkpoint(str(tmp_path / "hf"), pooling=pooling)
    ours = ckpt.build()
    x = torch.randn(12, 3, SIZE, SIZE)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        tokens = hf.vit.layernorm(out.hidden_states[-1])  # (B, 1+N, D) after the final norm
        emb, logits = ours(x)
    want = tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)
    assert (emb - want).abs().max().item() < 1e-4
    assert (logits - out.logits).abs().max().item() < 1e-4
    assert (logits.argmax(1) == out.logits.argmax(1)).all()
    if pooling == "gap":  # another embedding is another model id; the head's input is recorded with it
        assert ckpt.config.head_pooling == "cls" and ckpt.model_id != load_checkpoint(str(tmp_path / "hf")).model_id


def test_a_timm_avg_pool_model_keeps_its_fc_norm_head_when_the_embedding_is_the_class_token(tmp_path, hf):
    sd = timm_state_dict(hf)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")  # timm's avg-pool layout
    sd["norm.weight"], sd["norm.bias"] = torch.empty(0), torch.empty(0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "avg.safetensors"))
    gap = load_checkpoint(str(tmp_path / "avg.safetensors"), heads=HEADS)
    cls = load_checkpoint(str(tmp_path / "avg.safetensors"), heads=HEADS, pooling="cls")
    assert gap.config.pooling == "gap" and gap.config.fc_norm and cls.config.head_pooling == "gap"
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        emb_gap, logits_gap = gap.build()(x)
        emb_cls, logits_cls = cls.build()(x)
    assert (logits_cls - logits_gap).abs().max().item() < 1e-5  # the same head input: fc_norm(mean of patches)
    assert (emb_cls - emb_gap).abs().max().item() > 1e-2  # but another embedding
