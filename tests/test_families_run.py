"""`vitpipe run` on real JPEGs with CLIP, SigLIP and DINOv2 directories, against transformers fed
by the family's own image processor: embedding cosine >= 0.999 for every image.

The photographs are scikit-learn's two bundled sample images (china.jpg, flower.jpg), cut into
crops of 200 to 640 px and saved again as JPEGs: real photographic content of mixed sizes and
aspect ratios, from a package, nothing downloaded.
"""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import JobSpec
from pipeline.demo import write_shards
from pipeline.runner import run_job

from helpers import randomized

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.heavy

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=16)


def photos(n: int = 24, seed: int = 0) -> list[tuple[bytes, int]]:
    """n JPEG crops (200..640 px a side) of scikit-learn's sample photographs, label 0."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    pics = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    out = []
    for i in range(n):
        pic = pics[i % 2]
        h, w = int(rng.integers(200, 427)), int(rng.integers(200, 640))
        y, x = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        buf = io.BytesIO()
        Image.fromarray(pic[y:y + h, x:x + w]).save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), 0))
    return out


def _processor(name: str):
    """The PIL image processor: `...Pil` in transformers 5 (whose default needs torchvision), the
    plain class before it."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _family(name: str, path) -> tuple:
    """(the transformers model, its PIL image processor, a function pixel_values -> embedding)."""
    if name == "clip":
        cfg = transformers.CLIPVisionConfig(**VISION, image_size=64, projection_dim=32)
        model = randomized(transformers.CLIPVisionModelWithProjection(cfg))
        proc = _processor("CLIPImageProcessor")(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
        embed = lambda x: model(pixel_values=x).image_embeds  # noqa: E731
    elif name == "siglip":
        model = randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, image_size=64)))
        proc = _processor("SiglipImageProcessor")(size={"height": 64, "width": 64})
        embed = lambda x: model(pixel_values=x).pooler_output  # noqa: E731
    else:  # DINOv2 with registers, trained at 96 px and run at the processor's 64 px crop
        cfg = transformers.Dinov2WithRegistersConfig(**VISION, image_size=96, num_register_tokens=2)
        model = randomized(transformers.Dinov2WithRegistersModel(cfg))
        proc = _processor("BitImageProcessor")(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64},
                                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        embed = lambda x: model(pixel_values=x).pooler_output  # noqa: E731
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc, embed


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_vitpipe_run_embeds_real_jpegs_as_transformers_does(ray_cluster, tmp_path, name):
    _, proc, embed = _family(name, tmp_path / "model")
    pics = photos()
    write_shards(pics, str(tmp_path / "in"), n_shards=2, prefix="photo")
    spec = JobSpec.model_validate({
        "name": f"{name}-embed", "source": {"uri": str(tmp_path / "in")},
        "model": {"checkpoint": str(tmp_path / "model")}, "engine": {"batch_size": 8},
        "outputs": {"top_k": 0}, "output": {"uri": str(tmp_path / "out")}, "ray": {"progress": False}})
    report = run_job(spec)
    assert report.ok_rows == len(pics) and report.model_family == name
    rows = duckdb.sql(f"SELECT key, embedding FROM read_parquet('{tmp_path / 'out'}/part-*.parquet') "
                      "ORDER BY key").fetchall()
    assert len(rows) == len(pics) and len({k for k, _ in rows}) == len(pics)
    ours = np.asarray([e for _, e in rows], np.float32)  # (N, E)
    keys = [k for k, _ in rows]
    images = [Image.open(io.BytesIO(pics[int(k.rsplit("-", 1)[-1])][0])).convert("RGB") for k in keys]  # photo-NNNNNN
    with torch.no_grad():
        ref = embed(proc(images=images, return_tensors="pt")["pixel_values"]).numpy()  # (N, E)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, (name, float(cos.min()))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    normalized = name in ("clip", "siglip")  # outputs.normalize auto: the contrastive towers
    assert manifest["model"]["family"] == name and manifest["model"]["normalize"] is normalized
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) if normalized else not np.allclose(norms, 1.0, atol=1e-2)
