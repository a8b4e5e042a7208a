"""The run page's sample: small thumbnails and the rows they belong to, made by the model actors
where the images are already decoded, so that the driver never reads an image again.

Each part's actor keeps a bounded set of its ok rows (`part_sample`), chosen so that the page's
picks can be made from the union of all parts' sets:

- the most confident images of the part's most frequent top-1 classes (PER_CLASS each of CLASSES,
  more classes than the page's PAGE_CLASSES);
- its least confident images (UNSURE);
- where ground truth exists, its images whose label disagrees with the prediction, most
  confident first (WRONG);
- a few rows by a hash of their key (POINTS), whose embeddings draw the page's 2-D map.

The page's least confident and mislabeled picks are exact (each part keeps at least as many of
its own as the page shows in all); the confident picks of one of the run's most frequent classes
are exact wherever that class is among the CLASSES most frequent of each part that holds its most
confident images, the usual case for a class that is frequent in the whole run. Thumbnails are JPEGs of at most THUMB_PX px made from the pixels the model saw
(after resize and crop). The part's whole-part figures (top-1 counts, a score histogram, the
confusion counts where labels exist) go into the file's key-value metadata: the page's
distributions count every row, not only the sampled ones.

One file per part, OUT/_samples/part-SHARDKEY-PART-ATTEMPT.parquet, written by write.py beside
the part's rows and committed, replaced and swept with them (sink.py), listed in the manifest's
`samples`. At most MOST_THUMBS thumbnails per part (~2.5 KB each at 96 px), so _samples/ grows
with the number of parts, ~1-3% of a part's ViT-B rows, and the page embeds PAGE_THUMBS at most
(read back from only the files that hold them) whatever the run's size.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

THUMB_PX = 96
PAGE_CLASSES, PER_CLASS, UNSURE, WRONG = 6, 3, 6, 6  # what the page shows
CLASSES, POINTS = 8, 32  # per part: the most frequent classes kept (more than the page's: a margin), map points
MOST_THUMBS = CLASSES * PER_CLASS + UNSURE + WRONG  # 36 per part
PAGE_THUMBS = PAGE_CLASSES * PER_CLASS + UNSURE + WRONG  # 30 on the page, whatever the run's size
SCORE_BINS = 20
MOST_POINTS = 2000  # embeddings on the page's map
STATS_KEY = b"vitpipe.sample_stats"

SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("member", pa.string()),
                    ("label", pa.int64()), ("top1_id", pa.int32()), ("top1_label", pa.string()),
                    ("top1_score", pa.float32()), ("picks", pa.string()), ("thumb", pa.binary()),
                    ("embedding", pa.list_(pa.float16()))])
ROW_COLUMNS = [f.name for f in SCHEMA if f.name != "thumb"]


# --- in the model actor ---------------------------------------------------------------------------


def part_sample(ok_rows: pa.Table, pixels: Any, embeddings: np.ndarray | None) -> pa.Table:
    """A part's ok rows (predict.output_schema), the pixels they were run on ((n, S, S, 3) uint8,
    numpy or a tensor on the GPU) and their embeddings (n, D) or None -> the part's sample (SCHEMA),
    its whole-part figures in the metadata (STATS_KEY)."""
    n = ok_rows.num_rows
    keys = ok_rows.column("key").to_pylist()
    labels = np.array([-1 if v is None else v for v in ok_rows.column("label").to_pylist()], np.int64)
    top1, scores, names = _top1(ok_rows)
    picks: dict[int, list[str]] = {}
    if top1 is not None:
        for i in most_confident_of_frequent(top1, scores):
            picks.setdefault(i, []).append("confident")
        for i in np.argsort(scores, kind="stable")[:UNSURE]:
            picks.setdefault(int(i), []).append("unsure")
        wrong = np.flatnonzero((labels >= 0) & (labels != top1))
        for i in wrong[np.argsort(-scores[wrong], kind="stable")][:WRONG]:
            picks.setdefault(int(i), []).append("mislabeled")
    else:  # no head: the grid shows a few rows chosen by their keys
        for i in by_hash(keys)[:UNSURE]:
            picks.setdefault(int(i), []).append("any")
    thumbs = set(picks)
    if embeddings is not None:
        for i in by_hash(keys)[:POINTS]:
            picks.setdefault(int(i), []).append("point")
    idx = sorted(picks)
    images = _to_numpy(pixels, [i for i in idx if i in thumbs])
    thumb_of = dict(zip([i for i in idx if i in thumbs], (thumbnail(im) for im in images), strict=True))
    emb = None
    if embeddings is not None:  # for the map, only the rows chosen by key: the others are not a fair sample
        points = [i for i in idx if "point" in picks[i]]
        vals = np.asarray(embeddings, np.float32)[points].astype(np.float16)  # (m, D)
        has = np.array([1 if "point" in picks[i] else 0 for i in idx], np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(has)]).astype(np.int32) * vals.shape[1])
        emb = pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1), pa.float16()),
                                       mask=pa.array(has == 0))
    take = pa.array(idx, pa.int64())
    table = pa.table({
        "key": ok_rows.column("key").take(take), "source_uri": ok_rows.column("source_uri").take(take),
        "member": ok_rows.column("member").take(take), "label": ok_rows.column("label").take(take),
        "top1_id": pa.array([None if top1 is None else int(top1[i]) for i in idx], pa.int32()),
        "top1_label": pa.array([None if top1 is None else names[i] for i in idx], pa.string()),
        "top1_score": pa.array([None if top1 is None else float(scores[i]) for i in idx], pa.float32()),
        "picks": pa.array([",".join(picks[i]) for i in idx], pa.string()),
        "thumb": pa.array([thumb_of.get(i) for i in idx], pa.binary()),
        "embedding": emb if emb is not None else pa.nulls(len(idx), pa.list_(pa.float16())),
    }, schema=SCHEMA)
    stats = part_stats(n, labels, top1, scores)
    return table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})


def most_confident_of_frequent(top1: np.ndarray, scores: np.ndarray, classes: int = CLASSES,
                               per_class: int = PER_CLASS) -> list[int]:
    """Row indices: for each of the `classes` most frequent top-1 classes (ties: the lower id),
    its `per_class` most confident rows."""
    ids, counts = np.unique(top1, return_counts=True)
    frequent = ids[np.lexsort((ids, -counts))][:classes]
    out = []
    for c in frequent:
        rows = np.flatnonzero(top1 == c)
        out += [int(i) for i in rows[np.argsort(-scores[rows], kind="stable")][:per_class]]
    return out


def part_stats(n: int, labels: np.ndarray, top1: np.ndarray | None, scores: np.ndarray | None) -> dict:
    """Whole-part figures that add up over parts: top-1 counts, a histogram of top-1 scores in
    SCORE_BINS bins over [0, 1], and (label, top-1) counts where a label exists. (Class names come
    from the manifest's model labels and the sample rows: 1,000 of them per part would double it.)"""
    if top1 is None:
        return {"rows": n, "top1": {}, "score_bins": [0] * SCORE_BINS, "confusion": {}, "labeled": 0}
    ids, counts = np.unique(top1, return_counts=True)
    hist = np.histogram(np.clip(scores, 0, 1), bins=SCORE_BINS, range=(0, 1))[0]
    has = labels >= 0
    pairs, pair_counts = (np.unique(np.stack([labels[has], top1[has]], 1), axis=0, return_counts=True)
                          if has.any() else (np.zeros((0, 2), np.int64), []))
    return {"rows": n, "top1": {str(int(c)): int(k) for c, k in zip(ids, counts, strict=True)},
            "score_bins": [int(v) for v in hist],
            "confusion": {f"{int(a)},{int(b)}": int(k) for (a, b), k in zip(pairs, pair_counts, strict=True)},
            "labeled": int(has.sum())}


def thumbnail(image: np.ndarray, px: int = THUMB_PX, quality: int = 80) -> bytes:
    """(S, S, 3) uint8 -> a JPEG of at most `px` px a side (never enlarged: the page scales up)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image), "RGB")
    img.thumbnail((px, px), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def by_hash(keys: list[str]) -> np.ndarray:
    """Row indices in the order of a hash of their keys: the same rows on every run, spread evenly."""
    h = [_hash(k) for k in keys]
    return np.array(sorted(range(len(keys)), key=h.__getitem__), np.int64)


def _top1(ok_rows: pa.Table) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    if "topk_ids" not in ok_rows.column_names or not ok_rows.num_rows:
        return None, None, []
    ids = pc.list_element(ok_rows.column("topk_ids"), 0) if pc.min(pc.list_value_length(
        ok_rows.column("topk_ids"))).as_py() else None
    if ids is None:  # a model without a head: empty lists
        return None, None, []
    top1 = ids.to_numpy(zero_copy_only=False).astype(np.int64)
    scores = pc.list_element(ok_rows.column("topk_scores"), 0).to_numpy(zero_copy_only=False).astype(np.float32)
    names = pc.list_element(ok_rows.column("topk_labels"), 0).to_pylist()
    return top1, scores, names


def _to_numpy(pixels: Any, idx: list[int]) -> np.ndarray:
    """The chosen images as (m, S, S, 3) uint8 numpy: a tensor's copied off its device (a few
    dozen images); anything else indexable by a list of rows is taken as it is."""
    if type(pixels).__module__.startswith("torch"):
        import torch

        return pixels[torch.as_tensor(idx, dtype=torch.long, device=pixels.device)].cpu().numpy()
    return np.asarray(pixels[np.asarray(idx, np.int64)], np.uint8)


# --- for the page -----------------------------------------------------------------------------------


@dataclass
class RunSample:
    """What the page needs of this run's sample files, bounded whatever the run's size: the
    figures of every row the run wrote, added over its parts, and only the candidates of each
    pick (per top-1 class its PER_CLASS most confident, the UNSURE least confident, the WRONG most
    confident disagreements) and MOST_POINTS map points by key hash. A run of 10 million images
    has ~10,000 sample files of ~68 rows: holding them all would take the driver gigabytes."""

    rows_seen: int = 0  # ok rows of the parts sampled
    kept: int = 0  # rows the model actors kept in those parts
    files: int = 0
    top1: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # top-1 ids -> labels, from the sample rows
    score_bins: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)
    labeled: int = 0
    best: dict[int, list[dict]] = field(default_factory=dict)  # top-1 id -> its most confident rows
    unsure: list[dict] = field(default_factory=list)
    wrong: list[dict] = field(default_factory=list)
    some: list[dict] = field(default_factory=list)  # a model without a head: rows by key
    points: list[tuple[bytes, int | None, np.ndarray]] = field(default_factory=list)  # (key hash, top-1, emb)

    def add(self, path: str, table: pa.Table) -> None:
        """One sample file (SCHEMA without thumb, its metadata) into the run's figures and candidates."""
        stats = json.loads((table.schema.metadata or {}).get(STATS_KEY, b"{}"))
        self.files += 1
        self.kept += table.num_rows
        self.rows_seen += stats.get("rows", 0)
        for c, k in stats.get("top1", {}).items():
            self.top1[int(c)] = self.top1.get(int(c), 0) + k
        self.score_bins = [a + b for a, b in zip(self.score_bins, stats.get("score_bins", [0] * SCORE_BINS),
                                                 strict=True)]
        for pair, k in stats.get("confusion", {}).items():
            a, b = (int(v) for v in pair.split(","))
            self.confusion[(a, b)] = self.confusion.get((a, b), 0) + k
        self.labeled += stats.get("labeled", 0)
        rows = [r | {"file": path} for r in table.drop_columns(["embedding"]).to_pylist()]
        self.names |= {r["top1_id"]: r["top1_label"] for r in rows if r["top1_id"] is not None}
        shown = [r for r in rows if has_thumb(r)]
        scored = [r for r in shown if r["top1_score"] is not None]
        for r in scored:
            self.best[r["top1_id"]] = _best(self.best.get(r["top1_id"], []) + [r], _confident, PER_CLASS)
        self.unsure = _best(self.unsure + scored, lambda r: (r["top1_score"], r["key"]), UNSURE)
        self.wrong = _best(self.wrong + [r for r in scored if r["label"] is not None and r["label"] != r["top1_id"]],
                           _confident, WRONG)
        self.some = _best(self.some + [r for r in shown if r["top1_score"] is None], lambda r: r["key"], UNSURE)
        self._add_points(table)

    def _add_points(self, table: pa.Table) -> None:
        emb = table.column("embedding")
        has = np.flatnonzero(pc.is_valid(emb).to_numpy(zero_copy_only=False))
        if not len(has):
            return
        flat = pc.list_flatten(emb.take(pa.array(has))).to_numpy(zero_copy_only=False)
        vecs = np.asarray(flat, np.float32).reshape(len(has), -1)  # (m, D)
        keys, top1 = table.column("key").to_pylist(), table.column("top1_id").to_pylist()
        self.points += [(_hash(keys[i]), top1[i], vecs[j]) for j, i in enumerate(has)]
        if len(self.points) > 2 * MOST_POINTS:  # keep the MOST_POINTS smallest hashes: the same as at the end
            self.points = sorted(self.points, key=lambda p: p[0])[:MOST_POINTS]


