"""The other formats of each family against transformers: OpenAI CLIP, open_clip (native and
timm trunks), timm (DeiT distilled, DINOv2 with and without registers, SigLIP), the DINOv2
repository's .pth and big_vision's SigLIP .npz.

Each test builds the transformers model from a small config, moves every weight off its init
(norms, biases, LayerScale, tokens and the MAP probe included), saves it with save_pretrained,
then writes the same weights under the other format's own names, as that project lays them
out (written here from its source, not by calling vitpipe's converters). Both files go through
load_checkpoint and must give the transformers model's embedding (and logits, where there is a
head) to max abs diff <= 1e-5. `pytest -s` prints the parity table.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.model.checkpoints import CheckpointError, load_checkpoint

from helpers import randomized

transformers = pytest.importorskip("transformers")

# Head width 64, as in every real ViT of these families (the readers without a config infer
# the head count as width / 64).
D, LAYERS, HEADS, MLP, P, SIZE = 128, 2, 2, 256, 8, 32
VISION = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              image_size=SIZE, patch_size=P)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=16)
TOL = 1e-5


def saved(model, path) -> dict[str, torch.Tensor]:
    """save_pretrained, and the names and tensors as they are on disk."""
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def embed(uri: str, x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return load_checkpoint(uri, **kw).build()(x)


def agree(what: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    cos = F.cosine_similarity(ours.flatten(1), ref.flatten(1), dim=1).min().item()
    print(f"PARITY {what}: max abs diff {diff:.2e}, cosine {cos:.7f}")
    assert ours.shape == ref.shape and diff <= TOL, (what, diff)


def qkv(sd: dict, prefix: str, names=("q_proj", "k_proj", "v_proj"), kind: str = "weight") -> torch.Tensor:
    return torch.cat([sd[f"{prefix}.{n}.{kind}"] for n in names])


# --- CLIP: OpenAI's layout (clip/model.py), which open_clip's native tower keeps ------------------


def openai_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under OpenAI CLIP's names, text tower included."""
    v = "vision_model."
    sd = {"visual.conv1.weight": hf[f"{v}embeddings.patch_embedding.weight"],
          "visual.class_embedding": hf[f"{v}embeddings.class_embedding"],
          "visual.positional_embedding": hf[f"{v}embeddings.position_embedding.weight"],
          "visual.ln_pre.weight": hf[f"{v}pre_layrnorm.weight"], "visual.ln_pre.bias": hf[f"{v}pre_layrnorm.bias"],
          "visual.ln_post.weight": hf[f"{v}post_layernorm.weight"],
          "visual.ln_post.bias": hf[f"{v}post_layernorm.bias"],
          "visual.proj": hf["visual_projection.weight"].T.contiguous(),  # (D, E), used as x @ proj
          # the text tower and the scalars the TorchScript archives carry: not the image tower's
          "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "transformer.resblocks.0.ln_1.weight": hf["text_model.encoder.layers.0.layer_norm1.weight"],
          "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          "text_projection": hf["text_projection.weight"].T.contiguous(), "logit_scale": hf["logit_scale"],
          "input_resolution": torch.tensor(SIZE), "context_length": torch.tensor(16), "vocab_size": torch.tensor(64)}
    for i in range(LAYERS):
        h, o = f"{v}encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            sd[f"{o}.ln_1.{kind}"] = hf[f"{h}.layer_norm1.{kind}"]
            sd[f"{o}.attn.in_proj_{kind}"] = qkv(hf, f"{h}.self_attn", kind=kind)
            sd[f"{o}.attn.out_proj.{kind}"] = hf[f"{h}.self_attn.out_proj.{kind}"]
            sd[f"{o}.ln_2.{kind}"] = hf[f"{h}.layer_norm2.{kind}"]
            sd[f"{o}.mlp.c_fc.{kind}"] = hf[f"{h}.mlp.fc1.{kind}"]
            sd[f"{o}.mlp.c_proj.{kind}"] = hf[f"{h}.mlp.fc2.{kind}"]
    return sd


def clip(tmp_path, act: str):
    cfg = transformers.CLIPConfig(vision_config=VISION | {"hidden_act": act}, text_config=TEXT, projection_dim=24)
    model = randomized(transformers.CLIPModel(cfg))
    return model, saved(model, tmp_path / "hf")


def clip_reference(model, x):
    with torch.no_grad():  # what get_image_features returns
        return model.visual_projection(model.vision_model(pixel_values=x).pooler_output)


