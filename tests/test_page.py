"""The run's page: the throughput chart, the samples the model actors make for it (thumbnails,
picks, stats) and the sections drawn from them, checked in headless Chromium where it is installed."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import shutil
import subprocess

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline import samples
from pipeline.config import JobSpec
from pipeline.decode import decode_image
from pipeline.demo import LABELS, PREPROCESS, digit_jpegs, write_shards
from pipeline.page import throughput_plot, throughput_series, write_page
from pipeline.predict import top_k
from pipeline.samples import part_sample
from pipeline.write import PartWriter

from helpers import image_bytes, tar_bytes

# The demo's timeline (359 images in 4 parts, two pairs of parts reaching the driver 7 and 35 ms apart)
DEMO_TIMELINE = [[11.682, 90], [11.689, 180], [12.339, 270], [12.374, 359]]


def test_throughput_line_reaches_the_total_and_the_rate_is_per_window_not_per_part():
    fig = throughput_plot(DEMO_TIMELINE, 11.7, 12.3, end=12.383)
    ax, rate_ax = fig.axes
    done = ax.lines[0]
    assert done.get_ydata()[-1] == 359 and done.get_xdata()[-1] == pytest.approx(12.383)
    assert ax.get_xlim()[1] > 12.383 and ax.get_ylim()[1] > 359  # the end is inside the axes, not on their edge
    s = throughput_series(DEMO_TIMELINE, end=12.383)
    assert s["window"] >= 1.0
    # between neighbouring parts the rate read 90 / 0.007 s = 12,857 images/s; a second's window
    # can hold at most the run's 359 images
    assert 0 < max(s["rate"]) <= 359 / s["window"]
    heights = rate_ax.patches[0].get_data().values
    assert max(heights) == pytest.approx(max(s["rate"]))
    # images per window add up to the total: nothing lost at the run's end
    widths = [b - a for a, b in zip(s["edges"], s["edges"][1:], strict=False)]
    assert sum(r * w for r, w in zip(s["rate"], widths, strict=True)) == pytest.approx(359)


def test_a_steady_run_reads_its_steady_rate():
    timeline = [[5 + 0.5 * i, 100 * (i + 1)] for i in range(120)]  # 200 images/s from 5 s to 64.5 s
    s = throughput_series(timeline, end=64.5)
    assert s["window"] == pytest.approx((64.5 - 5) / 20)
    edges = s["edges"]
    for i in range(2, len(s["rate"])):  # every window after the first part: within one part (100 images) of 200/s
        width = edges[i + 1] - edges[i]
        assert abs(s["rate"][i] * width - 200 * width) <= 100 + 1e-6, (i, s["rate"][i])
    assert s["done_n"][-1] == 12_000


# --- the samples: bounded, and enough for the page's picks ------------------------------------------


class Bank:
    """The pixels of a part without holding them all: row i is image i % len(images) of a bank of
    photo-like 224 px images (smooth colour fields, a little grain), as the model would see them."""

    def __init__(self, n: int = 24, size: int = 224, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.images = np.stack([
            np.clip(np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6, 3), np.uint8)).resize((size, size), Image.BICUBIC),
                               np.int16) + rng.integers(-12, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(idx) % len(self.images)]


def synthetic_parts(n_images: int, per_part: int = 1024, classes: int = 1000, dim: int = 768, seed: int = 0):
    """(ok rows, pixels, embeddings) per part, like predict_part's: ImageNet-sized heads, top-1
    classes with Zipf frequencies, scores from sure to unsure, ground truth that is wrong for ~15%."""
    rng = np.random.default_rng(seed)
    names = [f"class-{c:04d}" for c in range(classes)]
    p = 1 / np.arange(1, classes + 1)
    bank = Bank()
    for start in range(0, n_images, per_part):
        n = min(per_part, n_images - start)
        cls = rng.choice(classes, n, p=p / p.sum())
        logits = rng.normal(0, 1, (n, classes)).astype(np.float32)
        logits[np.arange(n), cls] += rng.uniform(2, 14, n)  # softmax top-1 from ~0.01 to ~1
        label = np.where(rng.random(n) < 0.85, cls, rng.integers(0, classes, n))
        keys = [f"img-{start + i:06d}" for i in range(n)]
        rows = pa.table({"key": keys, "source_uri": [f"s3://b/shard-{start // per_part:04d}.tar"] * n,
                         "source_etag": ["e"] * n, "member": [k + ".jpg" for k in keys],
                         "label": pa.array([None if i % 10 == 9 else int(v) for i, v in enumerate(label)], pa.int64()),
                         **top_k(logits, 5, names, has_head=True)})
        yield rows, bank, rng.normal(0, 1, (n, dim)).astype(np.float32)


def _write_sampled_output(out, n_images: int) -> tuple[list[pa.Table], dict]:
    """The model actors' side for n_images (part_sample, PartWriter), then a manifest that names
    the sample files, as commit writes it: what write_page reads."""
    writer = PartWriter(str(out), "run1", {"run_id": "run1"}, row_group_rows=16_384)
    tables, samples_files, rows = [], [], []
    for i, (ok_rows, pixels, emb) in enumerate(synthetic_parts(n_images)):
        t = part_sample(ok_rows, pixels, emb)
        tables.append(t)
        rows.append(ok_rows)
        for f in writer.write(f"s3://b/shard-{i:04d}.tar", 0, {"samples": t}):
            samples_files.append(f | {"path": f"_pending/run1/{f['path']}", "this_run": True})
    manifest = {"format": "vitpipe-output/1", "run_id": "run1", "samples": samples_files,
                "model": {"labels": [f"class-{c:04d}" for c in range(1000)]},
                "totals": {"records": n_images, "ok": n_images, "errors": 0},
                "report": {"run_id": "run1", "ok_rows": n_images, "records_read": n_images, "wall_s": 10.0,
                           "timeline": [[5.0, n_images // 2], [9.0, n_images]]}}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    return tables, {"rows": pa.concat_tables(rows), "manifest": manifest}


@pytest.mark.parametrize("n_images", [1_000, 20_000])
def test_samples_stay_bounded_and_hold_the_pages_picks(tmp_path, n_images):
    out = tmp_path / "out"
    tables, made = _write_sampled_output(out, n_images)
    parts = len(tables)
    for t in tables:  # per part: at most MOST_THUMBS thumbnails of at most THUMB_PX px, POINTS more for the map
        thumbs = [b for b in t.column("thumb").to_pylist() if b is not None]
        assert 0 < len(thumbs) <= samples.MOST_THUMBS
        assert t.num_rows <= samples.MOST_THUMBS + samples.POINTS
        assert all(max(Image.open(io.BytesIO(b)).size) <= samples.THUMB_PX for b in thumbs)
    sample_bytes = sum(f["bytes"] for f in made["manifest"]["samples"])
    assert sample_bytes <= parts * 150_000  # ~1.5% of a part's 1,024 ViT-B rows (3 MB of float32 embeddings)

    # the page's picks are the whole run's, made from the parts' samples
    sample = samples.read_run_sample(fsspec.filesystem("file"), str(out), made["manifest"]["samples"])
    assert sample.rows_seen == n_images and sum(sample.top1.values()) == n_images
    picks = samples.choose(sample)
    assert sum(len(v) for v in picks.values()) <= samples.PAGE_THUMBS
    rows = made["rows"]
    top1 = pc.list_element(rows.column("topk_ids"), 0).to_numpy().astype(np.int64)
    score = pc.list_element(rows.column("topk_scores"), 0).to_numpy()
    keys = np.array(rows.column("key").to_pylist())
    label = np.array([-1 if v is None else v for v in rows.column("label").to_pylist()])
    assert [r["key"] for r in picks["unsure"]] == list(keys[np.argsort(score, kind="stable")[:samples.UNSURE]])
    wrong = np.flatnonzero((label >= 0) & (label != top1))
    assert [r["key"] for r in picks["mislabeled"]] == list(keys[wrong[np.argsort(-score[wrong], kind="stable")]][
        :samples.WRONG])
    # the run's most frequent classes, exact (from every row); for each, its most confident images among
    # the parts where it is one of the part's CLASSES most frequent: the whole run's wherever it is
    # frequent in each part, and so in this test for the 4 most frequent
    def most_frequent(ids: np.ndarray, k: int) -> np.ndarray:
        u, n = np.unique(ids, return_counts=True)
        return u[np.lexsort((u, -n))][:k]

    part = np.arange(len(keys)) // 1024
    kept = np.zeros(len(keys), bool)
    for p in np.unique(part):
        kept |= (part == p) & np.isin(top1, most_frequent(top1[part == p], samples.CLASSES))
    expected, exact = [], []
    for c in most_frequent(top1, samples.PAGE_CLASSES):
        for pool, into in ((kept & (top1 == c), expected), (top1 == c, exact)):
            rows_c = np.flatnonzero(pool)
            into += list(keys[rows_c[np.argsort(-score[rows_c], kind="stable")]][:samples.PER_CLASS])
    assert [r["key"] for r in picks["confident"]] == expected
    assert expected[:4 * samples.PER_CLASS] == exact[:4 * samples.PER_CLASS]
    assert (sample.score_bins == np.histogram(score, bins=samples.SCORE_BINS, range=(0, 1))[0]).all()

    # what the driver holds for the page is bounded too: candidates per class, never every sampled row
    assert sum(len(v) for v in sample.best.values()) <= samples.PER_CLASS * len(sample.top1)
    assert len(sample.unsure) <= samples.UNSURE and len(sample.wrong) <= samples.WRONG
    assert len(sample.points) <= 2 * samples.MOST_POINTS

    # the page: a few MB at most whatever the run's size, its thumbnails only the picks
    write_page(str(out))
    page = (out / "report.html").read_text()
    assert len(page.encode()) < 3_000_000
    assert page.count('<img class="thumb"') == sum(len(v) for v in picks.values())
    print(f"\n{n_images} images, {parts} parts: _samples/ {sample_bytes / 1e6:.2f} MB, page {len(page) / 1e6:.2f} MB")


def test_the_maps_points_stay_bounded_while_read_and_are_the_smallest_key_hashes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    tables, made = _write_sampled_output(out, 20_000)  # 20 parts x 32 points
    monkeypatch.setattr(samples, "MOST_POINTS", 100)
    sample = samples.RunSample()
    for i, t in enumerate(tables):
        sample.add(f"{i}.parquet", t.drop_columns(["thumb"]))
        assert len(sample.points) <= 200
    xy, ids, share = samples.map_points(sample, most=100)
    every = [(k, top1) for t in tables for k, top1, e in zip(t.column("key").to_pylist(), t.column("top1_id").to_pylist(),
                                                            t.column("embedding").to_pylist(), strict=True) if e]
    assert len(every) == 640
    expected = sorted(every, key=lambda kt: hashlib.blake2b(kt[0].encode(), digest_size=8).digest())[:100]
    assert ids == [top1 for _, top1 in expected] and xy.shape == (100, 2) and 0 < share < 1


def test_a_model_without_a_head_or_embeddings_still_gets_thumbnails():
    ok_rows, pixels, emb = next(synthetic_parts(300))
    headless = ok_rows.select(["key", "source_uri", "source_etag", "member", "label"])
    t = part_sample(headless, pixels, emb)
    assert set(t.column("picks").to_pylist()) <= {"any", "point", "any,point"}
    assert sum(b is not None for b in t.column("thumb").to_pylist()) == samples.UNSURE
    assert t.column("top1_id").null_count == t.num_rows
    assert sum(e is not None for e in t.column("embedding").to_pylist()) == samples.POINTS
    bare = part_sample(ok_rows, pixels, None)  # no embeddings written: no map points
    assert bare.column("embedding").null_count == bare.num_rows
    assert "point" not in ",".join(bare.column("picks").to_pylist())
    rs = samples.RunSample()
    rs.add("a.parquet", t)
    assert [r["key"] for r in samples.choose(rs)["any"]] == sorted(
        k for k, b in zip(t.column("key").to_pylist(), t.column("thumb").to_pylist(), strict=True) if b)


# --- a real run: the page in Chromium ----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: str) -> str:
    """The page after its check script ran, from headless Chromium (as tests/test_analyze.py renders)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={page}.chromium", "--virtual-time-budget=15000", "--dump-dom", f"file://{page}"],
        capture_output=True, text=True, timeout=120, check=True).stdout