def _confident(row: dict) -> tuple:
    return -row["top1_score"], row["key"]


def _best(rows: list[dict], order, k: int) -> list[dict]:
    """The first k rows in `order`, each key once."""
    out, seen = [], set()
    for r in sorted(rows, key=order):
        if len(out) < k and r["key"] not in seen:
            seen.add(r["key"])
            out.append(r)
    return out


def _hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def read_run_sample(fs, root: str, files: list[dict], in_flight: int = 16) -> RunSample:
    """The sample files named (the manifest's `samples` of this run), without their thumbnails:
    `in_flight` read at once (one small GET each on an object store), added in the order named."""
    def read(f: dict) -> tuple[str, pa.Table]:
        with fs.open(f"{root}/{f['path']}", "rb") as fh:
            return f["path"], pq.read_table(fh, columns=ROW_COLUMNS)

    sample = RunSample()
    with ThreadPoolExecutor(max(1, min(in_flight, len(files)))) as pool:
        for path, table in pool.map(read, files):
            sample.add(path, table)
    return sample


def choose(sample: RunSample, classes: int = PAGE_CLASSES) -> dict[str, list[dict]]:
    """The page's picks: {"confident": for each of the run's `classes` most frequent top-1 classes
    (from every row's counts), its most confident rows; "unsure": the least confident;
    "mislabeled": the most confident disagreements with the ground truth; "any": rows by key,
    for a model without a head}. At most PAGE_THUMBS rows in all. A row may be in two groups (a
    confident image whose ground truth disagrees): groups that gave way to each other would not
    be exact, since each part keeps only as many rows of each group as the page shows."""
    frequent = sorted(sample.top1, key=lambda c: (-sample.top1[c], c))[:classes]
    return {"confident": [r for c in frequent for r in sample.best.get(c, [])], "unsure": list(sample.unsure),
            "mislabeled": list(sample.wrong), "any": [] if sample.best else list(sample.some)}