def test_openai_clip_state_dict(tmp_path):
    model, hf = clip(tmp_path, "quick_gelu")
    torch.save(openai_layout(hf), tmp_path / "ViT-B-32.pth")
    ckpt = load_checkpoint(str(tmp_path / "ViT-B-32.pth"))
    c, pre = ckpt.config, ckpt.preprocess
    assert (c.family, c.act, c.patch_bias, c.pre_norm, c.proj_dim, c.heads, c.layer_norm_eps) == (
        "clip", "quick_gelu", False, True, 24, HEADS, 1e-5)
    assert (pre.image_size, pre.resize, pre.crop_pct, pre.mean[0]) == (SIZE, "crop", 1.0, pytest.approx(0.48145466))
    x = torch.randn(3, 3, SIZE, SIZE)
    ref = clip_reference(model, x)
    agree("OpenAI CLIP .pth x CLIP x 32px", embed(str(tmp_path / "ViT-B-32.pth"), x)[0], ref)
    agree("HF CLIPModel dir x CLIP x 32px", embed(str(tmp_path / "hf"), x)[0], ref)


def test_openai_torchscript_archive_is_refused_saying_to_resave_the_state_dict(tmp_path):
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    torch.jit.save(torch.jit.trace(Tower(), torch.zeros(1, 4)), str(tmp_path / "ViT-B-32.pt"))
    assert any(n.endswith("constants.pkl") for n in zipfile.ZipFile(tmp_path / "ViT-B-32.pt").namelist())
    with pytest.raises(CheckpointError, match=r"TorchScript.*state_dict\(\)"):
        load_checkpoint(str(tmp_path / "ViT-B-32.pt"))


def test_a_resnet_clip_is_refused_by_name(tmp_path):
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1), "visual.attnpool.positional_embedding":
                torch.zeros(5, 4), "text_projection": torch.zeros(4, 4)}, tmp_path / "RN50.pt")
    with pytest.raises(CheckpointError, match="ResNet CLIP"):
        load_checkpoint(str(tmp_path / "RN50.pt"))


def open_clip_dir(path, sd: dict, vision_cfg: dict, quick_gelu: bool, pp: dict, bin: bool = False) -> str:
    """An open_clip directory as open_clip's push_to_hf_hub writes it."""
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg,
                      "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1}},
        "preprocess_cfg": pp}))
    if bin:
        torch.save(sd, path / "open_clip_pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "open_clip_model.safetensors"))
    return str(path)


@pytest.mark.parametrize("bin", [False, True])
def test_open_clip_native_tower(tmp_path, bin):
    """open_clip's own VisionTransformer (OpenAI's names), GELU, head_width 32: 4 heads, not width / 64."""
    cfg = transformers.CLIPConfig(vision_config=VISION | {"hidden_act": "gelu", "num_attention_heads": 4},
                                  text_config=TEXT, projection_dim=24)
    model = randomized(transformers.CLIPModel(cfg))
    hf = saved(model, tmp_path / "hf")
    sd = {k: v for k, v in openai_layout(hf).items() if not k.endswith(("resolution", "length", "size"))}
    vision = {"image_size": SIZE, "layers": LAYERS, "width": D, "head_width": 32, "patch_size": P, "mlp_ratio": 2.0}
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}
    path = open_clip_dir(tmp_path / "oc", sd, vision, False, pp, bin)
    ckpt = load_checkpoint(path)
    c, pre = ckpt.config, ckpt.preprocess
    assert (c.family, c.act, c.heads, c.proj_dim, c.pooling) == ("clip", "gelu", 4, 24, "cls")
    assert (pre.image_size, pre.resize, pre.interpolation, pre.mean, pre.std) == (
        SIZE, "squash", "bilinear", (0.5,) * 3, (0.25,) * 3)
    x = torch.randn(3, 3, SIZE, SIZE)
    agree(f"open_clip dir ({'bin' if bin else 'safetensors'}) native x CLIP x 32px", embed(path, x)[0],
          clip_reference(model, x))


