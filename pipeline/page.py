"""A page per output: `report.html` beside `_manifest.json`, one self-contained file (figures
inline as PNG, no script or style from the network) that a person opens in a browser.

Built only from what the output holds (the manifest, the error files, the analysis tables),
so `vitpipe report OUT` rebuilds it at any time, anywhere the output can be read:

- a run (format vitpipe-output/1): counts; the images and their labels, from the sample the
  model actors made (OUT/_samples/, samples.py): a grid of thumbnails (the most confident of the
  most frequent classes, the least confident, those whose ground truth disagrees), the
  distribution of top-1 labels and scores, a confusion matrix where labels exist, a PCA map of
  sampled embeddings; errors by type with examples, throughput over time, time to the first row
  and to full speed, engine and accuracy-gate figures;
- an analysis (vitpipe-analysis/1, OUT/analysis/): attention distance against depth per head
  (the paper's Fig. 7, right), the position-embedding similarity grid (Fig. 7, centre), rollout
  overlays, and the class token vs mean-of-patches kNN figures. The figures are also written
  as PNG files beside it.

A small inline script marks, once the page has loaded, how many figures decoded and how many
are not blank (`data-figures`, `data-figures-drawn` on <body>): what the browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline import samples

_CHECK = """<script>
addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.figure")];
  let drawn = 0;
  for (const img of imgs) {
    if (!img.complete || !img.naturalWidth) continue;
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext("2d"); g.drawImage(img, 0, 0);
    const px = g.getImageData(0, 0, c.width, c.height).data;
    let differ = false;
    for (let i = 4; i < px.length && !differ; i += 4)
      differ = px[i] !== px[0] || px[i + 1] !== px[1] || px[i + 2] !== px[2];
    if (differ) drawn++;
  }
  document.body.dataset.figures = imgs.length;
  document.body.dataset.figuresDrawn = drawn;
  // thumbnails: how many decoded, and what each drew (4 x 4 block means, 0-255), beside the row it names
  const thumbs = [...document.querySelectorAll("img.thumb")];
  let shown = 0;
  for (const img of thumbs) {
    if (!img.complete || !img.naturalWidth) continue;
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext("2d"); g.drawImage(img, 0, 0);
    const px = g.getImageData(0, 0, c.width, c.height).data;
    const grid = new Array(16).fill(0), n = new Array(16).fill(0);  // mean grey of each of 4 x 4 blocks
    for (let y = 0; y < c.height; y++)
      for (let x = 0; x < c.width; x++) {
        const i = 4 * (y * c.width + x), b = 4 * Math.floor(4 * y / c.height) + Math.floor(4 * x / c.width);
        grid[b] += (px[i] + px[i + 1] + px[i + 2]) / 3; n[b]++;
      }
    const fig = img.closest("figure");
    fig.dataset.drawnGrid = grid.map((v, b) => (v / n[b]).toFixed(1)).join(",");
    fig.dataset.drawnSize = c.width + "x" + c.height;
    shown++;
  }
  document.body.dataset.thumbs = thumbs.length;
  document.body.dataset.thumbsDrawn = shown;
});
</script>"""
_STYLE = """<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; border: 1px solid #eee; } code { background: #f4f4f4; padding: 0 3px; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; margin: .5em 0 1em; }
figure.thumb { margin: 0; width: 112px; font-size: 11px; line-height: 1.25; }
img.thumb { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ddd; }
figure.thumb .key { color: #666; word-break: break-all; } figure.thumb .wrong { color: #b00; }
td.c { text-align: right; font-variant-numeric: tabular-nums; min-width: 2.5em; }
</style>"""


def write_page(uri: str) -> str:
    """Build OUT/report.html from OUT/_manifest.json (a run or an analysis); returns its path."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no _manifest.json; a page is built from a finished run's output "
                                "(vitpipe run) or its analysis (OUT/analysis, vitpipe analyze)") from None
    if manifest.get("format", "").startswith("vitpipe-analysis"):
        page = analysis_page(fs, root, manifest)
    else:
        page = run_page(fs, root, manifest)
    path = f"{root}/report.html"
    fs.pipe_file(path, page.encode())
    return fs.unstrip_protocol(path)


# --- a run --------------------------------------------------------------------------------------


