"""`vitpipe analyze`: the questions the paper leaves its readers with, answered on the job's own
images through the job's own model ("An Image is Worth 16x16 Words", Fig. 7 and Sec. 4.5).

- How far does each head look? Mean attention distance per layer and head: for each query
  patch, the attention weights to the key patches times the pixel distance between their
  centres, summed over keys, averaged over queries, then over images. The class token is left
  out as query and key (its position is no pixel) and the weights are not renormalized,
  as in the paper's published code and its reproductions. Model actors keep running sums
  per part (L x H floats); the driver adds them up. No attention map travels.
- What do the learned position embeddings encode? Cosine similarity between every pair of
  patch positions, from the weights.
- What does the class token attend to? Attention rollout (Abnar & Zuidema, 2020: per layer,
  heads averaged, identity added, rows normalized; the layers' product) for `analyze.samples`
  images, the first decodable ones listed.
- Class token or mean of patch tokens? Both embeddings of every image are written, and where
  the images have labels, a cosine k-nearest-neighbour classifier on a held-out split (by a
  hash of the key) scores each.

Same sources, same read actors, same actor pools as `run` (runner.read_stage); the model is the
checkpoint's torch ViT in fp32 on the actor's device, asked for its attention maps (the
explicit softmax path of model/vit.py). Output, under OUT/analysis/ (OUT: output.uri):

    _manifest.json             counts, model, the figures below, files
    attention_distance.parquet layer, head, mean_distance_px, images
    position_similarity.parquet position, row, col, similarity (to every position)
    rollout.parquet            sample, key, member, label, image (PNG), rollout (grid x grid)
    knn.parquet                embedding (cls | mean), k, accuracy, train_images, test_images
    embeddings/part-*.parquet  key, member, label, cls, mean (one file per part)
    errors/part-*.parquet      records that failed to decode (as in `run`)
    *.png, report.html         the figures and the page (page.py)
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import JobSpec
from pipeline.decode import Preprocess, decode_records, first_images
from pipeline.engines.torch_engine import UInt8ViT, resolve_device
from pipeline.model.checkpoints import Checkpoint, load_model
from pipeline.model.vit import ViT
from pipeline.predict import error_table
from pipeline.progress import Progress
from pipeline.sources import Part, parts_of
from pipeline.storage import sweep
from pipeline.write import PartWriter

FORMAT = "vitpipe-analysis/1"
RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("part", pa.int32()), ("files", pa.string()),
                           ("counts", pa.string()), ("distance_sums", pa.string())])


# --- the measures: plain functions on attention maps and weights -------------------------------


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """(N, N) pixel distances between the centres of the grid's patches, row-major as the tokens."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)  # (N, N)


def attention_distance(maps: list[torch.Tensor], distances: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Per image, layer and head: the attention-weighted query-to-key distance, averaged over
    query patches. maps: one (B, H, T, T) per layer, T = prefix + N (the class, distillation and
    register tokens, which have no pixel position, come first and are left out) -> (B, L, H) float64."""
    per_layer = []
    for attn in maps:
        patches = attn[:, :, prefix:, prefix:].double()  # (B, H, N, N): patch queries to patch keys
        per_layer.append((patches * distances).sum(-1).mean(-1))  # (B, H)
    return torch.stack(per_layer, dim=1)  # (B, L, H)


def rollout(maps: list[torch.Tensor], prefix: int = 1, class_token: bool = True) -> torch.Tensor:
    """Attention rollout: per layer A = rownorm(mean over heads + I); R = A_L ... A_1. Returns
    the class token's row over the patches, (B, N); a model without a class token (SigLIP) has
    no such row, so the mean of every token's row stands for it."""
    B, _, T, _ = maps[0].shape
    eye = torch.eye(T, dtype=torch.float64)
    R = eye.expand(B, T, T)  # (B, T, T)
    for attn in maps:
        A = attn.double().mean(dim=1) + eye  # (B, T, T)
        A = A / A.sum(dim=-1, keepdim=True)
        R = A @ R
    row = R[:, 0] if class_token else R.mean(dim=1)  # (B, T)
    return row[:, prefix:]  # (B, N)


def position_similarity(pos_embed: torch.Tensor, prefix: int = 1) -> np.ndarray:
    """(1, prefix + N, D) learned position embeddings -> (N, N) cosine similarity between patch positions."""
    p = torch.nn.functional.normalize(pos_embed[0, prefix:].double(), dim=-1)  # (N, D)
    return (p @ p.T).numpy()


def knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, k: int) -> float:
    """Cosine k-nearest neighbours, each neighbour voting with its similarity."""
    a = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)  # (n, D)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):  # bounded memory: 1,024 x n similarities at a time
        q = test[start:start + 1024]
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)  # (m, D)
        sims = q @ a.T  # (m, n)
        kk = min(k, len(a))
        idx = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]  # (m, k)
        votes = np.zeros((len(q), classes))
        np.add.at(votes, (np.arange(len(q))[:, None], train_y[idx]), np.take_along_axis(sims, idx, axis=1))
        correct += int((votes.argmax(1) == test_y[start:start + 1024]).sum())
    return correct / len(test)