def test_open_clip_native_tower_with_quick_gelu_and_layer_scale_and_avg_pool(tmp_path):
    """open_clip's switches the OpenAI layout does not have: LayerScale (ls_init_value) and
    pool_type avg; compared with our own ViT in the same switches (no transformers model has them)."""
    from pipeline.model.vit import ViT

    model, hf = clip(tmp_path, "quick_gelu")
    sd = openai_layout(hf)
    torch.manual_seed(1)
    for i in range(LAYERS):
        for n in (1, 2):
            sd[f"visual.transformer.resblocks.{i}.ls_{n}.gamma"] = 1 + 0.1 * torch.randn(D)
    vision = {"image_size": SIZE, "layers": LAYERS, "width": D, "patch_size": P, "ls_init_value": 0.1,
              "pool_type": "avg", "final_ln_after_pool": True}
    path = open_clip_dir(tmp_path / "oc", sd, vision, True, {})
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.family, c.act, c.layer_scale, c.pooling, c.fc_norm) == ("clip", "quick_gelu", True, "gap", True)
    # open_clip's forward, written out: ln_pre, blocks with LayerScale, mean of the patches, ln_post, @ proj
    x = torch.randn(2, 3, SIZE, SIZE)
    vit = ViT(c)
    vit.load_state_dict(ckpt.state_dict)
    with torch.no_grad():
        t = F.conv2d(x, sd["visual.conv1.weight"], stride=P).flatten(2).transpose(1, 2)
        t = torch.cat([sd["visual.class_embedding"].expand(2, 1, D), t], 1) + sd["visual.positional_embedding"]
        t = F.layer_norm(t, (D,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
        for i in range(LAYERS):
            b = f"visual.transformer.resblocks.{i}"
            y = F.layer_norm(t, (D,), sd[f"{b}.ln_1.weight"], sd[f"{b}.ln_1.bias"], 1e-5)
            y, _ = F.multi_head_attention_forward(
                y.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), D, HEADS, sd[f"{b}.attn.in_proj_weight"],
                sd[f"{b}.attn.in_proj_bias"], None, None, False, 0.0, sd[f"{b}.attn.out_proj.weight"],
                sd[f"{b}.attn.out_proj.bias"], need_weights=False)
            t = t + y.transpose(0, 1) * sd[f"{b}.ls_1.gamma"]
            y = F.layer_norm(t, (D,), sd[f"{b}.ln_2.weight"], sd[f"{b}.ln_2.bias"], 1e-5)
            y = F.linear(y, sd[f"{b}.mlp.c_fc.weight"], sd[f"{b}.mlp.c_fc.bias"])
            y = F.linear(y * torch.sigmoid(1.702 * y), sd[f"{b}.mlp.c_proj.weight"], sd[f"{b}.mlp.c_proj.bias"])
            t = t + y * sd[f"{b}.ls_2.gamma"]
        pooled = F.layer_norm(t[:, 1:].mean(1), (D,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
        ref = pooled @ sd["visual.proj"]
    agree("open_clip dir native+LayerScale+avg x CLIP x 32px", embed(path, x)[0], ref)


def timm_blocks(hf: dict, prefix: str, out: str, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """transformers CLIP/SigLIP encoder layers under timm's VisionTransformer names."""
    sd = {}
    for i in range(layers):
        h, o = f"{prefix}encoder.layers.{i}", f"{out}blocks.{i}"
        for kind in ("weight", "bias"):
            sd[f"{o}.norm1.{kind}"] = hf[f"{h}.layer_norm1.{kind}"]
            sd[f"{o}.attn.qkv.{kind}"] = qkv(hf, f"{h}.self_attn", kind=kind)
            sd[f"{o}.attn.proj.{kind}"] = hf[f"{h}.self_attn.out_proj.{kind}"]
            sd[f"{o}.norm2.{kind}"] = hf[f"{h}.layer_norm2.{kind}"]
            sd[f"{o}.mlp.fc1.{kind}"] = hf[f"{h}.mlp.fc1.{kind}"]
            sd[f"{o}.mlp.fc2.{kind}"] = hf[f"{h}.mlp.fc2.{kind}"]
    return sd


def test_open_clip_timm_trunk_clip_with_a_linear_projection(tmp_path):
    """TimmModel(vit_*_clip_*, timm_pool token, timm_proj linear): visual.trunk.* then visual.head.proj."""
    model, hf = clip(tmp_path, "gelu")
    v, t = "vision_model.", "visual.trunk."
    sd = {f"{t}patch_embed.proj.weight": hf[f"{v}embeddings.patch_embedding.weight"],
          f"{t}cls_token": hf[f"{v}embeddings.class_embedding"].reshape(1, 1, D),
          f"{t}pos_embed": hf[f"{v}embeddings.position_embedding.weight"][None],
          f"{t}norm_pre.weight": hf[f"{v}pre_layrnorm.weight"], f"{t}norm_pre.bias": hf[f"{v}pre_layrnorm.bias"],
          f"{t}norm.weight": hf[f"{v}post_layernorm.weight"], f"{t}norm.bias": hf[f"{v}post_layernorm.bias"],
          "visual.head.proj.weight": hf["visual_projection.weight"],
          "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"]}
    sd |= timm_blocks(hf, v, t)
    vision = {"image_size": SIZE, "timm_model_name": "vit_base_patch16_clip_224", "timm_model_pretrained": False,
              "timm_pool": "token", "timm_proj": "linear"}
    path = open_clip_dir(tmp_path / "oc", sd, vision, False, {})
    c = load_checkpoint(path).config
    assert (c.family, c.proj_dim, c.pre_norm, c.layer_norm_eps, c.pooling) == ("clip", 24, True, 1e-5, "cls")
    x = torch.randn(3, 3, SIZE, SIZE)
    agree("open_clip dir timm trunk x CLIP x 32px", embed(path, x)[0], clip_reference(model, x))


def test_timm_clip_image_tower_with_its_projection_as_a_zero_bias_head(tmp_path):
    """timm's vit_*_clip_* (num_classes=512): _convert_openai_clip puts OpenAI's proj in head.weight
    with a zero head.bias; the embedding is that projection, not a classifier's logits."""
    model, hf = clip(tmp_path, "gelu")
    v = "vision_model."
    sd = {"patch_embed.proj.weight": hf[f"{v}embeddings.patch_embedding.weight"],
          "cls_token": hf[f"{v}embeddings.class_embedding"].reshape(1, 1, D),
          "pos_embed": hf[f"{v}embeddings.position_embedding.weight"][None],
          "norm_pre.weight": hf[f"{v}pre_layrnorm.weight"], "norm_pre.bias": hf[f"{v}pre_layrnorm.bias"],
          "norm.weight": hf[f"{v}post_layernorm.weight"], "norm.bias": hf[f"{v}post_layernorm.bias"],
          "head.weight": hf["visual_projection.weight"], "head.bias": torch.zeros(24)}
    save_file(sd | timm_blocks(hf, v, ""), str(tmp_path / "vit_base_patch16_clip_224.safetensors"))
    path = str(tmp_path / "vit_base_patch16_clip_224.safetensors")
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.family, c.proj_dim, c.num_classes, c.layer_norm_eps, ckpt.labels) == ("clip", 24, 0, 1e-5, [])
    assert ckpt.preprocess.mean[0] == pytest.approx(0.48145466)
    x = torch.randn(3, 3, SIZE, SIZE)
    agree("timm .safetensors x CLIP x 32px", embed(path, x)[0], clip_reference(model, x))


# --- SigLIP: timm's names (vit_*_siglip_*: attn_pool), open_clip's timm trunk, big_vision's .npz --


def siglip(tmp_path):
    model = randomized(transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)))
    return model, saved(model, tmp_path / "hf")


