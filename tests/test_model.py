"""The ViT against an oracle that is not our code: Hugging Face transformers' ViT."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.model.vit import ViT, ViTConfig, config_for_arch, resize_pos_embed

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, image_size=196, patch=14, layers=6, dim=96, heads=4, classes=7, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=4 * dim, image_size=image_size, patch_size=patch,
                                 num_labels=classes, id2label={i: f"c{i}" for i in range(classes)},
                                 label2id={f"c{i}": i for i in range(classes)})
    hf = transformers.ViTForImageClassification(cfg).eval()
    # Non-trivial values everywhere (default init leaves biases and the class token at zero).
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def test_parity_with_transformers_non_default_config(tmp_path):
    hf = _hf_model(tmp_path)
    ckpt = load_checkpoint(str(tmp_path / "hf"))
    assert ckpt.config.patch_size == 14 and ckpt.config.depth == 6 and ckpt.config.image_size == 196
    assert ckpt.labels == [f"c{i}" for i in range(7)]
    ours = ckpt.build()
    x = torch.randn(3, 3, 196, 196)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        emb, logits = ours(x)
    hf_cls = hf.vit.layernorm(out.hidden_states[-1])[:, 0]  # final-norm CLS token
    assert (logits - out.logits).abs().max().item() < 1e-4
    assert (emb - hf_cls).abs().max().item() < 1e-4


def test_hf_pytorch_bin_loads_with_weights_only(tmp_path):
    hf = _hf_model(tmp_path, image_size=32, patch=8, layers=2, dim=32, heads=2)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    ours = load_checkpoint(str(d)).build()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x)[1] - hf(pixel_values=x).logits).abs().max().item() < 1e-4


def test_own_format_roundtrip_and_model_id(tmp_path):
    torch.manual_seed(1)
    model = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, num_classes=3)).eval()
    from pipeline.model.checkpoints import Preprocess

    path = str(tmp_path / "m.safetensors")
    save_checkpoint(path, model, Preprocess(image_size=32), ["a", "b", "c"])
    ckpt = load_checkpoint(path)
    assert ckpt.labels == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.build()(x)[1], model(x)[1])
    # The id changes with the weights, not with the file path.
    assert load_checkpoint(path).model_id == ckpt.model_id
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save_checkpoint(str(tmp_path / "m2.safetensors"), model, Preprocess(image_size=32), ["a", "b", "c"])
    assert load_checkpoint(str(tmp_path / "m2.safetensors")).model_id != ckpt.model_id


def test_mismatched_checkpoint_names_the_first_bad_key(tmp_path):
    ckpt = load_checkpoint("builtin:digits")
    ckpt.state_dict["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*shape"):
        ckpt.build()
    ckpt = load_checkpoint("builtin:digits")
    del ckpt.state_dict["norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'norm.bias'"):
        ckpt.build()


def test_position_embeddings_interpolate_for_other_sizes():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64, num_classes=4)).eval()
    pe = resize_pos_embed(model.pos_embed, 6)
    assert pe.shape == (1, 1 + 36, 32)
    assert torch.equal(pe[:, 0], model.pos_embed[:, 0])  # the class token's position is kept
    assert torch.equal(resize_pos_embed(model.pos_embed, 4), model.pos_embed)  # same grid: untouched
    with torch.no_grad():
        emb, logits = model(torch.randn(2, 3, 48, 48))
    assert emb.shape == (2, 32) and logits.shape == (2, 4)


def test_attention_maps_agree_with_sdpa_path():
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=4)
    model = ViT(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(x)
        tokens_explicit, _ = model.forward_features(x, return_attn=True)
        tokens_sdpa = model.forward_features(x)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 17), atol=1e-5)  # rows are distributions
    assert (tokens_explicit - tokens_sdpa).abs().max().item() < 1e-5


def test_gap_pooling_is_mean_of_patch_tokens():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64, pooling="gap")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb, _ = model(x)
        tokens = model.forward_features(x)
    assert torch.allclose(emb, tokens[:, 1:].mean(1))
    assert not torch.allclose(emb, tokens[:, 0])


@pytest.mark.parametrize("arch,dim,depth,heads,patch", [("vit_ti_16", 192, 12, 3, 16), ("vit_b_32", 768, 12, 12, 32),
                                                         ("vit_l_14", 1024, 24, 16, 14)])
def test_arch_names(arch, dim, depth, heads, patch):
    cfg = config_for_arch(arch)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_size) == (dim, depth, heads, patch)
    with pytest.raises(ValueError, match="unknown arch"):
        config_for_arch("vit_xl_16")