def held_out(key: str, share: float) -> bool:
    """The kNN test split: a stable hash of the key, so every run (and machine) splits alike."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32 < share


# --- the model side: tokens and attention maps in fp32 -----------------------------------------


class Probe:
    """The checkpoint's ViT in fp32 as the torch engine holds it (uint8 in, normalization inside),
    asked for both embeddings and the attention maps."""

    def __init__(self, ckpt: Checkpoint, device: str = "cpu"):
        self.ckpt, self.device = ckpt, torch.device(device)
        self.net = UInt8ViT(ckpt).to(self.device).eval()
        cfg = ckpt.config
        self.distances = patch_distances(cfg.grid, cfg.patch_size).to(self.device)  # (N, N)

    @property
    def vit(self) -> ViT:
        return self.net.vit

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
        """(B, S, S, 3) uint8 -> (class token (B, D), mean of patches (B, D), maps [(B, H, T, T)] * L).

        A model without a class token (SigLIP) gives its attention-pooling head's output instead."""
        x = self.net.normalize(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))  # (B, 3, S, S)
        tokens, maps = self.vit.forward_features(x, return_attn=True)  # (B, T, D), [(B, H, T, T)]
        first = "cls" if self.ckpt.config.class_token else "map"
        cls, mean = self.vit.pool(tokens, first), self.vit.pool(tokens, "gap")  # (B, D) each
        return cls.float().cpu().numpy(), mean.float().cpu().numpy(), maps


def analyze_part(records: pa.Table, probe: Probe, pre: Preprocess, call_size: int,
                 pool: Any = None) -> tuple[dict[str, pa.Table], np.ndarray, dict]:
    """A part's records -> ({"ok": embeddings, "errors": rows}, distance sums (L, H), counts)."""
    pixels, cols = decode_records(records, pre, pool)  # (N, S, S, 3)
    ok = np.flatnonzero(np.array([s == "ok" for s in cols["status"]], dtype=bool))
    cfg = probe.ckpt.config
    sums = np.zeros((cfg.depth, cfg.heads))  # (L, H)
    cls_out, mean_out = [], []
    for start in range(0, len(ok), call_size):
        cls, mean, maps = probe.run(pixels[ok[start:start + call_size]])
        sums += attention_distance(maps, probe.distances, cfg.prefix_tokens).sum(0).cpu().numpy()  # (L, H)
        cls_out.append(cls)
        mean_out.append(mean)
    D = cfg.dim
    rows = records.select(["key", "member", "label"]).take(pa.array(ok, pa.int64()))

    def vectors(chunks: list[np.ndarray]) -> pa.Array:
        flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), D)

    emb = rows.append_column("cls", vectors(cls_out)).append_column("mean", vectors(mean_out))
    errors = error_table(records, cols)
    counts = {"records": len(ok) + errors.num_rows, "ok": len(ok), "errors": errors.num_rows}
    return {"ok": emb, "errors": errors}, sums, counts


