"""`vitpipe`: run | demo | inspect. Each command's --help explains its options."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from pipeline.config import JobSpecError, describe_spec, load_job_spec


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_job

    spec = load_job_spec(args.job, args.set)
    if args.address:
        spec.ray.address = args.address
    if args.no_progress:
        spec.ray.progress = False
    report = run_job(spec)
    print(report.summary())
    print(f"\nmanifest: {spec.output.uri.rstrip('/')}/_manifest.json   inspect: vitpipe inspect {spec.output.uri}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.config import JobSpec
    from pipeline.demo import digit_jpegs, write_shards
    from pipeline.runner import run_job

    out = args.out.rstrip("/")
    if "://" not in out:
        out = os.path.abspath(out)
    shards_uri, output_uri = f"{out}/shards", f"{out}/labels"
    samples = digit_jpegs("test")
    write_shards(samples, shards_uri, n_shards=4)
    print(f"demo: wrote {len(samples)} held-out handwritten digits as 4 WebDataset shards to {shards_uri}")
    spec = JobSpec.model_validate({
        "name": "demo-digits",
        "source": {"uri": shards_uri, "format": "webdataset"},
        "model": {"checkpoint": "builtin:digits"},
        "engine": {"batch_size": 64},
        "outputs": {"top_k": 3, "embeddings": True},
        "output": {"uri": output_uri, "mode": "overwrite"},
    })
    report = run_job(spec)
    print()
    print(report.summary())
    _show_rows(output_uri, 5)
    print(textwrap.dedent(f"""
        Output: {output_uri}  (part-*.parquet, errors/, _manifest.json, _SUCCESS)
        Query it without Ray, e.g. with DuckDB:
          python -c "import duckdb; print(duckdb.sql(\\"SELECT topk_labels[1] AS predicted, count(*) FROM '{output_uri}/part-*.parquet' GROUP BY 1 ORDER BY 1\\"))"
        or: vitpipe inspect {output_uri}"""))
    if report.top1_accuracy is None or report.top1_accuracy < 0.5:
        print("demo: accuracy is far below what the bundled model reaches; something is wrong", file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(args.uri)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/_manifest.json"):
        print(f"{args.uri}: no _manifest.json: not a finished vitpipe output", file=sys.stderr)
        return 1
    manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    done = fs.exists(f"{root}/_SUCCESS")
    print(f"output {args.uri}: run {manifest['run_id']} created {manifest['created_at']}, "
          f"{'committed (_SUCCESS present)' if done else 'NOT committed (_SUCCESS missing)'}")
    print(f"model {manifest['model']['source']} id {manifest['model']['id'][:12]}, engine {manifest['engine']}")
    print(f"counts {json.dumps(manifest['counts'])}")
    for f in manifest["files"]:
        print(f"  {f['path']:<48} {f['kind']:<6} {f['rows']:>9} rows {f['bytes'] / 1e6:>8.2f} MB  sha256 {f['sha256'][:12]}")
    ok = [f for f in manifest["files"] if f["kind"] == "ok"]
    if ok:
        print("schema:")
        with fs.open(f"{root}/{ok[0]['path']}", "rb") as fh:
            schema = pq.read_schema(fh)
        for field in schema:
            print(f"  {field.name}: {field.type}")
    _show_rows(args.uri, args.rows)
    return 0


def _show_rows(uri: str, n: int) -> None:
    """A few ok rows, the way a user would look at them."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(uri)
    manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/_manifest.json"))
    ok = [f for f in manifest["files"] if f["kind"] == "ok"]
    if not ok or n <= 0:
        return
    with fs.open(f"{root.rstrip('/')}/{ok[0]['path']}", "rb") as fh:
        table = pq.ParquetFile(fh).read_row_group(0).slice(0, n)
    print(f"first {table.num_rows} rows:")
    for row in table.to_pylist():
        emb = row.get("embedding")
        top = ", ".join(f"{name} {score:.2f}" for name, score in
                        zip(row.get("topk_labels") or [], row.get("topk_scores") or [], strict=False))
        emb_s = f"  embedding[{len(emb)}] [{emb[0]:.3f}, {emb[1]:.3f}, ...]" if emb else ""
        print(f"  {row['key']:<20} label {row['label']!s:<4} top-k: {top}{emb_s}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitpipe",
        description="Batch inference on images at scale: shards from object storage -> Ray Data -> "
                    "Vision Transformer -> Parquet (labels and embeddings).",
        epilog="Credentials for object storage come from the environment (AWS_*, AWS_ENDPOINT_URL) or fsspec "
               "config, never from job specs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (YAML)", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run a job spec to a committed Parquet output.",
                         epilog="Job spec fields (section.key: meaning [default]):\n" + describe_spec())
    run.add_argument("job", help="path to a job spec YAML file (see jobs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any field, e.g. --set engine.batch_size=64 --set output.mode=overwrite")
    run.add_argument("--address", help="an existing Ray cluster (default: start a local one on 127.0.0.1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser("demo", help="label held-out handwritten digits with the bundled ViT, on a local Ray",
                          description="Write demo shards, run a labeling + embedding job on a local Ray, "
                                      "print the report, a few rows, and how to query the output.")
    demo.add_argument("--out", default="demo-output", help="where shards and output go (any fsspec URI) [demo-output]")
    demo.set_defaults(fn=cmd_demo)

    insp = sub.add_parser("inspect", help="show an output's manifest, files, schema and a few rows",
                          description="Show an output dataset's manifest, row counts, schema and a few rows.")
    insp.add_argument("uri", help="the output directory (any fsspec URI)")
    insp.add_argument("--rows", type=int, default=5, help="how many rows to show [5]")
    insp.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except JobSpecError as e:
        print(f"vitpipe: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # Spec-level, checkpoint, source and output errors: a message, not a traceback.
        print(f"vitpipe {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
