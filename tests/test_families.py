"""The families (CLIP, SigLIP, DINOv2, DeiT distilled) against transformers as the oracle.

Each model is built here from a small config with every weight randomized (norms, biases,
LayerScale, class/register/distillation tokens, the MAP probe included), so that a wrong key
mapping cannot pass on zeros or ones; saved with save_pretrained; loaded through vitpipe; and
compared in fp32 at the native size and at one interpolated size.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.model.checkpoints import CheckpointError, load_checkpoint

import helpers

transformers = pytest.importorskip("transformers")

D, LAYERS, HEADS, MLP, P, SIZE = 48, 2, 4, 96, 8, 32
VISION = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              image_size=SIZE, patch_size=P)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=16)


def randomized(model):
    return helpers.randomized(model, 0.05)


def _save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs diff, scaled by the reference's magnitude where that is above 1."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def _run(ckpt, x):
    with torch.no_grad():
        return ckpt.build()(x)


# --- CLIP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_model_directory_embeds_as_get_image_features(tmp_path, act):
    cfg = transformers.CLIPConfig(vision_config=VISION | {"hidden_act": act}, text_config=TEXT, projection_dim=24)
    hf = randomized(transformers.CLIPModel(cfg))
    ckpt = load_checkpoint(_save(hf, tmp_path / "clip"))
    c = ckpt.config
    assert (c.family, c.patch_bias, c.pre_norm, c.proj_dim, c.act, c.embed_dim) == ("clip", False, True, 24, act, 24)
    for size in (SIZE, 48):
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            pooled = hf.vision_model(pixel_values=x, interpolate_pos_encoding=size != SIZE).pooler_output
            ref = hf.visual_projection(pooled)  # what get_image_features returns
        emb, _ = _run(load_checkpoint(str(tmp_path / "clip"), image_size=size), x)
        assert _close(emb, ref) <= 1e-4, size


def test_clip_vision_model_with_projection_with_and_without_the_prefix(tmp_path):
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
    hf = randomized(transformers.CLIPVisionModelWithProjection(cfg))
    _save(hf, tmp_path / "tower")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = hf(pixel_values=x).image_embeds
    emb, _ = _run(load_checkpoint(str(tmp_path / "tower")), x)
    assert _close(emb, ref) <= 1e-4
    # the same tower saved without `vision_model.` (transformers 5.x's standalone towers)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "tower" / "model.safetensors"))
    save_file({k.removeprefix("vision_model."): v for k, v in sd.items()}, str(tmp_path / "tower" / "model.safetensors"))
    emb2, _ = _run(load_checkpoint(str(tmp_path / "tower")), x)
    assert _close(emb2, ref) <= 1e-4


def test_clip_preprocessing_comes_from_the_processor_config(tmp_path):
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
    path = _save(randomized(transformers.CLIPVisionModelWithProjection(cfg)), tmp_path / "tower")
    (tmp_path / "tower" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    pre = load_checkpoint(path).preprocess
    assert (pre.image_size, pre.resize, pre.crop_pct, pre.interpolation) == (32, "crop", 0.8, "bicubic")
    assert pre.mean[0] == pytest.approx(0.48145466)


# --- SigLIP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_siglip_model_directory_embeds_with_its_attention_pooling_head(tmp_path, act):
    cfg = transformers.SiglipConfig(vision_config=VISION | {"hidden_act": act}, text_config=TEXT)
    hf = randomized(transformers.SiglipModel(cfg))
    path = _save(hf, tmp_path / "siglip")
    c = load_checkpoint(path).config
    assert (c.family, c.class_token, c.pooling, c.act) == ("siglip", False, "map", {"gelu": "gelu"}.get(act, "gelu_tanh"))
    for size in (SIZE, 48):
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            ref = hf.vision_model(pixel_values=x, interpolate_pos_encoding=size != SIZE).pooler_output
        emb, _ = _run(load_checkpoint(path, image_size=size), x)
        assert _close(emb, ref) <= 1e-4, size


def test_siglip_vision_model_directory_and_its_preprocessing(tmp_path):
    hf = randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    path = _save(hf, tmp_path / "tower")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output
    ckpt = load_checkpoint(path)
    assert _close(_run(ckpt, x)[0], ref) <= 1e-4
    pre = ckpt.preprocess  # no processor file: SigLIP's reference default
    assert (pre.resize, pre.mean, pre.std, pre.interpolation) == ("squash", (0.5,) * 3, (0.5,) * 3, "bilinear")


def test_siglip_has_no_class_token_to_pool(tmp_path):
    hf = randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    path = _save(hf, tmp_path / "tower")
    with pytest.raises(CheckpointError, match="no class token.*map"):
        load_checkpoint(path, pooling="cls")
    gap = load_checkpoint(path, pooling="gap")  # the mean of the patch tokens after the final norm
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state.mean(dim=1)
    assert _close(_run(gap, x)[0], ref) <= 1e-4


def test_a_naflex_siglip2_directory_is_refused_saying_why(tmp_path):
    (tmp_path / "naflex").mkdir()
    (tmp_path / "naflex" / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(CheckpointError, match="NaFlex.*fixed"):
        load_checkpoint(str(tmp_path / "naflex"))


# --- DINOv2 ---------------------------------------------------------------------------------------


def _dinov2(registers: int = 0, swiglu: bool = False, image_size: int = 56):
    """A DINOv2 trained (like the real ones at 518 px) at a larger size than it runs at."""
    common = VISION | {"image_size": image_size, "use_swiglu_ffn": swiglu}
    if registers:
        return randomized(transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=registers)))
    return randomized(transformers.Dinov2Model(transformers.Dinov2Config(**common)))


@pytest.mark.parametrize("registers,swiglu", [(0, False), (2, False), (0, True)])
def test_dinov2_directories_at_their_processor_size_and_another(tmp_path, registers, swiglu):
    hf = _dinov2(registers, swiglu)
    path = _save(hf, tmp_path / "dinov2")
    (tmp_path / "dinov2" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.family, c.registers, c.layer_scale, c.ffn, c.image_size) == (
        "dinov2", registers, True, "swiglu" if swiglu else "mlp", 32)  # trained at 56, run at the crop
    assert "mask_token" not in " ".join(ckpt.state_dict)
    for size in (32, 40):  # both interpolate (7x7 -> 4x4, 5x5), as DINOv2 always does at 224
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            out = hf(pixel_values=x)
        tokens = out.last_hidden_state  # (B, 1+R+N, D)
        for pooling, ref in (("cls", out.pooler_output), ("gap", tokens[:, 1 + registers:].mean(1)),
                             ("cls+gap", torch.cat([tokens[:, 0], tokens[:, 1 + registers:].mean(1)], -1))):
            emb, _ = _run(load_checkpoint(path, image_size=size, pooling=pooling), x)
            assert emb.shape == ref.shape and _close(emb, ref) <= 1e-4, (size, pooling)


def test_dinov2_resizes_positions_as_each_reference_does(tmp_path):
    """transformers' DINOv2 resizes bicubic, its DINOv2 with registers antialiased: the two are
    not the same numbers, and each model matches its own."""
    plain = load_checkpoint(_save(_dinov2(0), tmp_path / "a"))
    reg = load_checkpoint(_save(_dinov2(2), tmp_path / "b"))
    assert (plain.config.pos_interp, reg.config.pos_interp) == ("bicubic", "bicubic_aa")


# --- DeiT distilled -------------------------------------------------------------------------------


def test_deit_distilled_directory_logits_are_the_mean_of_both_heads(tmp_path):
    cfg = transformers.DeiTConfig(**VISION, num_labels=5, id2label={i: f"k{i}" for i in range(5)},
                                  label2id={f"k{i}": i for i in range(5)})
    hf = randomized(transformers.DeiTForImageClassificationWithTeacher(cfg))
    path = _save(hf, tmp_path / "deit")
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.family, c.distill_token, c.num_classes, ckpt.labels[:2]) == ("deit", True, 5, ["k0", "k1"])
    for size in (SIZE, 48):
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            out = hf(pixel_values=x, interpolate_pos_encoding=size != SIZE, output_hidden_states=True)
            cls = hf.deit.layernorm(out.hidden_states[-1])[:, 0]
        emb, logits = _run(load_checkpoint(path, image_size=size), x)
        assert _close(logits, out.logits) <= 1e-4 and _close(emb, cls) <= 1e-4, size
        assert (logits.argmax(1) == out.logits.argmax(1)).all()


def test_an_unknown_model_type_names_what_is_accepted(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert'.*clip.*siglip.*dinov2"):
        load_checkpoint(str(tmp_path / "bert"))


# --- every engine, for every family ----------------------------------------------------------------

SMALL = dict(dim=48, depth=2, heads=4, mlp_dim=96, image_size=32, patch_size=8)
FAMILY_ARCHS = {"clip": ("clip_b_16", {"proj_dim": 24}), "siglip": ("siglip_b_16", {}),
                "dinov2": ("dinov2_l_14_reg", {"num_classes": 0}), "deit": ("deit_s_16_distilled", {"num_classes": 7}),
                "dinov2_swiglu": ("dinov2_g_14", {})}


def small_family(name: str):
    """A small random model of the family's arch, every weight moved off its init."""
    from pipeline.model.checkpoints import Checkpoint, family_preprocess
    from pipeline.model.vit import ViT, config_for_arch

    arch, extra = FAMILY_ARCHS[name]
    cfg = config_for_arch(arch, **SMALL, **extra)
    model = randomized(ViT(cfg))
    return Checkpoint(cfg, model.state_dict(), family_preprocess(cfg), [f"c{i}" for i in range(cfg.num_classes)], arch)