def has_thumb(row: dict) -> bool:
    """Rows kept only for the map ("point") carry no thumbnail."""
    return any(p != "point" for p in row["picks"].split(","))


def read_thumbs(fs, root: str, rows: list[dict], in_flight: int = 16) -> dict[str, bytes]:
    """key -> thumbnail JPEG for the chosen rows, read from only the sample files that hold them."""
    wanted: dict[str, set[str]] = {}
    for r in rows:
        wanted.setdefault(r["file"], set()).add(r["key"])

    def read(item: tuple[str, set[str]]) -> dict[str, bytes]:
        path, keys = item
        with fs.open(f"{root}/{path}", "rb") as fh:
            t = pq.read_table(fh, columns=["key", "thumb"])
        return {k: v for k, v in zip(t.column("key").to_pylist(), t.column("thumb").to_pylist(), strict=True)
                if k in keys and v is not None}

    out: dict[str, bytes] = {}
    with ThreadPoolExecutor(max(1, min(in_flight, len(wanted)))) as pool:
        for found in pool.map(read, wanted.items()):
            out |= found
    return out


def map_points(sample: RunSample, most: int = MOST_POINTS) -> tuple[np.ndarray, list[int | None], float]:
    """A 2-D PCA of the sampled embeddings (at most `most`, by key hash): (m, 2) coordinates, each
    point's top-1 id, and the share of the variance the two axes hold."""
    points = sorted(sample.points, key=lambda p: p[0])[:most]
    if len(points) < 3:
        return np.zeros((0, 2)), [], 0.0
    x = np.stack([p[2] for p in points]).astype(np.float64)  # (m, D)
    x -= x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    share = float((s[:2] ** 2).sum() / max((s**2).sum(), 1e-12))
    return x @ vt[:2].T, [p[1] for p in points], share
