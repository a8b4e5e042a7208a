"""`vitpipe analyze` and the report pages, checked against what is not our code: transformers'
attention maps, a rollout worked by hand, scikit-learn's kNN, and headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.analyze import Probe, analyze_part, held_out, rollout
from pipeline.config import JobSpec
from pipeline.decode import decode_image
from pipeline.demo import digit_jpegs, write_shards
from pipeline.model.checkpoints import load_checkpoint
from pipeline.sources import Shard, read_parts

from helpers import image_bytes, tar_bytes

transformers = pytest.importorskip("transformers")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _direct_distances(attentions, grid: int, patch: int) -> np.ndarray:
    """The paper's definition written out by loops: (L, H), averaged over images."""
    n = grid * grid
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dist[i, j] = patch * np.hypot(i // grid - j // grid, i % grid - j % grid)
    out = []
    for a in attentions:  # (B, H, 1+N, 1+N) per layer
        a = a.double().numpy()[:, :, 1:, 1:]
        per_head = [[np.mean([np.dot(a[b, h, q], dist[q]) for q in range(n)]) for h in range(a.shape[1])]
                    for b in range(a.shape[0])]
        out.append(np.mean(per_head, axis=0))
    return np.array(out)


def test_attention_distance_equals_transformers_output_attentions(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                 image_size=32, patch_size=8, num_labels=3, layer_norm_eps=1e-6)
    hf = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # sharper attention than a fresh init: heads that differ
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = load_checkpoint(str(tmp_path / "hf"))
    members = [(f"img{i}.jpg", image_bytes(40 + 7 * i, 36 + 5 * i, seed=i)) for i in range(6)]
    members.append(("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg"))
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    spec = JobSpec.model_validate({"source": {"uri": str(tmp_path), "format": "webdataset"},
                                   "output": {"uri": str(tmp_path / "out")}})
    shard = Shard(str(tmp_path / "s.tar"), "e", 0)
    (part,) = list(read_parts(shard, spec.source))

    tables, sums, counts = analyze_part(part.records, Probe(ckpt), ckpt.preprocess, call_size=4)

    assert counts == {"records": 7, "ok": 6, "errors": 1}
    assert tables["errors"].column("key").to_pylist() == ["broken"]
    pixels = np.stack([decode_image(data, ckpt.preprocess) for _, data in members[:6]])  # (6, S, S, 3)
    mean, std = np.array(ckpt.preprocess.mean), np.array(ckpt.preprocess.std)
    x = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    eager = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        out = eager.eval()(pixel_values=x, output_attentions=True, output_hidden_states=True)
    expected = _direct_distances(out.attentions, grid=4, patch=8)  # (L, H)
    np.testing.assert_allclose(sums / counts["ok"], expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.5  # heads differ: the comparison could fail
    # both embeddings: the class token and the mean of patch tokens of transformers' last layer, normed
    last = eager.vit.layernorm(out.hidden_states[-1]).detach()  # (B, 1+N, D)
    emb = {c: np.stack(tables["ok"].column(c).to_numpy(zero_copy_only=False)) for c in ("cls", "mean")}
    np.testing.assert_allclose(emb["cls"], last[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(emb["mean"], last[:, 1:].mean(1).numpy(), atol=1e-4)


def test_rollout_equals_the_recursion_worked_by_hand():
    """Two layers, two heads, a class token and two patches.

    Layer 1, heads averaged: class-token row [0.5, 0.5, 0]; patch rows attend to themselves.
      + I, rows normalised: [0.75, 0.25, 0], [0, 1, 0], [0, 0, 1].
    Layer 2: the class token looks only at patch 2: [0, 0, 1].
      + I, normalised: [0.5, 0, 0.5], [0, 1, 0], [0, 0, 1].
    Rollout = A2 @ A1, class-token row: 0.5 * [0.75, 0.25, 0] + 0.5 * [0, 0, 1] = [0.375, 0.125, 0.5];
    over the patches: [0.125, 0.5]."""
    eye = torch.eye(3)
    l1 = torch.stack([eye.clone(), eye.clone()])  # (H, T, T)
    l1[0, 0] = torch.tensor([1.0, 0, 0])
    l1[1, 0] = torch.tensor([0.0, 1, 0])
    l2 = torch.stack([eye.clone(), eye.clone()])
    l2[:, 0] = torch.tensor([0.0, 0, 1])
    got = rollout([l1[None], l2[None]])  # (1, N)
    np.testing.assert_allclose(got.numpy(), [[0.125, 0.5]])


def test_held_out_split_is_stable_and_near_its_share():
    keys = [f"img-{i:05d}" for i in range(5000)]
    test = [k for k in keys if held_out(k, 0.2)]
    assert 0.17 < len(test) / len(keys) < 0.23
    assert test == [k for k in keys if held_out(k, 0.2)]


def render(page: str) -> dict[str, int]:
    """Open a page in headless Chromium; what its check script found: figures, and how many drew."""
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={page}.chromium", "--virtual-time-budget=15000", "--dump-dom", f"file://{page}"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    found = dict(re.findall(r'data-(figures(?:-drawn)?)="(\d+)"', body))
    return {k: int(v) for k, v in found.items()}


@pytest.mark.heavy
def test_analyze_digits_writes_tables_figures_and_pages_that_agree_with_direct_computation(ray_cluster, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline.analyze import analyze_job
    from pipeline.cli import main
    from pipeline.runner import run_job

    digits = digit_jpegs("test")
    write_shards(digits, str(tmp_path / "shards"), n_shards=3)
    (tmp_path / "shards" / "odd-00000.tar").write_bytes(tar_bytes(
        [("photo.jpg", image_bytes(90, 60, seed=3)), ("cut.jpg", image_bytes(300, 200, seed=4)[:600])]))
    out = tmp_path / "out"
    spec = JobSpec.model_validate({
        "name": "analyze-test", "source": {"uri": str(tmp_path / "shards"), "records_per_part": 50},
        "model": {"checkpoint": "builtin:digits"}, "output": {"uri": str(out)},
        "ray": {"address": ray_cluster.address, "progress": False}, "analyze": {"samples": 6}})

    run_job(spec)
    run_manifest = (out / "_manifest.json").read_bytes()
    manifest = analyze_job(spec)

    a = out / "analysis"
    assert (out / "_manifest.json").read_bytes() == run_manifest  # the run's output is left as it was
    ok = len(digits) + 1
    assert manifest["counts"] == {"records": ok + 1, "ok": ok, "errors": 1}
    con = duckdb.connect()
    dist = con.sql(f"SELECT layer, head, mean_distance_px, images FROM '{a}/attention_distance.parquet' "
                   "ORDER BY layer, head").fetchall()
    assert len(dist) == 4 * 4 and {r[3] for r in dist} == {ok}
    # the driver's sum of per-part partial sums (two actors, many parts) = one pass over every image here
    from pipeline.analyze import attention_distance
    from pipeline.model.checkpoints import load_model

    ckpt = load_model(spec.model)
    probe = Probe(ckpt)
    pixels = np.stack([decode_image(b, ckpt.preprocess) for b, _ in digits] +
                      [decode_image(image_bytes(90, 60, seed=3), ckpt.preprocess)])
    direct = attention_distance(probe.run(pixels)[2], probe.distances).mean(0).numpy()  # (L, H)
    np.testing.assert_allclose(np.array([r[2] for r in dist]).reshape(4, 4), direct, rtol=1e-6)

    sim = pq.read_table(a / "position_similarity.parquet")
    grid = np.stack(sim["similarity"].to_numpy(zero_copy_only=False))  # (N, N)
    assert grid.shape == (64, 64)
    np.testing.assert_allclose(np.diag(grid), 1.0, atol=1e-5)
    np.testing.assert_allclose(grid, grid.T, atol=1e-6)

    roll = pq.read_table(a / "rollout.parquet").to_pylist()
    assert len(roll) == 6 and all(len(r["rollout"]) == 64 for r in roll)
    assert all(0 < sum(r["rollout"]) < 1 for r in roll)  # the class token keeps some weight on itself

    # kNN: our figures = scikit-learn's on the same embeddings and split (similarity-weighted cosine kNN)
    emb = con.sql(f"SELECT key, label, cls, mean FROM '{a}/embeddings/*.parquet' WHERE label IS NOT NULL").fetchall()
    assert len(emb) == len(digits) and len({r[0] for r in emb}) == len(digits)
    test = np.array([held_out(r[0], 0.2) for r in emb])
    y = np.array([r[1] for r in emb])
    knn = {r["embedding"]: r for r in pq.read_table(a / "knn.parquet").to_pylist()}
    for col, name in ((2, "cls"), (3, "mean")):
        x = np.array([r[col] for r in emb])
        clf = KNeighborsClassifier(n_neighbors=5, metric="cosine", weights=lambda d: 1 - d).fit(x[~test], y[~test])
        assert knn[name]["accuracy"] == pytest.approx((clf.predict(x[test]) == y[test]).mean(), abs=1e-4)
        assert knn[name]["test_images"] == test.sum()
    assert knn["cls"]["accuracy"] > 0.8  # the trained model's class token separates the digits

    for png in ("attention_distance", "position_similarity", "rollout"):
        assert (a / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_page, analysis_page = (out / "report.html").read_text(), (a / "report.html").read_text()
    assert "CorruptImage" in run_page and "cut" in run_page  # errors by type, with an example
    assert "http://" not in analysis_page and "https://" not in analysis_page  # self-contained

    (out / "report.html").unlink()
    (a / "report.html").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from the output alone
    assert (out / "report.html").exists() and (a / "report.html").exists()
    if CHROMIUM is None:
        pytest.skip("chromium is not installed here (make test installs Debian's chromium where it can); "
                    "the pages were built but not rendered")
    # the run page: the top-1 distributions, the embedding map, the throughput chart (tests/test_page.py: the rest)
    assert render(str(out / "report.html")) == {"figures": 3, "figures-drawn": 3}
    assert render(str(a / "report.html")) == {"figures": 3, "figures-drawn": 3}
    json.loads((a / "_manifest.json").read_text())  # still valid after the rebuild


@pytest.mark.heavy
def test_analyze_on_s3_replaces_its_previous_analysis_and_the_page_rebuilds_there(ray_cluster, s3):
    from pipeline.analyze import analyze_job
    from pipeline.cli import main

    bucket = "vitpipe-analyze"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:120], f"s3://{bucket}/in", n_shards=2)
    spec = JobSpec.model_validate({
        "source": {"uri": f"s3://{bucket}/in", "records_per_part": 40}, "model": {"checkpoint": "builtin:digits"},
        "output": {"uri": f"s3://{bucket}/out"}, "ray": {"address": ray_cluster.address, "progress": False},
        "analyze": {"samples": 3}})
    first = analyze_job(spec)
    second = analyze_job(spec)
    s3.invalidate_cache()
    embeddings = s3.glob(f"{bucket}/out/analysis/embeddings/*.parquet")
    assert len(embeddings) == 4  # 2 shards x 2 parts: the second analysis's files only
    assert {f"{bucket}/out/analysis/{f['path']}" for f in second["files"]} == set(embeddings)
    assert [r["mean_distance_px"] for r in first["attention_distance"]] == pytest.approx(
        [r["mean_distance_px"] for r in second["attention_distance"]])
    con = duckdb.connect()
    con.register_filesystem(s3)
    n, keys = con.sql(f"SELECT count(*), count(DISTINCT key) FROM 's3://{bucket}/out/analysis/embeddings/*.parquet'"
                      ).fetchall()[0]
    assert n == keys == 120
    s3.rm(f"{bucket}/out/analysis/report.html")
    assert main(["report", f"s3://{bucket}/out/analysis"]) == 0
    s3.invalidate_cache()
    assert b"data:image/png;base64," in s3.cat(f"{bucket}/out/analysis/report.html")