@pytest.mark.parametrize("name", sorted(FAMILY_ARCHS))
def test_every_family_runs_on_torch_bf16_onnx_fp32_and_int8_with_the_gate(tmp_path, name):
    import numpy as np

    from pipeline.engines.build import build_engine
    from pipeline.engines.onnx_engine import OnnxEngine
    from pipeline.engines.torch_engine import TorchEngine
    from pipeline.gate import compare

    ckpt = small_family(name)
    images = np.random.default_rng(0).integers(0, 255, (48, 32, 32, 3), dtype=np.uint8)  # (B, S, S, 3)
    ref = TorchEngine(ckpt, "fp32", "cpu", 1)
    emb, logits = ref.run(images)
    assert emb.shape == (48, ckpt.config.embed_dim) and ref.embed_dim == ckpt.config.embed_dim
    onnx = OnnxEngine(ckpt, "fp32", "cpu", 1)
    e2, l2 = onnx.run(images)
    assert np.abs(e2 - emb).max() < 1e-4 and np.abs(l2 - logits).max() < 1e-4  # the graph TensorRT would take
    bf16 = compare(ref, TorchEngine(ckpt, "bf16", "cpu", 1), images, min_cosine=0.99, min_top1=0.5)
    assert bf16.passed and bf16.cosine_mean < 1.0, bf16.describe()
    int8 = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path), calibration=images[:32])
    result = compare(ref, int8.engine, images[32:], min_cosine=0.97, min_top1=0.5)
    assert result.passed and result.cosine_mean < 0.99999, result.describe()  # quantized, and close