def siglip_reference(model, x):
    with torch.no_grad():
        return model.vision_model(pixel_values=x).pooler_output


def timm_siglip_layout(hf: dict, out: str = "") -> dict[str, torch.Tensor]:
    """A SiglipModel's image tower under timm's names (VisionTransformer with AttentionPoolLatent)."""
    v, a = "vision_model.", "vision_model.head."
    sd = {f"{out}patch_embed.proj.weight": hf[f"{v}embeddings.patch_embedding.weight"],
          f"{out}patch_embed.proj.bias": hf[f"{v}embeddings.patch_embedding.bias"],
          f"{out}pos_embed": hf[f"{v}embeddings.position_embedding.weight"][None],
          f"{out}norm.weight": hf[f"{v}post_layernorm.weight"], f"{out}norm.bias": hf[f"{v}post_layernorm.bias"],
          f"{out}attn_pool.latent": hf[f"{a}probe"]}
    for kind in ("weight", "bias"):
        packed = hf[f"{a}attention.in_proj_{kind}"]
        sd[f"{out}attn_pool.q.{kind}"], sd[f"{out}attn_pool.kv.{kind}"] = packed[:D], packed[D:]
        sd[f"{out}attn_pool.proj.{kind}"] = hf[f"{a}attention.out_proj.{kind}"]
        sd[f"{out}attn_pool.norm.{kind}"] = hf[f"{a}layernorm.{kind}"]
        sd[f"{out}attn_pool.mlp.fc1.{kind}"] = hf[f"{a}mlp.fc1.{kind}"]
        sd[f"{out}attn_pool.mlp.fc2.{kind}"] = hf[f"{a}mlp.fc2.{kind}"]
    return sd | timm_blocks(hf, v, out)


def test_timm_siglip_state_dict(tmp_path):
    model, hf = siglip(tmp_path)
    save_file({k: v.contiguous() for k, v in timm_siglip_layout(hf).items()}, str(tmp_path / "siglip.safetensors"))
    ckpt = load_checkpoint(str(tmp_path / "siglip.safetensors"))
    c, pre = ckpt.config, ckpt.preprocess
    assert (c.family, c.class_token, c.pooling, c.act) == ("siglip", False, "map", "gelu_tanh")
    assert (pre.resize, pre.mean, pre.interpolation) == ("squash", (0.5,) * 3, "bilinear")
    x = torch.randn(3, 3, SIZE, SIZE)
    ref = siglip_reference(model, x)
    agree("timm .safetensors x SigLIP x 32px", embed(str(tmp_path / "siglip.safetensors"), x)[0], ref)
    agree("HF SiglipModel dir x SigLIP x 32px", embed(str(tmp_path / "hf"), x)[0], ref)


def test_open_clip_timm_trunk_siglip(tmp_path):
    """open_clip's ViT-*-SigLIP: TimmModel(vit_*_siglip_*, timm_pool map, timm_proj none)."""
    model, hf = siglip(tmp_path)
    sd = timm_siglip_layout(hf, "visual.trunk.") | {
        "text.token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "logit_scale": hf["logit_scale"], "logit_bias": hf["logit_bias"]}
    vision = {"image_size": SIZE, "timm_model_name": "vit_base_patch16_siglip_224", "timm_model_pretrained": False,
              "timm_pool": "map", "timm_proj": "none"}
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}
    path = open_clip_dir(tmp_path / "oc", sd, vision, False, pp)
    ckpt = load_checkpoint(path)
    assert (ckpt.config.family, ckpt.config.pooling, ckpt.preprocess.resize) == ("siglip", "map", "squash")
    x = torch.randn(3, 3, SIZE, SIZE)
    agree("open_clip dir timm trunk x SigLIP x 32px", embed(path, x)[0], siglip_reference(model, x))