class Analyzer:
    """The Ray actor of `analyze`: where `run` has predict.Predictor."""

    def __init__(self, job: dict, threads: int, call_size: int, writer: dict):
        spec = JobSpec.model_validate(job)
        torch.set_num_threads(max(1, threads))
        self.ckpt = load_model(spec.model)
        self.probe = Probe(self.ckpt, resolve_device(spec.engine.device))
        self.call_size = call_size
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self.writer = PartWriter(**writer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self._process(part) for part in parts_of(batch)])

    def _process(self, part: Part) -> pa.Table:
        tables, sums, counts = analyze_part(part.records, self.probe, self.ckpt.preprocess, self.call_size, self.pool)
        files = self.writer.write(part.shard.uri, part.index, tables)
        return pa.table([[part.shard.uri], pa.array([part.index], pa.int32()), [json.dumps(files)],
                         [json.dumps(counts)], [json.dumps(sums.tolist())]], schema=RESULT_SCHEMA)


# --- the driver --------------------------------------------------------------------------------


def analyze_job(spec: JobSpec) -> dict:
    """Stream the job's images through the attention path; write tables, figures and the page."""
    from pipeline.page import write_page
    from pipeline.runner import (
        check_uris,
        configure_data,
        model_stage,
        new_run_id,
        plan_on_cluster,
        prepare_beside_ray,
        read_stage,
    )

    t0 = time.time()
    check_uris(spec)
    progress = Progress(spec, t0)
    ckpt, shards, labels = prepare_beside_ray(spec, partial(_prepare, spec, progress), progress)
    fs, out = fsspec.core.url_to_fs(spec.output.uri)
    root = f"{out.rstrip('/')}/analysis"
    run_id = new_run_id()
    plan = plan_on_cluster(spec, ckpt.config)
    configure_data(spec, plan)
    writer = {"uri": fs.unstrip_protocol(root), "run_id": run_id, "row_group_rows": spec.output.row_group_rows,
              "metadata": {"run_id": run_id, "model_id": ckpt.model_id, "analysis": FORMAT}}
    # a quarter of `run`'s call size: the attention maps, (B, H, T, T) per layer, are kept until summed
    kwargs = {"job": spec.model_dump(), "threads": plan.threads, "call_size": max(1, plan.call_size // 4),
              "writer": writer}
    ds = model_stage(read_stage(spec, shards, plan, labels.to_index if labels else None), Analyzer, kwargs,
                     plan, len(shards))
    cfg = ckpt.config
    sums, seen, files = np.zeros((cfg.depth, cfg.heads)), set(), []
    counts = {"records": 0, "ok": 0, "errors": 0}
    progress.starting(len(shards))
    with progress.bar() as bar:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for r in table.to_pylist():
                if (r["shard"], r["part"]) in seen:  # a part Ray ran twice: the first report counts
                    continue
                seen.add((r["shard"], r["part"]))
                sums += np.asarray(json.loads(r["distance_sums"]))
                files += json.loads(r["files"])
                for k, v in json.loads(r["counts"]).items():
                    counts[k] += v
            bar.update(counts["records"] - bar.n)
    files = commit_files(fs, root, run_id, files)
    probe = Probe(ckpt)
    tables = {
        "attention_distance": distance_table(sums, counts["ok"]),
        "position_similarity": similarity_table(position_similarity(probe.vit.pos_embed.detach(), cfg.pos_tokens),
                                                cfg.grid),
        "rollout": rollout_table(probe, first_images(spec.source, shards, ckpt.preprocess, spec.analyze.samples)),
        "knn": knn_table(fs, root, [f for f in files if f["kind"] == "ok"], spec, cfg),
    }
    for name, t in tables.items():
        with fs.open(f"{root}/{name}.parquet", "wb") as f:
            pq.write_table(t, f)
    manifest = {
        "format": FORMAT, "run_id": run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": spec.model_dump(mode="json"),
        "model": {"id": ckpt.model_id, "source": ckpt.source, "family": cfg.family, "config": cfg.to_dict()},
        "tokens": tokens_note(cfg),
        "counts": counts, "shards": len(shards), "wall_s": round(time.time() - t0, 3),
        "attention_distance": tables["attention_distance"].to_pylist(),
        # a head attending to every patch alike: the reference line of the figure and the summary
        "uniform_distance_px": round(probe.distances.mean().item(), 4),
        "knn": tables["knn"].to_pylist(),
        "tables": [f"{name}.parquet" for name in tables],
        "files": files,
    }
    fs.pipe_file(f"{root}/_manifest.json", json.dumps(manifest, indent=2).encode())
    write_page(fs.unstrip_protocol(root))
    return manifest


def _prepare(spec: JobSpec, progress: Progress) -> tuple[Checkpoint, list, Any]:
    """The model, the shards and their label map: loaded while Ray starts (runner.prepare_beside_ray)."""
    from pipeline.labels import plan_labels
    from pipeline.runner import listed, load_checkpoint

    ckpt = load_checkpoint(spec, progress)
    shards = listed(spec, progress)
    return ckpt, shards, plan_labels(spec.source, shards, ckpt)


def commit_files(fs: fsspec.AbstractFileSystem, root: str, run_id: str, files: list[dict]) -> list[dict]:
    """This run's part files from _pending/RUN into embeddings/ and errors/, earlier runs' swept;
    returns the files with their paths there (relative to OUT/analysis)."""
    committed = []
    for f in files:
        rel = f"{'embeddings' if f['kind'] == 'ok' else 'errors'}/{posixpath.basename(f['path'])}"
        fs.makedirs(posixpath.dirname(f"{root}/{rel}"), exist_ok=True)
        fs.mv(f"{root}/_pending/{run_id}/{f['path']}", f"{root}/{rel}")
        committed.append(f | {"path": rel})
    sweep(fs, root, ("embeddings/part-*.parquet", "errors/part-*.parquet"), {f["path"] for f in committed})
    return committed


def distance_table(sums: np.ndarray, images: int) -> pa.Table:
    L, H = sums.shape
    mean = sums / max(images, 1)  # (L, H)
    return pa.table({"layer": pa.array(np.repeat(np.arange(L), H), pa.int32()),
                     "head": pa.array(np.tile(np.arange(H), L), pa.int32()),
                     "mean_distance_px": pa.array(mean.reshape(-1), pa.float64()),
                     "images": pa.array([images] * (L * H), pa.int64())})


def similarity_table(sim: np.ndarray, grid: int) -> pa.Table:
    n = len(sim)
    return pa.table({"position": pa.array(np.arange(n), pa.int32()),
                     "row": pa.array(np.arange(n) // grid, pa.int32()), "col": pa.array(np.arange(n) % grid, pa.int32()),
                     "similarity": pa.FixedSizeListArray.from_arrays(pa.array(sim.reshape(-1), pa.float32()), n)})


def rollout_table(probe: Probe, samples: list[tuple[dict, np.ndarray]]) -> pa.Table:
    """The rollout of each sample image (decode.first_images), with the image itself as PNG."""
    from PIL import Image

    grid = probe.ckpt.config.grid
    cfg = probe.ckpt.config
    maps = (rollout(probe.run(np.stack([px for _, px in samples]))[2], cfg.prefix_tokens, cfg.class_token).cpu().numpy()
            if samples else [])
    pngs = []
    for _, pixels in samples:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        pngs.append(buf.getvalue())
    flat = np.asarray(maps, np.float32).reshape(-1)
    return pa.table({"sample": pa.array(range(len(samples)), pa.int32()),
                     "key": pa.array([r["key"] for r, _ in samples], pa.string()),
                     "member": pa.array([r["member"] for r, _ in samples], pa.string()),
                     "label": pa.array([r["label"] for r, _ in samples], pa.int64()),
                     "grid": pa.array([grid] * len(samples), pa.int32()),
                     "image": pa.array(pngs, pa.binary()),
                     "rollout": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), grid * grid)})