def run_page(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> str:
    r = manifest.get("report", {})
    t = manifest.get("totals", {})
    body = [f"<h1>vitpipe run {_e(r.get('run_id', manifest.get('run_id', '')))}: {_e(r.get('job', ''))}</h1>",
            f"<p>Output <code>{_e(r.get('output_uri', root))}</code>, committed {_e(manifest.get('created_at', ''))}, "
            f"mode {_e(r.get('mode', ''))}.</p>",
            "<h2>Counts</h2>",
            _table(["", "this run", "whole output"], [
                ["records read", r.get("records_read"), t.get("records")],
                ["ok rows", r.get("ok_rows"), t.get("ok")],
                ["error rows", r.get("error_rows"), t.get("errors")],
                ["skipped members", sum((r.get("skipped_members") or {}).values()), t.get("skipped")],
                ["shards", f"{r.get('shards_processed', 0)} processed, {r.get('shards_resumed', 0)} resumed, "
                           f"{r.get('shards_unchanged', 0)} unchanged", t.get("shards")],
                ["duplicates dropped (retried parts)", r.get("duplicates_dropped", 0), ""],
            ]),
            *_sample_sections(fs, root, manifest),
            "<h2>Errors by type, with examples</h2>", _errors(fs, root, manifest),
            "<h2>Throughput</h2>",
            _table(["", ""], [
                ["wall time", f"{r.get('wall_s', 0):.1f} s"],
                ["images/s (whole run)", r.get("images_per_s")],
                ["time to start (model, listing, lease, Ray)", _s(r.get("time_to_start_s"))],
                ["time to the first row", _s(r.get("time_to_first_row_s"))],
                ["time to full speed", _s(r.get("time_to_full_speed_s"))],
            ]),
            _img(throughput_figure(r.get("timeline") or [], r.get("time_to_first_row_s"),
                                   r.get("time_to_full_speed_s"), r.get("wall_s")), "throughput over time"),
            "<h2>Engine</h2>",
            _table(["", ""], [
                ["model", f"{r.get('model_source', '')} ({r.get('model_family', 'vit')}, id "
                          f"{str(r.get('model_id', ''))[:12]}), embedding dim {r.get('embedding_dim')}"
                          f"{', L2-normalized' if r.get('normalized') else ''}"],
                ["engine", f"{r.get('engine', '')} ({r.get('engine_reason', '')})"],
                ["actors", f"{r.get('actors')} x {r.get('threads_per_actor')} thread(s), "
                           f"{r.get('decode_actors', 0)} decode actor(s)"],
                ["decode", f"{r.get('decoder', '')}; {r.get('decoded_gpu', 0)} on the GPU, "
                           f"{r.get('fallback_cpu', 0)} fell back to the CPU"],
                ["parts by node", ", ".join(f"{k}: {v}" for k, v in (r.get("parts_by_node") or {}).items())],
                ["top-1 accuracy", "" if r.get("top1_accuracy") is None
                 else f"{r['top1_accuracy']:.4f} on {r.get('labeled')} labeled images"],
            ]),
            "<h2>Accuracy gate</h2>", _gate(r.get("gate"))]
    return _page(f"vitpipe run {r.get('run_id', '')}", body)


def _sample_sections(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> list[str]:
    """The sections drawn from this run's sample (samples.py): the grid, the distributions, the
    confusion matrix (where labels exist) and the embedding map (where embeddings are written)."""
    files = [f for f in manifest.get("samples", []) if f.get("this_run")]
    if not files:
        kept = ((manifest.get("job") or {}).get("output") or {}).get("samples", True)
        why = ("the job asked for none (output.samples: false)" if not kept
               else "this run wrote no new rows" if manifest.get("samples") is not None
               else "this output was written before runs kept a sample (rerun it to get one)")
        return ["<h2>Images and their labels</h2>", f"<p>No sample to show: {_e(why)}.</p>"]
    sample = samples.read_run_sample(fs, root, files)
    names = list((manifest.get("model") or {}).get("labels") or [])

    def name(i: int | None) -> str:
        if i is None:
            return ""
        return names[i] if 0 <= i < len(names) else sample.names.get(i, str(i))

    picks = samples.choose(sample)
    thumbs = samples.read_thumbs(fs, root, [row for rows in picks.values() for row in rows])
    scope = (f"From this run's {sample.rows_seen:,} ok rows ({len(files)} part(s) sampled, {sample.kept} rows "
             f"kept by the model actors); the whole output's counts are above.")
    out = ["<h2>Images and their labels</h2>", f"<p>{_e(scope)} Each thumbnail is the image the model saw "
           "(after resize and crop), with its top-1 label and score.</p>"]
    titles = {"confident": "Most confident images of the most frequent classes", "unsure": "Least confident images",
              "mislabeled": "Ground truth disagrees with the prediction (most confident first)",
              "any": "Some images (the model has no classification head)"}
    for group, title in titles.items():
        if picks[group]:
            out += [f"<h3>{_e(title)}</h3>", _grid(group, picks[group], thumbs, name)]
    if not sample.labeled:
        out.append("<p>No ground-truth labels in this run: no disagreements and no confusion matrix to show.</p>")
    elif not picks["mislabeled"]:
        out.append(f"<p>Every one of the {sample.labeled:,} labeled images got its label as top-1.</p>")
    if sample.top1:
        out += ["<h2>Top-1 labels and scores</h2>", _img(distribution_figure(sample, name), "top-1 distributions"),
                _top_classes(sample, name)]
    if sample.labeled:
        out += ["<h2>Confusion matrix</h2>", _confusion(sample, name)]
    xy, ids, share = samples.map_points(sample)
    if len(xy):
        out += ["<h2>Embedding map</h2>",
                f"<p>PCA of {len(xy):,} sampled embeddings (rows chosen by a hash of their key, in every part), "
                f"coloured by top-1 label; the two axes hold {share:.0%} of their variance. Images that look alike "
                "to the model lie close together.</p>", _img(map_figure(xy, ids, name), "PCA map of embeddings")]
    elif (manifest.get("job") or {}).get("outputs", {}).get("embeddings") is False:
        out += ["<h2>Embedding map</h2>", "<p>Not drawn: this job wrote no embeddings (outputs.embeddings: false).</p>"]
    return out


def _grid(group: str, rows: list[dict], thumbs: dict[str, bytes], name) -> str:
    """Thumbnails with the row each belongs to: its key, top-1 label and score, and ground truth."""
    cells = []
    for r in rows:
        jpeg = thumbs.get(r["key"])
        if jpeg is None:
            continue
        label, score = r["top1_label"] or "", r["top1_score"]
        truth = "" if r["label"] is None else name(r["label"])
        wrong = truth and r["top1_id"] is not None and r["label"] != r["top1_id"]
        caption = (f"<b>{_e(label)}</b> {score:.3f}" if score is not None else "") + \
            (f'<br><span class="wrong">true: {_e(truth)}</span>' if wrong else (f"<br>true: {_e(truth)}" if truth else "")) + \
            f'<br><span class="key">{_e(r["key"])}</span>'
        cells.append(f'<figure class="thumb" data-group="{group}" data-key="{_e(r["key"])}" data-label="{_e(label)}" '
                     f'data-score="{"" if score is None else f"{score:.6f}"}" data-truth="{_e(truth)}">'
                     f'<img class="thumb" alt="{_e(r["key"])}" src="data:image/jpeg;base64,'
                     f'{base64.b64encode(jpeg).decode()}"><figcaption>{caption}</figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _top_classes(sample: samples.RunSample, name, most: int = 10) -> str:
    total = sum(sample.top1.values())
    top = sorted(sample.top1.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [[name(c), k, f"{k / total:.1%}"] for c, k in top[:most]]
    if len(top) > most:
        rest = sum(k for _, k in top[most:])
        rows.append([f"{len(top) - most} other classes", rest, f"{rest / total:.1%}"])
    b = sample.score_bins
    high = sum(b[int(0.9 * len(b)):]) / max(sum(b), 1)
    low = sum(b[: int(0.5 * len(b))]) / max(sum(b), 1)
    return (_table(["top-1 label", "images", "share"], rows) +
            f"<p>{len(top)} classes predicted; top-1 score at least 0.9 for {high:.1%} of images, "
            f"below 0.5 for {low:.1%}.</p>")


def _confusion(sample: samples.RunSample, name, most: int = 10) -> str:
    """Rows: ground truth; columns: top-1; for the `most` classes with the most labeled or
    predicted images, the rest together as "other". A cell's shade is its share of its row."""
    weight: dict[int, int] = {}
    for (a, b), k in sample.confusion.items():
        weight[a] = weight.get(a, 0) + k
        weight[b] = weight.get(b, 0) + k
    classes = sorted(weight, key=lambda c: (-weight[c], c))[:most]
    other = len(weight) > len(classes)
    index = {c: i for i, c in enumerate(classes)}
    size = len(classes) + other
    m = np.zeros((size, size), np.int64)
    for (a, b), k in sample.confusion.items():
        m[index.get(a, size - 1), index.get(b, size - 1)] += k
    heads = [name(c) for c in classes] + (["other"] if other else [])
    right = sum(k for (a, b), k in sample.confusion.items() if a == b)
    html_rows = []
    for i, h in enumerate(heads):
        total = max(int(m[i].sum()), 1)
        cells = "".join(f'<td class="c" style="background: rgba({"31,119,180" if i == j else "214,39,40"},'
                        f'{0.85 * m[i, j] / total:.2f})">{m[i, j] or ""}</td>' for j in range(size))
        recall = f"{m[i, i] / total:.1%}" if i < len(classes) else ""
        html_rows.append(f"<tr><th>{_e(h)}</th>{cells}<td class='c'>{int(m[i].sum())}</td><td class='c'>{recall}</td></tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    return (f"<p>{sample.labeled:,} labeled images, {right / max(sample.labeled, 1):.1%} with their label as top-1. "
            f"Rows: ground truth; columns: top-1 prediction; the {len(classes)} classes with the most images"
            f"{', the rest as other' if other else ''}.</p>"
            f'<table class="confusion"><tr><th>true \\ top-1</th>{head}<th>images</th><th>right</th></tr>'
            f"{''.join(html_rows)}</table>")


def distribution_figure(sample: samples.RunSample, name, most: int = 20) -> bytes:
    """Left: images per top-1 label (the `most` most frequent, the rest as one bar); right: the
    histogram of top-1 scores, over every row of the run."""
    fig = _figure(figsize=(10, 3.4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    top = sorted(sample.top1.items(), key=lambda kv: (-kv[1], kv[0]))
    bars = [(name(c)[:18], k) for c, k in top[:most]]
    if len(top) > most:
        bars.append((f"{len(top) - most} others", sum(k for _, k in top[most:])))
    left.bar(range(len(bars)), [k for _, k in bars], color="#1f77b4")
    left.set_xticks(range(len(bars)), [b for b, _ in bars], rotation=60, ha="right", fontsize=8)
    left.set_ylabel("images")
    left.set_title(f"top-1 label ({sum(sample.top1.values()):,} images)", fontsize=10)
    bins = sample.score_bins
    edges = np.linspace(0, 1, len(bins) + 1)
    right.stairs(bins, edges, fill=True, color="#ff7f0e", alpha=0.8)
    right.set_xlabel("top-1 score (softmax)")
    right.set_ylabel("images")
    right.set_title("top-1 score", fontsize=10)
    return _png(fig)


def map_figure(xy: np.ndarray, ids: list[int | None], name, most: int = 10) -> bytes:
    """The PCA map: the `most` most frequent top-1 classes in colour, the rest grey."""
    import matplotlib

    fig = _figure(figsize=(6.5, 5))
    ax = fig.subplots()
    counts: dict = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    shown = sorted(counts, key=lambda c: (-counts[c], -1 if c is None else c))[:most]
    cmap = matplotlib.colormaps["tab10"]
    ids_arr = np.array([-1 if i is None else i for i in ids])
    rest = ~np.isin(ids_arr, [-1 if c is None else c for c in shown])
    if rest.any():
        ax.scatter(xy[rest, 0], xy[rest, 1], s=8, color="#bbb", label="other classes")
    for k, c in enumerate(shown):
        sel = ids_arr == (-1 if c is None else c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=cmap(k % 10), label=name(c) if c is not None else "no head")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    return _png(fig)


def _errors(fs: fsspec.AbstractFileSystem, root: str, manifest: dict, per_type: int = 3,
            most_files: int = 50) -> str:
    """This run's errors by type (the report's counts), each with a few examples read from the
    output's error files: as few files as give every type its examples, `most_files` at most."""
    counts = (manifest.get("report") or {}).get("errors_by_type") or {}
    examples: dict[str, list[dict]] = {}
    files = [f for f in manifest.get("files", []) if f.get("kind") == "errors"]
    for f in files[:most_files]:
        if counts and all(len(examples.get(k, [])) >= min(per_type, n) for k, n in counts.items()):
            break
        t = _read(fs, f"{root}/{f['path']}", ["member", "source_uri", "error_stage", "error_type", "error_message"])
        for row in t.to_pylist():
            if len(examples.setdefault(row["error_type"] or "", [])) < per_type:
                examples[row["error_type"] or ""].append(row)
    if not counts:
        return "<p>No error rows in this run.</p>"
    rows = []
    for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        found = examples.get(kind, [])
        ex = "<br>".join(f"{_e(e['error_stage'])}: <code>{_e(e['source_uri'])}</code> {_e(e['member'])}: "
                         f"{_e(e['error_message'])}" for e in found)
        rows.append([kind, n, ex or "(no example in the output's error files: replaced by a later run?)"])
    return _table(["type", "rows", "examples (stage: shard member: message)"], rows, raw=True)


def _gate(g: dict | None) -> str:
    if not g:
        return "<p>Not run: torch fp32 is the reference engine itself.</p>"
    return _table(["", ""], [["passed", g.get("passed")], ["cosine mean (min)", f"{g.get('cosine_mean'):.5f} "
                                                                                 f"({g.get('cosine_min'):.5f})"],
                             ["top-1 agreement", g.get("top1_agreement")], ["images", g.get("samples")]])


def throughput_series(timeline: list[list[float]], end: float | None = None) -> dict:
    """What the throughput chart draws, from the report's [s from start, records so far] steps:
    the images-done line, carried on to the total at the run's end, and the rate as images
    finished per window of `window` seconds (at least 1 s, a twentieth of the span with rows, and
    the time three parts take on average).

    Parts finish in bursts (Ray Data hands the driver several at once): a rate between two parts
    that arrived 7 ms apart read 12,857 images/s in a 359-image demo whose whole run did 29, so the
    rate is counted over windows that mean something, never between neighbouring parts. A last
    window shorter than half a window is merged into the one before (its rate is not inflated)."""
    if not timeline:
        return {"done_t": [], "done_n": [], "edges": [], "rate": [], "window": 0.0, "total": 0}
    ts = [0.0] + [float(p[0]) for p in timeline]
    ns = [0] + [int(p[1]) for p in timeline]
    stop = max(ts[-1], end or 0.0)
    if stop > ts[-1]:
        ts, ns = ts + [stop], ns + [ns[-1]]  # the line goes on at the total to the run's end
    first = float(timeline[0][0])
    span = ts[-1] - first
    window = max(1.0, span / 20, 3 * span / len(timeline))  # ~3 parts a window at least: no empty windows between parts
    edges = list(np.arange(0.0, ts[-1], window)) + [ts[-1]]
    if len(edges) > 2 and edges[-1] - edges[-2] < window / 2:
        del edges[-2]
    if len(edges) < 2:
        edges = [0.0, max(ts[-1], window)]
    done = np.array(ns)
    at_edges = [int(done[np.searchsorted(ts, e, side="right") - 1]) for e in edges]
    at_edges[-1] = ns[-1]
    widths = np.diff(edges)
    rate = (np.diff(at_edges) / np.maximum(widths, 1e-9)).tolist()
    return {"done_t": ts, "done_n": ns, "edges": [float(e) for e in edges], "rate": rate, "window": window,
            "total": ns[-1]}


def throughput_figure(timeline: list[list[float]], first_row: float | None, full_speed: float | None,
                      end: float | None = None) -> bytes:
    """The throughput chart as PNG (throughput_plot)."""
    return _png(throughput_plot(timeline, first_row, full_speed, end))


def throughput_plot(timeline: list[list[float]], first_row: float | None, full_speed: float | None,
                    end: float | None = None):
    """Images done over time (a step per finished part, reaching the total), and the rate per
    window (throughput_series); the start-up before the first row shaded, full speed marked.
    Returns the matplotlib Figure (its lines are what the test reads)."""
    fig = _figure(figsize=(9, 3.2))
    ax = fig.subplots()
    s = throughput_series(timeline, end)
    if s["total"]:
        ax.plot(s["done_t"], s["done_n"], drawstyle="steps-post", color="#1f77b4", lw=2,
                label=f"images done ({s['total']:,} at {s['done_t'][-1]:.1f} s)")
        ax.plot(s["done_t"][-1:], s["done_n"][-1:], "o", color="#1f77b4")  # the end: every image done
        ax.axhline(s["total"], color="#1f77b4", linestyle=":", lw=0.8)
        ax.set_ylabel("images done")
        ax.set_ylim(0, s["total"] * 1.08)
        ax2 = ax.twinx()
        ax2.stairs(s["rate"], s["edges"], color="#ff7f0e", alpha=0.8,
                   label=f"images/s per {s['window']:.3g} s window")
        ax2.set_ylabel(f"images/s ({s['window']:.3g} s windows)", color="#ff7f0e")
        ax2.set_ylim(0, max(s["rate"]) * 1.15 or 1)
        ax2.legend(loc="lower right", fontsize=8)
        if first_row is not None:
            ax.axvspan(0, first_row, color="grey", alpha=0.15, label=f"start-up: first row at {first_row:.1f} s")
        if full_speed is not None:
            ax.axvline(full_speed, color="green", linestyle="--", label=f"full speed at {full_speed:.1f} s")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_xlim(0, s["done_t"][-1] * 1.04 + 1e-3)
    else:
        ax.text(0.5, 0.5, "no image was processed in this run (nothing new to do)", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("seconds from the run's start")
    return fig


# --- an analysis ---------------------------------------------------------------------------------


def _tokens(manifest: dict) -> str:
    """The family and its tokens before the patches, which the distances and the patch mean leave out."""
    t = manifest.get("tokens") or {}
    family = manifest["model"].get("family", "vit")
    prefix = ", ".join(t.get("prefix", [])) or "none"
    extra = f" Rollout: {t['rollout']}." if t.get("rollout") else ""
    return (f"<p>Family <b>{_e(family)}</b>. Tokens before the patches (left out of the distances and the patch "
            f"mean): {_e(prefix)}. The first embedding compared below: {_e(t.get('first_embedding', 'class token'))}."
            f"{_e(extra)}</p>")


def analysis_page(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> str:
    tables = {name: _read(fs, f"{root}/{name}.parquet")
              for name in ("attention_distance", "position_similarity", "rollout", "knn")}
    cfg = manifest["model"]["config"]
    figures = {"attention_distance": distance_figure(tables["attention_distance"].to_pylist(), cfg,
                                                         manifest["uniform_distance_px"]),
               "position_similarity": similarity_figure(tables["position_similarity"],
                                                        cfg["image_size"] // cfg["patch_size"]),
               "rollout": rollout_figure(tables["rollout"])}
    for name, png in figures.items():  # also as files, beside the tables
        fs.pipe_file(f"{root}/{name}.png", png)
    c = manifest["counts"]
    knn = tables["knn"].to_pylist()
    grid = distance_grid(tables["attention_distance"].to_pylist())  # (L, H)
    body = [f"<h1>vitpipe analyze {_e(manifest['run_id'])}: {_e(manifest['job'].get('name', ''))}</h1>",
            f"<p>Model <code>{_e(manifest['model']['source'])}</code> (id {_e(manifest['model']['id'][:12])}): "
            f"{cfg['depth']} layers x {cfg['heads']} heads, {cfg['image_size']} px images in "
            f"{cfg['patch_size']} px patches. {c['ok']} images analyzed ({c['errors']} failed to decode) from "
            f"{manifest['shards']} shard(s) in {manifest['wall_s']:.1f} s.</p>",
            _tokens(manifest),
            "<h2>Mean attention distance</h2>",
            "<p>For each head: attention weight x pixel distance between query and key patch centres, summed "
            "over keys, averaged over query patches and over every image (the paper's Fig. 7, right). "
            "Small: the head looks locally; near the dotted line (a head attending to every patch alike, "
            f"{manifest['uniform_distance_px']:.1f} px here): "
            "globally.</p>",
            _img(figures["attention_distance"], "attention distance by layer and head"),
            _table(["layer"] + [f"head {h}" for h in range(len(grid[0]))],
                   [[layer] + [f"{v:.2f}" for v in vals] for layer, vals in enumerate(grid)]),
            "<h2>Position embeddings</h2>",
            "<p>Cosine similarity of each patch position's learned embedding with every other position "
            "(one small map per position, laid out as the patch grid; the paper's Fig. 7, centre).</p>",
            _img(figures["position_similarity"], "position embedding similarity"),
            "<h2>Attention rollout</h2>",
            f"<p>What the class token attends to, through all layers (heads averaged, identity added, rows "
            f"normalised, multiplied layer by layer), for {tables['rollout'].num_rows} sample images.</p>",
            _img(figures["rollout"], "attention rollout overlays"),
            "<h2>Class token or mean of patches?</h2>",
            _table(["embedding", "k", "kNN accuracy", "train images", "held-out images"],
                   [[r["note"], r["k"], f"{r['accuracy']:.4f}", r["train_images"], r["test_images"]] for r in knn])
            if knn else "<p>Not compared: the images carry no labels (or fewer than 10).</p>"]
    return _page(f"vitpipe analyze {manifest['run_id']}", body)


def distance_grid(rows: list[dict]) -> list[list[float]]:
    """attention_distance rows (layer, head, mean_distance_px) -> [layer][head], for the printed
    summary and the page alike."""
    grid = [[0.0] * (max(r["head"] for r in rows) + 1) for _ in range(max(r["layer"] for r in rows) + 1)]
    for r in rows:
        grid[r["layer"]][r["head"]] = r["mean_distance_px"]
    return grid


def distance_figure(rows: list[dict], cfg: dict, uniform: float) -> bytes:
    """Mean attention distance against depth, one dot per head (the paper's Fig. 7, right)."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    layers = np.array([r["layer"] for r in rows])
    heads = np.array([r["head"] for r in rows])
    values = np.array([r["mean_distance_px"] for r in rows])
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    for h in range(heads.max() + 1):
        sel = heads == h
        ax.scatter(layers[sel], values[sel], s=18, color=cmap(h % 20), label=f"head {h}")
    ax.axhline(uniform, color="grey", linestyle=":", label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, cfg["image_size"] * 0.75)
    ax.set_xticks(range(layers.max() + 1))
    if heads.max() < 16:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(f"{rows[0]['images']} images")
    return _png(fig)


def similarity_figure(table: Any, grid: int) -> bytes:
    """Each position's cosine similarity to every position, as a grid x grid map, laid out as the grid."""
    sim = np.asarray(table["similarity"].combine_chunks().flatten().to_numpy(), np.float32).reshape(grid * grid,
                                                                                                     grid, grid)
    side = min(9, 0.45 * grid + 1)
    fig = _figure(figsize=(side, side))
    axes = fig.subplots(grid, grid, squeeze=False)
    for p in range(grid * grid):
        ax = axes[p // grid][p % grid]
        ax.imshow(sim[p], vmin=-1, vmax=1, cmap="viridis")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("position embedding similarity (cosine, -1 to 1)")
    return _png(fig)


def rollout_figure(table: Any) -> bytes:
    """Each sample image beside its rollout map laid over it."""
    from PIL import Image

    rows = table.to_pylist()
    if not rows:
        fig = _figure(figsize=(4, 1))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no sample image", ha="center")
        return _png(fig)
    cols = min(8, len(rows))
    lines = -(-len(rows) // cols)
    fig = _figure(figsize=(1.6 * cols, 1.8 * lines))
    axes = fig.subplots(lines, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, r in enumerate(rows):
        img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))  # (S, S, 3)
        g = r["grid"]
        heat = np.asarray(r["rollout"], np.float32).reshape(g, g)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        ax = axes[i // cols][i % cols]
        ax.imshow(img)
        ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, img.shape[1], img.shape[0], 0),
                  interpolation="bilinear")
        label = "" if r["label"] is None else f" ({r['label']})"
        ax.set_title(f"{posixpath.basename(r['key'])[-14:]}{label}", fontsize=7)
    return _png(fig)


# --- plumbing -------------------------------------------------------------------------------------


def _read(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None):
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _figure(**kw):
    """A matplotlib Figure drawn by Agg, without pyplot (no global state, no display, half the
    import time): imported only when a page is drawn, or ahead by `warm`."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def warm() -> None:
    """Import the plotting library ahead of the commit (called while the run streams, when the
    driver has nothing to do), so the page costs the run's end only its drawing."""
    _figure()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<p><img class="figure" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    def cell(v: Any, last: bool) -> str:
        n = isinstance(v, int | float) and not isinstance(v, bool)
        text = str(v) if raw and last else _e("" if v is None else str(v))
        return f'<td class="n">{text}</td>' if n else f"<td>{text}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v, i == len(r) - 1) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{f'<tr>{head}</tr>' if any(header) else ''}{body}</table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>{_STYLE}'
            f"</head><body>{''.join(body)}{_CHECK}</body></html>")


def _e(s: Any) -> str:
    return html.escape(str(s))


def _s(v: float | None) -> str:
    return "" if v is None else f"{v:.1f} s"