def big_vision_npz(hf: dict, scan: bool = False, prefix: str = "params/img/") -> bytes:
    """A SiglipModel's image tower as big_vision's ViT saves it (Flax names, "/"-flattened): HWIO
    patch kernel, (in, out) dense kernels, attention kernels with the heads as an axis, and, for a
    scanned encoder, one Transformer/encoderblock stacked along a first axis of depth."""
    v, hd = "vision_model.", D // HEADS
    n = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    z = {f"{prefix}embedding/kernel": n(hf[f"{v}embeddings.patch_embedding.weight"].permute(2, 3, 1, 0)),
         f"{prefix}embedding/bias": n(hf[f"{v}embeddings.patch_embedding.bias"]),
         f"{prefix}pos_embedding": n(hf[f"{v}embeddings.position_embedding.weight"][None]),
         f"{prefix}Transformer/encoder_norm/scale": n(hf[f"{v}post_layernorm.weight"]),
         f"{prefix}Transformer/encoder_norm/bias": n(hf[f"{v}post_layernorm.bias"]),
         "params/txt/Embed_0/embedding": n(hf["text_model.embeddings.token_embedding.weight"]),
         "params/t": n(hf["logit_scale"]), "params/b": n(hf["logit_bias"])}

    def attention(out: str, w: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """{query,key,value,out} (out, in) torch weights -> Flax MultiHeadDotProductAttention."""
        a = {}
        for name in ("query", "key", "value"):
            a[f"{out}/{name}/kernel"] = n(w[f"{name}.weight"].T.reshape(D, HEADS, hd))
            a[f"{out}/{name}/bias"] = n(w[f"{name}.bias"].reshape(HEADS, hd))
        a[f"{out}/out/kernel"] = n(w["out.weight"].T.reshape(HEADS, hd, D))
        a[f"{out}/out/bias"] = n(w["out.bias"])
        return a

    def mlp(out: str, h: str) -> dict[str, np.ndarray]:
        return {f"{out}/Dense_{j}/{k}": n(hf[f"{h}.fc{j + 1}.weight"].T if k == "kernel" else hf[f"{h}.fc{j + 1}.bias"])
                for j in (0, 1) for k in ("kernel", "bias")}

    blocks = []
    for i in range(LAYERS):
        h, s = f"{v}encoder.layers.{i}", {}
        for j, ln in enumerate(("layer_norm1", "layer_norm2")):
            s[f"LayerNorm_{j}/scale"], s[f"LayerNorm_{j}/bias"] = n(hf[f"{h}.{ln}.weight"]), n(hf[f"{h}.{ln}.bias"])
        w = {f"{name}.{kind}": hf[f"{h}.self_attn.{p}_proj.{kind}"]
             for name, p in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out")) for kind in ("weight", "bias")}
        s |= attention("MultiHeadDotProductAttention_0", w) | mlp("MlpBlock_0", f"{h}.mlp")
        blocks.append(s)
    for name in blocks[0]:
        if scan:
            z[f"{prefix}Transformer/encoderblock/{name}"] = np.stack([b[name] for b in blocks])
        else:
            z |= {f"{prefix}Transformer/encoderblock_{i}/{name}": b[name] for i, b in enumerate(blocks)}
    a = f"{v}head."
    packed_w, packed_b = hf[f"{a}attention.in_proj_weight"], hf[f"{a}attention.in_proj_bias"]
    w = {f"{name}.weight": packed_w[j * D:(j + 1) * D] for j, name in enumerate(("query", "key", "value"))}
    w |= {f"{name}.bias": packed_b[j * D:(j + 1) * D] for j, name in enumerate(("query", "key", "value"))}
    w |= {"out.weight": hf[f"{a}attention.out_proj.weight"], "out.bias": hf[f"{a}attention.out_proj.bias"]}
    z[f"{prefix}MAPHead_0/probe"] = n(hf[f"{a}probe"])
    z |= {f"{prefix}MAPHead_0/{k}": val for k, val in attention("MultiHeadDotProductAttention_0", w).items()}
    z[f"{prefix}MAPHead_0/LayerNorm_0/scale"] = n(hf[f"{a}layernorm.weight"])
    z[f"{prefix}MAPHead_0/LayerNorm_0/bias"] = n(hf[f"{a}layernorm.bias"])
    z |= {f"{prefix}MAPHead_0/{k}": val for k, val in mlp("MlpBlock_0", f"{a}mlp").items()}
    buf = io.BytesIO()
    np.savez(buf, **z)
    return buf.getvalue()


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_siglip_npz(tmp_path, scan):
    model, hf = siglip(tmp_path)
    (tmp_path / "siglip.npz").write_bytes(big_vision_npz(hf, scan))
    ckpt = load_checkpoint(str(tmp_path / "siglip.npz"))
    c, pre = ckpt.config, ckpt.preprocess
    assert (c.family, c.class_token, c.pooling, c.act, c.heads) == ("siglip", False, "map", "gelu_tanh", HEADS)
    assert (pre.resize, pre.mean, pre.std, pre.interpolation) == ("squash", (0.5,) * 3, (0.5,) * 3, "bilinear")
    x = torch.randn(3, 3, SIZE, SIZE)
    agree(f"big_vision .npz ({'scan' if scan else 'loop'}) x SigLIP x 32px", embed(str(tmp_path / "siglip.npz"), x)[0],
          siglip_reference(model, x))


def test_big_vision_classifier_npz_with_a_class_token_without_a_position(tmp_path):
    """big_vision's pool_type tok: the class token is prepended after the positions are added
    (it has none), and a head; the reference is transformers' SigLIP encoder fed those tokens."""
    model, hf = siglip(tmp_path)
    buf = np.load(io.BytesIO(big_vision_npz(hf, prefix="params/")))
    z = {k: buf[k] for k in buf.files if "MAPHead_0" not in k}
    torch.manual_seed(2)
    cls, head_w, head_b = torch.randn(1, 1, D) * 0.5, torch.randn(5, D) * 0.1, torch.randn(5) * 0.1
    z |= {"params/cls": cls.numpy(), "params/head/kernel": head_w.T.numpy(), "params/head/bias": head_b.numpy()}
    out = io.BytesIO()
    np.savez(out, **z)
    (tmp_path / "vit.npz").write_bytes(out.getvalue())
    c = load_checkpoint(str(tmp_path / "vit.npz")).config
    assert (c.family, c.class_token, c.pooling, c.num_classes, c.act) == ("vit", True, "cls", 5, "gelu_tanh")
    x = torch.randn(3, 3, SIZE, SIZE)
    vm = model.vision_model
    with torch.no_grad():
        patches = vm.embeddings.patch_embedding(x).flatten(2).transpose(1, 2) + vm.embeddings.position_embedding.weight
        tokens = torch.cat([cls.expand(3, -1, -1), patches], dim=1)
        ref = vm.post_layernorm(vm.encoder(inputs_embeds=tokens).last_hidden_state)[:, 0]
    emb, logits = embed(str(tmp_path / "vit.npz"), x)
    agree("big_vision .npz (tok) x ViT x 32px (class token)", emb, ref)
    agree("big_vision .npz (tok) x ViT x 32px (logits)", logits, ref @ head_w.T + head_b)


def test_an_npz_of_neither_kind_names_both(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, **{"encoder/w": np.zeros(3, np.float32)})
    (tmp_path / "x.npz").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="encoder/w.*posembed_input.*big_vision"):
        load_checkpoint(str(tmp_path / "x.npz"))


# --- DeiT distilled: timm's deit_*_distilled_* ----------------------------------------------------


def test_timm_deit_distilled_state_dict(tmp_path):
    # timm's LayerNorm eps (1e-6) in the transformers model too: the same model in both files
    cfg = transformers.DeiTConfig(**VISION, layer_norm_eps=1e-6, num_labels=5)
    model = randomized(transformers.DeiTForImageClassificationWithTeacher(cfg))
    hf = saved(model, tmp_path / "hf")
    e, L = "deit.embeddings.", "deit.encoder.layer"
    sd = {"cls_token": hf[f"{e}cls_token"], "dist_token": hf[f"{e}distillation_token"],
          "pos_embed": hf[f"{e}position_embeddings"],
          "patch_embed.proj.weight": hf[f"{e}patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": hf[f"{e}patch_embeddings.projection.bias"],
          "norm.weight": hf["deit.layernorm.weight"], "norm.bias": hf["deit.layernorm.bias"],
          "head.weight": hf["cls_classifier.weight"], "head.bias": hf["cls_classifier.bias"],
          "head_dist.weight": hf["distillation_classifier.weight"], "head_dist.bias": hf["distillation_classifier.bias"]}
    for i in range(LAYERS):
        h, o = f"{L}.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            sd[f"{o}.norm1.{kind}"] = hf[f"{h}.layernorm_before.{kind}"]
            sd[f"{o}.attn.qkv.{kind}"] = qkv(hf, f"{h}.attention.attention", ("query", "key", "value"), kind)
            sd[f"{o}.attn.proj.{kind}"] = hf[f"{h}.attention.output.dense.{kind}"]
            sd[f"{o}.norm2.{kind}"] = hf[f"{h}.layernorm_after.{kind}"]
            sd[f"{o}.mlp.fc1.{kind}"] = hf[f"{h}.intermediate.dense.{kind}"]
            sd[f"{o}.mlp.fc2.{kind}"] = hf[f"{h}.output.dense.{kind}"]
    torch.save(sd, tmp_path / "deit_small_distilled_patch16_224.pth")
    path = str(tmp_path / "deit_small_distilled_patch16_224.pth")
    c = load_checkpoint(path).config
    assert (c.family, c.distill_token, c.num_classes) == ("deit", True, 5)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        cls = model.deit.layernorm(out.hidden_states[-1])[:, 0]
    emb, logits = embed(path, x)
    agree("timm .pth x DeiT distilled x 32px (class token)", emb, cls)
    agree("timm .pth x DeiT distilled x 32px (logits)", logits, out.logits)


# --- DINOv2: the repository's .pth and timm's *_dinov2* ------------------------------------------

DINO_NATIVE, DINO_P = 56, 14  # trained (like the real ones at 518 px) at a larger grid than it runs at


def dinov2(registers: int = 0, swiglu: bool = False, image_size: int = DINO_NATIVE):
    common = VISION | {"image_size": image_size, "patch_size": DINO_P, "use_swiglu_ffn": swiglu}
    if registers:
        return transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=registers))
    return transformers.Dinov2Model(transformers.Dinov2Config(**common))