def thumbs_in(dom: str) -> list[dict]:
    """Each thumbnail's figure: what it names (key, group, label, score, ground truth) and what it drew."""
    out = []
    for tag in re.findall(r'<figure class="thumb"[^>]*>', dom):
        out.append({k.replace("-", "_"): html.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', tag)})
    return out


def block_means(image: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> the mean grey of its 4 x 4 blocks, as the page's script measures them."""
    g = image.astype(np.float64).mean(axis=2)
    s = g.shape[0]
    return np.array([g[(s * by) // 4:(s * (by + 1)) // 4, (s * bx) // 4:(s * (bx + 1)) // 4].mean()
                     for by in range(4) for bx in range(4)])


def _job(shards, out, address: str, mode: str = "full") -> JobSpec:
    return JobSpec.model_validate({
        "name": "page-test", "source": {"uri": str(shards), "records_per_part": 50},
        "model": {"checkpoint": "builtin:digits"}, "outputs": {"top_k": 3, "embeddings": True},
        "output": {"uri": str(out), "mode": mode}, "ray": {"address": address, "progress": False}})


@pytest.mark.heavy
def test_thumbnails_render_in_chromium_and_belong_to_the_rows_they_name(ray_cluster, tmp_path):
    from pipeline.cli import main
    from pipeline.runner import run_job

    digits = digit_jpegs("test")[:240]
    # every 12th ground truth made wrong on purpose: the page must find disagreements
    images = [(b, (y + 1) % 10 if j % 12 == 0 else y) for j, (b, y) in enumerate(digits)]
    write_shards(images, str(tmp_path / "shards"), n_shards=3)
    (tmp_path / "shards" / "odd-00000.tar").write_bytes(tar_bytes([("cut.jpg", image_bytes(300, 200, seed=4)[:600])]))
    out = tmp_path / "out"
    report = run_job(_job(tmp_path / "shards", out, ray_cluster.address))
    assert report.ok_rows == 240 and report.error_rows == 1

    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["samples"]) == 6 and all(f["this_run"] for f in manifest["samples"])  # 3 shards x 2 parts
    for f in manifest["samples"]:  # the sample is covered by the manifest: its paths and checksums
        assert f["path"].startswith("_samples/part-")
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert not any(f["kind"] == "samples" for f in manifest["files"])  # the dataset's files are rows only

    rows = {k: (top1, score, label) for k, top1, score, label in duckdb.sql(
        f"SELECT key, topk_labels[1], topk_scores[1], label FROM '{out}/part-*.parquet'").fetchall()}
    assert len(rows) == 240
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "CorruptImage" in page and "cut" in page  # the error examples, with their messages
    assert "Confusion matrix" in page and "Embedding map" in page
    if CHROMIUM is None:
        pytest.skip("chromium is not installed here (make browser installs Debian's chromium where it can); "
                    "the page was built but not rendered")
    dom = dump_dom(str(out / "report.html"))
    body = re.search(r"<body[^>]*>", dom).group(0)
    counts = {k: int(v) for k, v in re.findall(r'data-(thumbs(?:-drawn)?|figures(?:-drawn)?)="(\d+)"', body)}
    thumbs = thumbs_in(dom)
    assert counts == {"figures": 3, "figures-drawn": 3, "thumbs": len(thumbs), "thumbs-drawn": len(thumbs)}
    assert {t["group"] for t in thumbs} == {"confident", "unsure", "mislabeled"}
    assert len(thumbs) <= samples.PAGE_THUMBS
    own, nearest_other = [], []
    for t in thumbs:
        top1, score, label = rows[t["key"]]  # each names a row of the output, with its label and score
        assert t["label"] == top1 and float(t["score"]) == pytest.approx(score, abs=1e-6)
        assert t["truth"] == LABELS[label]
        if t["group"] == "mislabeled":
            assert label != LABELS.index(top1)
        drawn = np.array([float(v) for v in t["drawn_grid"].split(",")])
        seen = [block_means(decode_image(b, PREPROCESS)) for b, _ in images]  # what the model saw, per key
        j = int(t["key"].rsplit("-", 1)[1])
        own.append(np.abs(drawn - seen[j]).mean())
        nearest_other.append(min(np.abs(drawn - s).mean() for i, s in enumerate(seen) if i != j))
    # each drew its own row's image (JPEG's error, a few grey levels), not another's
    assert max(own) < 4 and all(o < n for o, n in zip(own, nearest_other, strict=True)), (own, nearest_other)

    keys = [t["key"] for t in thumbs]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from the output alone: the same picks
    assert [t["key"] for t in thumbs_in((out / "report.html").read_text())] == keys


@pytest.mark.heavy
def test_an_incremental_runs_page_shows_its_own_rows_and_samples_are_replaced_with_the_output(ray_cluster, tmp_path):
    from pipeline.runner import run_job

    digits = digit_jpegs("test")
    write_shards(digits[:100], str(tmp_path / "shards"), n_shards=2)
    out = tmp_path / "out"
    run_job(_job(tmp_path / "shards", out, ray_cluster.address))
    first = json.loads((out / "_manifest.json").read_text())["samples"]
    write_shards(digits[100:160], str(tmp_path / "shards"), n_shards=1, prefix="extra")
    run_job(_job(tmp_path / "shards", out, ray_cluster.address, mode="incremental"))
    manifest = json.loads((out / "_manifest.json").read_text())
    ours = [f for f in manifest["samples"] if f["this_run"]]
    assert {f["path"] for f in manifest["samples"] if not f["this_run"]} == {f["path"] for f in first}  # kept
    assert len(ours) == 2  # the new shard's two parts
    page = (out / "report.html").read_text()
    assert "From this run&#x27;s 60 ok rows" in page  # its own rows; the counts table has the whole output's
    assert all(k.startswith("extra-") for k in re.findall(r'<figure class="thumb"[^>]*data-key="([^"]+)"', page))
    assert re.search(r"<td>ok rows</td><td class=\"n\">60</td><td class=\"n\">160</td>", page)
    listed = {p.relative_to(out).as_posix() for p in (out / "_samples").iterdir()}
    assert listed == {f["path"] for f in manifest["samples"]}

    run_job(_job(tmp_path / "shards", out, ray_cluster.address, mode="full"))  # replaced with the output
    manifest = json.loads((out / "_manifest.json").read_text())
    listed = {p.relative_to(out).as_posix() for p in (out / "_samples").iterdir()}
    assert listed == {f["path"] for f in manifest["samples"]} and len(listed) == 4
    assert not listed & {f["path"] for f in first}

    spec = _job(tmp_path / "shards", out, ray_cluster.address, mode="full")
    run_job(spec.model_copy(update={"output": spec.output.model_copy(update={"samples": False})}))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["samples"] == [] and not list((out / "_samples").glob("*.parquet"))  # no thumbnail kept
    page = (out / "report.html").read_text()
    assert "output.samples: false" in page and '<img class="thumb"' not in page


def test_thumbnails_from_a_tensor_are_those_from_numpy():
    """The GPU decoder hands the model actor a torch tensor (N, S, S, 3) on its device: the sample
    copies only the chosen images off it. Here on a CPU tensor (the CUDA copy is not run here)."""
    import torch

    ok_rows, bank, emb = next(synthetic_parts(200))
    pixels = bank[np.arange(200)]  # (200, 224, 224, 3)
    a = part_sample(ok_rows, pixels, emb)
    b = part_sample(ok_rows, torch.from_numpy(pixels), emb)
    assert a.column("thumb").to_pylist() == b.column("thumb").to_pylist()
    assert sum(t is not None for t in a.column("thumb").to_pylist()) > 10