KNN_SCHEMA = pa.schema([("embedding", pa.string()), ("k", pa.int32()), ("accuracy", pa.float64()),
                        ("train_images", pa.int64()), ("test_images", pa.int64()), ("note", pa.string())])


def tokens_note(cfg) -> dict:
    """Which tokens come before the patches, left out of the distances and the patch mean, and
    what the rollout and the first embedding are for a model without a class token."""
    prefix = (["class"] if cfg.class_token else []) + (["distillation"] if cfg.distill_token else []) + \
        [f"register {i}" for i in range(cfg.registers)]
    note = {"prefix": prefix, "excluded_from_distances": prefix, "first_embedding": first_embedding(cfg)}
    if not cfg.class_token:
        note["rollout"] = "no class token: the mean of every token's rollout row, over the patches"
    return note


def first_embedding(cfg) -> str:
    """The knn table's first row: the class token, or the MAP head's output where there is none."""
    return "class token" if cfg is None or cfg.class_token else "attention-pooling head (no class token)"


def knn_table(fs: fsspec.AbstractFileSystem, root: str, files: list[dict], spec: JobSpec,
              spec_cfg=None) -> pa.Table:
    """Class token vs mean of patches, by kNN accuracy on the labeled images (none: no rows)."""
    a = spec.analyze
    paths = [f"{root}/{f['path']}" for f in files]
    if not paths:
        return KNN_SCHEMA.empty_table()
    chunks, have = [], 0
    for p in sorted(paths):  # read back only as far as the bound: the driver never holds the whole dataset
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=["key", "label", "cls", "mean"])
        t = t.filter(t["label"].is_valid())
        chunks.append(t)
        have += t.num_rows
        if have >= a.knn_max_images:
            break
    t = pa.concat_tables(chunks).slice(0, a.knn_max_images)
    if t.num_rows < 10:
        return KNN_SCHEMA.empty_table()
    test = np.array([held_out(k, a.knn_holdout) for k in t["key"].to_pylist()])
    if test.all() or not test.any():  # every image on one side of the split: nothing to compare
        return KNN_SCHEMA.empty_table()
    y = t["label"].to_numpy()
    rows = []
    for name in ("cls", "mean"):
        x = np.asarray(t[name].combine_chunks().flatten().to_numpy(), np.float32).reshape(t.num_rows, -1)  # (n, D)
        acc = knn_accuracy(x[~test], y[~test], x[test], y[test], a.knn_k)
        rows.append({"embedding": name, "k": a.knn_k, "accuracy": round(acc, 4), "train_images": int((~test).sum()),
                     "test_images": int(test.sum()),
                     "note": first_embedding(spec_cfg) if name == "cls" else "mean of patch tokens"})
    return pa.Table.from_pylist(rows, schema=KNN_SCHEMA)