def dinov2_pth_layout(hf: dict, chunks: int = 0) -> dict[str, torch.Tensor]:
    """A transformers DINOv2's weights under the DINOv2 repository's names
    (dinov2/models/vision_transformer.py; blocks.<chunk>.<i>.* when built with block_chunks)."""
    e = "embeddings."
    sd = {"cls_token": hf[f"{e}cls_token"], "pos_embed": hf[f"{e}position_embeddings"],
          "mask_token": hf[f"{e}mask_token"],
          "patch_embed.proj.weight": hf[f"{e}patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": hf[f"{e}patch_embeddings.projection.bias"],
          "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    if f"{e}register_tokens" in hf:
        sd["register_tokens"] = hf[f"{e}register_tokens"]
    per_chunk = LAYERS // chunks if chunks else 0
    for i in range(LAYERS):
        h = f"encoder.layer.{i}"
        o = f"blocks.{i // per_chunk}.{i}" if chunks else f"blocks.{i}"
        for kind in ("weight", "bias"):
            sd[f"{o}.norm1.{kind}"] = hf[f"{h}.norm1.{kind}"]
            sd[f"{o}.attn.qkv.{kind}"] = qkv(hf, f"{h}.attention.attention", ("query", "key", "value"), kind)
            sd[f"{o}.attn.proj.{kind}"] = hf[f"{h}.attention.output.dense.{kind}"]
            sd[f"{o}.norm2.{kind}"] = hf[f"{h}.norm2.{kind}"]
            if f"{h}.mlp.weights_in.{kind}" in hf:  # SwiGLUFFN: w12 (gate and value), w3
                sd[f"{o}.mlp.w12.{kind}"] = hf[f"{h}.mlp.weights_in.{kind}"]
                sd[f"{o}.mlp.w3.{kind}"] = hf[f"{h}.mlp.weights_out.{kind}"]
            else:
                sd[f"{o}.mlp.fc1.{kind}"] = hf[f"{h}.mlp.fc1.{kind}"]
                sd[f"{o}.mlp.fc2.{kind}"] = hf[f"{h}.mlp.fc2.{kind}"]
        sd[f"{o}.ls1.gamma"] = hf[f"{h}.layer_scale1.lambda1"]
        sd[f"{o}.ls2.gamma"] = hf[f"{h}.layer_scale2.lambda1"]
    return sd


def dinov2_repo_resize(pos_embed: torch.Tensor, grid: int, registers: bool) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding, as its hub models are built: without
    registers interpolate_offset 0.1 (a scale factor), not antialiased; with registers offset 0
    (the size) and antialiased."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    M = int(patch_pos.shape[1] ** 0.5)
    kwargs = {"size": (grid, grid)} if registers else {"scale_factor": ((grid + 0.1) / M, (grid + 0.1) / M)}
    patch_pos = F.interpolate(patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=registers, **kwargs)
    assert patch_pos.shape[-2:] == (grid, grid)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def dinov2_reference(model, hf: dict, registers: int, swiglu: bool, size: int, x: torch.Tensor):
    """The transformers model run at `size`: at another size than it was trained at, a model
    built for that size with the positions resized here as the DINOv2 repository does (so
    transformers' own interpolation is not used)."""
    if size != DINO_NATIVE:
        at = dinov2(registers, swiglu, size)
        sd = model.state_dict()  # (the names in memory, which transformers 5 renames from those on disk)
        sd["embeddings.position_embeddings"] = dinov2_repo_resize(hf["embeddings.position_embeddings"],
                                                                  size // DINO_P, bool(registers))
        at.load_state_dict(sd, strict=True)
        model = at.eval()
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.pooler_output, out.last_hidden_state[:, 1 + registers:].mean(1)


@pytest.mark.parametrize("registers,swiglu,chunks", [(0, False, 0), (4, False, 0), (0, True, 2)])
def test_dinov2_repository_pth(tmp_path, registers, swiglu, chunks):
    model = randomized(dinov2(registers, swiglu))
    hf = saved(model, tmp_path / "hf")
    name = f"dinov2_vits14{'_reg4' if registers else ''}_pretrain.pth"
    torch.save(dinov2_pth_layout(hf, chunks), tmp_path / name)
    path = str(tmp_path / name)
    ckpt = load_checkpoint(path)
    c, pre = ckpt.config, ckpt.preprocess
    assert (c.family, c.registers, c.layer_scale, c.ffn, c.heads, c.pos_interp) == (
        "dinov2", registers, True, "swiglu" if swiglu else "mlp", HEADS, "bicubic_aa" if registers else "dinov2")
    assert (c.image_size, pre.image_size, pre.crop_pct, pre.mean) == (224, 224, 224 / 256, (0.485, 0.456, 0.406))
    assert not any("mask" in k for k in ckpt.state_dict)
    kind = f"DINOv2{'+reg' if registers else ''}{'+SwiGLU' if swiglu else ''}{' chunked' if chunks else ''}"
    for size in (DINO_NATIVE, 224):  # the native grid (4x4), and the repository's 224 (16x16), its default
        x = torch.randn(2, 3, size, size)
        cls, mean = dinov2_reference(model, hf, registers, swiglu, size, x)
        kw = {"image_size": size} if size != 224 else {}
        agree(f"DINOv2 .pth x {kind} x {size}px (cls)", embed(path, x, **kw)[0], cls)
        agree(f"DINOv2 .pth x {kind} x {size}px (cls+gap)", embed(path, x, pooling="cls+gap", **kw)[0],
              torch.cat([cls, mean], -1))
        if size == DINO_NATIVE:
            agree(f"HF dir x {kind} x {size}px (cls)", embed(str(tmp_path / "hf"), x, image_size=size)[0], cls)
        else:  # the other reference's resizing is measurably different: the check above can tell
            other = load_checkpoint(path)
            other.config = replace(c, pos_interp="dinov2" if registers else "bicubic_aa")
            with torch.no_grad():
                assert (other.build()(x)[0] - cls).abs().max() > 100 * TOL


def timm_dinov2_layout(hf: dict) -> dict[str, torch.Tensor]:
    """timm's vit_*_dinov2 / vit_*_reg4_dinov2 names: timm's _convert_dinov2 applied to the
    repository's layout (mask token dropped, w12/w3 -> fc1/fc2; with registers no_embed_class:
    reg_token, the class token's position folded into cls_token, pos_embed for patches only)."""
    src = dinov2_pth_layout(hf)
    src.pop("mask_token")
    out = {}
    if "register_tokens" in src:
        out["reg_token"] = src.pop("register_tokens")
        out["cls_token"] = src.pop("cls_token") + src["pos_embed"][:, 0]
        out["pos_embed"] = src.pop("pos_embed")[:, 1:]
    for k, v in src.items():
        out[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    return out


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_timm_dinov2_state_dict(tmp_path, registers, swiglu):
    model = randomized(dinov2(registers, swiglu))
    hf = saved(model, tmp_path / "hf")
    sd = timm_dinov2_layout(hf)
    if registers:
        assert sd["pos_embed"].shape[1] == (DINO_NATIVE // DINO_P) ** 2
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "dinov2.safetensors"))
    path = str(tmp_path / "dinov2.safetensors")
    c = load_checkpoint(path).config
    assert (c.family, c.registers, c.ffn, c.pos_interp) == ("dinov2", registers, "swiglu" if swiglu else "mlp",
                                                            "bicubic_aa")
    x = torch.randn(2, 3, DINO_NATIVE, DINO_NATIVE)
    cls, mean = dinov2_reference(model, hf, registers, swiglu, DINO_NATIVE, x)
    kind = f"DINOv2{'+reg' if registers else ''}{'+SwiGLU' if swiglu else ''}"
    agree(f"timm .safetensors x {kind} x {DINO_NATIVE}px (cls)", embed(path, x, image_size=DINO_NATIVE)[0], cls)
    agree(f"timm .safetensors x {kind} x {DINO_NATIVE}px (gap)",
          embed(path, x, image_size=DINO_NATIVE, pooling="gap")[0], mean)


# --- what no reader places ------------------------------------------------------------------------


def test_an_unplaceable_state_dict_gets_one_error_naming_what_was_found(tmp_path):
    torch.save({"encoder.embed.weight": torch.zeros(4, 4), "encoder.layers.0.w": torch.zeros(4)},
               tmp_path / "mystery.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "mystery.pth"))
    msg = str(e.value)
    assert "encoder.embed.weight" in msg and "accepted" in msg and "OpenAI CLIP" in msg and "DINOv2" in msg