def test_the_engine_cache_keys_each_family_apart(tmp_path):
    ids = {name: small_family(name).model_id for name in FAMILY_ARCHS}
    assert len(set(ids.values())) == len(ids)


def test_random_family_archs_have_the_real_sizes():
    from pipeline.model.vit import config_for_arch

    c = config_for_arch("clip_l_14")
    assert (c.dim, c.depth, c.heads, c.patch_size, c.proj_dim, c.embed_dim) == (1024, 24, 16, 14, 768, 768)
    s = config_for_arch("siglip_so400m_14")
    assert (s.dim, s.depth, s.heads, s.mlp_dim, s.class_token, s.pooling) == (1152, 27, 16, 4304, False, "map")
    d = config_for_arch("dinov2_l_14_reg")
    assert (d.dim, d.registers, d.layer_scale, d.prefix_tokens) == (1024, 4, True, 5)
    g = config_for_arch("dinov2_g_14")
    assert (g.dim, g.depth, g.heads, g.ffn) == (1536, 40, 24, "swiglu")
    t = config_for_arch("deit_b_16_distilled")
    assert (t.dim, t.distill_token, t.num_classes, t.pos_tokens) == (768, True, 1000, 2)


# --- analyze: the tokens before the patches are left out and named ---------------------------------


def _distances_by_loops(attentions, prefix: int, grid: int, patch: int) -> np.ndarray:
    """The paper's mean attention distance written out, over patch queries and patch keys only."""
    n = grid * grid
    dist = np.array([[patch * np.hypot(i // grid - j // grid, i % grid - j % grid) for j in range(n)]
                     for i in range(n)])
    out = []
    for a in attentions:  # (B, H, T, T) per layer
        a = a.double().numpy()[:, :, prefix:, prefix:]
        out.append(np.mean([[np.mean([a[b, h, q] @ dist[q] for q in range(n)]) for h in range(a.shape[1])]
                            for b in range(a.shape[0])], axis=0))
    return np.array(out)  # (L, H)


def test_analyze_a_dinov2_with_registers_leaves_class_and_register_tokens_out(tmp_path):
    from pipeline.analyze import Probe, analyze_part, rollout, tokens_note
    from pipeline.config import JobSpec
    from pipeline.decode import decode_image
    from pipeline.sources import Shard, read_parts

    from helpers import image_bytes, tar_bytes

    hf = _dinov2(registers=2, image_size=32)
    with torch.no_grad():  # sharper attention: heads that differ
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = _save(hf, tmp_path / "dino")
    ckpt = load_checkpoint(path, image_size=32)  # trained at 32 too: transformers does not resize
    ckpt.preprocess = replace(ckpt.preprocess, resize="squash")
    members = [(f"img{i}.jpg", image_bytes(40 + 7 * i, 36 + 5 * i, seed=i)) for i in range(4)]
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    spec = JobSpec.model_validate({"source": {"uri": str(tmp_path)}, "output": {"uri": str(tmp_path / "out")}})
    (part,) = list(read_parts(Shard(str(tmp_path / "s.tar"), "e", 0), spec.source))
    probe = Probe(ckpt)
    tables, sums, counts = analyze_part(part.records, probe, ckpt.preprocess, call_size=4)
    pixels = np.stack([decode_image(data, ckpt.preprocess) for _, data in members])
    mean, std = np.array(ckpt.preprocess.mean), np.array(ckpt.preprocess.std)
    x = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    eager = transformers.Dinov2WithRegistersModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(pixel_values=x, output_attentions=True)
    expected = _distances_by_loops(out.attentions, prefix=3, grid=4, patch=8)  # class + 2 registers left out
    np.testing.assert_allclose(sums / counts["ok"], expected, rtol=1e-4, atol=1e-4)
    emb = {c: np.stack(tables["ok"].column(c).to_numpy(zero_copy_only=False)) for c in ("cls", "mean")}
    np.testing.assert_allclose(emb["cls"], out.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(emb["mean"], out.last_hidden_state[:, 3:].mean(1).numpy(), atol=1e-4)
    assert rollout(probe.run(pixels)[2], 3).shape == (4, 16)
    note = tokens_note(ckpt.config)
    assert note["prefix"] == ["class", "register 0", "register 1"] and note["first_embedding"] == "class token"


def test_analyze_a_siglip_says_what_stands_for_the_class_token(tmp_path):
    from pipeline.analyze import Probe, rollout, tokens_note

    hf = randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    ckpt = load_checkpoint(_save(hf, tmp_path / "siglip"))
    images = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8)
    first, patch_mean, maps = Probe(ckpt).run(images)
    x = torch.from_numpy((images / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = hf(pixel_values=x)
    np.testing.assert_allclose(first, out.pooler_output.numpy(), atol=1e-4)  # the MAP head's output
    np.testing.assert_allclose(patch_mean, out.last_hidden_state.mean(1).numpy(), atol=1e-4)
    r = rollout(maps, 0, class_token=False)  # (B, N): the mean of every token's row
    assert r.shape == (3, 16) and torch.allclose(r.sum(-1), torch.ones(3, dtype=r.dtype))
    note = tokens_note(ckpt.config)
    assert note["prefix"] == [] and "no class token" in note["rollout"] and "attention-pooling" in note["first_embedding"]