def summary(manifest: dict, uri: str) -> str:
    """What `vitpipe analyze` prints: the distance table (layers x heads) and the kNN figures."""
    c = manifest["counts"]
    lines = [f"analyze {manifest['run_id']}: {c['ok']} images ({c['errors']} errors) of {manifest['shards']} "
             f"shard(s) in {manifest['wall_s']:.1f} s -> {uri}", "",
             "mean attention distance (pixels), layer x head:"]
    from pipeline.page import distance_grid

    grid = distance_grid(manifest["attention_distance"])  # (L, H)
    lines.append("  layer " + "".join(f"{f'head {h}':>9}" for h in range(len(grid[0]))))
    lines += [f"  {layer:5d} " + "".join(f"{v:9.2f}" for v in vals) for layer, vals in enumerate(grid)]
    lines.append(f"  (a head attending to every patch alike: {manifest['uniform_distance_px']:.2f} px; the image "
                 f"is {manifest['model']['config']['image_size']} px)")
    knn = manifest["knn"]
    if knn:
        lines += ["", f"k-nearest neighbours (k={knn[0]['k']}, cosine; {knn[0]['train_images']} train, "
                      f"{knn[0]['test_images']} held-out images):"]
        lines += [f"  {r['note']:22s} accuracy {r['accuracy']:.4f}" for r in knn]
    else:
        lines += ["", "k-nearest neighbours: no labels in this source (or under 10 labeled images): not compared"]
    return "\n".join(lines)
