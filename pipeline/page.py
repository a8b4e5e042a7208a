"""A page per output: `report.html` beside `_manifest.json`, one self-contained file (figures
inline as PNG, no script or style from the network) that a person opens in a browser.

Built only from what the output holds (the manifest, the error files, the analysis tables),
so `vitpipe report OUT` rebuilds it at any time, anywhere the output can be read:

- a run (format vitpipe-output/1): counts, errors by type with examples, throughput over time,
  time to the first row and to full speed, engine and accuracy-gate figures;
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
});
</script>"""
_STYLE = """<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; border: 1px solid #eee; } code { background: #f4f4f4; padding: 0 3px; }
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
            "<h2>Errors by type</h2>", _errors(fs, root, manifest),
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
                ["model", f"{r.get('model_source', '')} (id {str(r.get('model_id', ''))[:12]}), "
                          f"embedding dim {r.get('embedding_dim')}"],
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
    finished per window of `window` seconds (at least 1 s and a twentieth of the span with rows).

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
    window = max(1.0, (ts[-1] - first) / 20)
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
