"""`vitpipe`: run | analyze | compile | submit | status | logs | stop | schedule | runs | errors | demo | inspect | report.

Each command's --help explains its options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from pipeline.config import JobSpecError, describe_spec, load_job_spec


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec_for_cli(args)
    from pipeline.runner import run_job

    report = run_job(spec)
    print(report.summary())
    out = spec.output.uri.rstrip("/")
    print(f"\nmanifest: {out}/_manifest.json   page: {out}/report.html   inspect: vitpipe inspect {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    spec = _spec_for_cli(args)
    from pipeline.analyze import analyze_job, summary

    manifest = analyze_job(spec)
    where = spec.output.uri.rstrip("/") + "/analysis"
    print(summary(manifest, where))
    print(f"\npage: {where}/report.html   tables: {where}/*.parquet")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import fsspec

    from pipeline.page import write_page

    fs, root = fsspec.core.url_to_fs(args.uri)
    targets = [args.uri.rstrip("/")]
    if fs.exists(f"{root.rstrip('/')}/analysis/_manifest.json"):
        targets.append(targets[0] + "/analysis")
    for uri in targets:
        print(f"wrote {write_page(uri)}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    spec = _spec_for_cli(args)
    from pipeline.runner import compile_job

    result = compile_job(spec)
    print(f"engine   {result['backend']} ({result['reason']})")
    print(f"model    {result['model_source']} id {result['model_id'][:12]}")
    if result.get("cache"):
        print(f"cache    {spec.engine.cache_uri or '~/.cache/vitpipe/engines'}: {result['cache']}")
    gate = result.get("gate")
    if gate:
        print(f"gate     {'passed' if gate['passed'] else 'FAILED'}: cosine mean {gate['cosine_mean']:.5f} "
              f"(min {gate['cosine_min']:.5f}), top-1 agreement {gate['top1_agreement']} on {gate['samples']} images")
    else:
        print("gate     not needed (torch fp32 is the reference)")
    return 0


def _spec_for_cli(args: argparse.Namespace):
    """The job spec with the command line's overrides; for a local run, Ray's local settings are
    put in place before anything imports ray (cluster.py)."""
    spec = load_job_spec(args.job, args.set)
    if getattr(args, "address", None) and args.command in ("run", "compile", "analyze"):
        spec.ray.address = args.address
    if getattr(args, "verbose", False):
        spec.ray.verbose = True
    if getattr(args, "no_progress", False):
        spec.ray.progress = False
    if not spec.ray.address:
        from pipeline.cluster import local_environment

        local_environment()
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.service import submit, wait_for

    spec = load_job_spec(args.job, args.set)
    job_id = submit(spec, args.address)
    print(job_id)
    print(f"follow it: vitpipe logs {job_id} --address {args.address} --follow", file=sys.stderr)
    if args.wait:
        status = wait_for(args.address, job_id)
        print(f"{job_id}: {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.service import job_status

    info = job_status(args.address, args.job_id)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline.service import job_logs

    job_logs(args.address, args.job_id, follow=args.follow)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pipeline.service import job_stop

    print(f"{args.job_id}: {'stop requested' if job_stop(args.address, args.job_id) else 'was not running'}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipeline.service import cron_line, install_cron, next_runs

    load_job_spec(args.job, [])  # a bad spec fails now, not at 2 a.m.
    line = cron_line(args.job, args.cron, args.log_dir)
    print(line)
    when = ", ".join(t.strftime("%a %Y-%m-%d %H:%M") for t in next_runs(args.cron))
    print(f"next runs (this machine's time): {when}", file=sys.stderr)
    if args.install:
        install_cron(line)
        print("installed in this user's crontab", file=sys.stderr)
    else:
        print("(print only; --install adds it to this user's crontab; deploy/ has the Kubernetes CronJob)",
              file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.service import list_runs

    runs = list_runs(args.uri)
    if not runs:
        print(f"{args.uri}: no runs recorded (no _runs/)")
        return 1
    print(f"{'run id':<28} {'status':<10} {'mode':<12} {'records':>8} {'ok':>8} {'errors':>7} "
          f"{'shards new/resumed/unchanged':>29} {'wall s':>8}")
    for r in runs:
        shards = f"{r.get('shards_processed', '-')}/{r.get('shards_resumed', '-')}/{r.get('shards_unchanged', '-')}"
        print(f"{r['run_id']:<28} {r['status']:<10} {r.get('mode', '-'):<12} {r.get('records_read', '-'):>8} "
              f"{r.get('ok_rows', '-'):>8} {r.get('error_rows', '-'):>7} {shards:>29} {r.get('wall_s', '-'):>8}")
        if r["status"] == "failed":
            print(f"    {r.get('error', '')}")
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.service import error_summary, retry_spec

    summary = error_summary(args.uri)
    print(f"{args.uri}: {summary['total']} error rows")
    for kind, n in summary["by_type"].items():
        print(f"  {n:>7}  {kind}")
        for ex in summary["examples"][kind]:
            print(f"           e.g. {ex}")
    if args.retry_spec and summary["total"]:
        base = args.retry_spec.removesuffix(".yaml")
        spec = retry_spec(summary, f"{base}.keys.txt", args.retry_output or args.uri.rstrip("/") + "-retry")
        with open(args.retry_spec, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        print(f"wrote {args.retry_spec}: retries the {summary['total']} failed records "
              f"(run it with: vitpipe run {args.retry_spec})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.cluster import local_environment

    local_environment()  # before anything imports ray: the demo's Ray is local, on loopback
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
        "output": {"uri": output_uri, "mode": "full"},
    })
    report = run_job(spec)
    print()
    print(report.summary())
    _show_rows(output_uri, 5)
    print(textwrap.dedent(f"""
        Output: {output_uri}  (part-*.parquet, errors/, _manifest.json, _SUCCESS)
        Query it without Ray, e.g. with DuckDB:
          python -c "import duckdb; print(duckdb.sql(\\"SELECT topk_labels[1] AS predicted, count(*) FROM '{output_uri}/part-*.parquet' GROUP BY 1 ORDER BY 1\\"))"
        or: vitpipe inspect {output_uri}
        The run's page (open it in a browser): {output_uri}/report.html
        What the model attends to, and class token vs mean of patches (from the repository's folder):
          vitpipe analyze jobs/analyze-digits.yaml --set source.uri={shards_uri} --set output.uri={output_uri}"""))
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
    print(files_summary(manifest["files"]))
    shown = manifest["files"] if args.all_files else manifest["files"][:5]
    for f in shown:
        print(f"  {f['path']:<52} {f['kind']:<6} {f['rows']:>9} rows {f['bytes'] / 1e6:>8.2f} MB  sha256 {f['sha256'][:12]}")
    if len(shown) < len(manifest["files"]):
        print(f"  ... and {len(manifest['files']) - len(shown)} more (--all-files lists every one)")
    ok = [f for f in manifest["files"] if f["kind"] == "ok"]
    if ok:
        print("schema:")
        with fs.open(f"{root}/{ok[0]['path']}", "rb") as fh:
            schema = pq.read_schema(fh)
        for field in schema:
            print(f"  {field.name}: {field.type}")
    _show_rows(args.uri, args.rows)
    return 0


def files_summary(files: list[dict]) -> str:
    """Files, rows and bytes by kind, and the spread of file sizes: what 10,000 lines would not show."""
    lines = []
    for kind in ("ok", "errors"):
        mine = [f for f in files if f["kind"] == kind]
        if not mine:
            continue
        sizes = sorted(f["bytes"] for f in mine)
        rows = sum(f["rows"] for f in mine)
        lines.append(f"files  {kind:<6} {len(mine):>7} files {rows:>10} rows {sum(sizes) / 1e6:>10.2f} MB; per file "
                     f"min {sizes[0] / 1e6:.2f} / median {sizes[len(sizes) // 2] / 1e6:.2f} / max {sizes[-1] / 1e6:.2f} MB")
    return "\n".join(lines) or "files  none"


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
        table = pq.ParquetFile(fh, pre_buffer=False).read_row_group(0, use_threads=False).slice(0, n)
    print(f"first {table.num_rows} rows:")
    for row in table.to_pylist():
        emb = row.get("embedding")
        top = ", ".join(f"{name} {score:.2f}" for name, score in
                        zip(row.get("topk_labels") or [], row.get("topk_scores") or [], strict=False))
        emb_s = f"  embedding[{len(emb)}] [{emb[0]:.3f}, {emb[1]:.3f}, ...]" if emb else ""
        print(f"  {row['key']:<20} label {row['label']!s:<4} top-k: {top}{emb_s}")


def _job_args(p: argparse.ArgumentParser, address_help: str, required: bool = False) -> None:
    """The arguments every command that takes a job spec shares."""
    p.add_argument("job", help="path to a job spec YAML file (see jobs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set engine.batch_size=64 --set output.mode=full")
    p.add_argument("--address", required=required, help=address_help)


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
    _job_args(run, "an existing Ray cluster (default: start a local one on 127.0.0.1)")
    run.add_argument("--no-progress", action="store_true", help="no start-up lines and no progress bar (for logs)")
    run.add_argument("--verbose", action="store_true", help="also show Ray's own log lines and worker output")
    run.set_defaults(fn=cmd_run)

    an = sub.add_parser("analyze", help="attention distance, position embeddings, rollout and class token vs "
                                        "mean-of-patches kNN over a job's images",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Stream a job's images (same spec, sources and actors as `run`) through the "
                                    "model's attention path and write, under OUTPUT/analysis/: mean attention "
                                    "distance per layer and head over the whole dataset, the position-embedding "
                                    "similarity grid, attention rollout for analyze.samples images, both "
                                    "embeddings of every image and, where labels exist, their kNN accuracies; "
                                    "tables as Parquet, figures as PNG, and report.html. The run's own output "
                                    "(OUTPUT/*.parquet) is not touched.",
                        epilog="analyze.* fields: samples [16], knn_k [5], knn_holdout [0.2], knn_max_images "
                               "[20000]; e.g. --set analyze.samples=32")
    _job_args(an, "an existing Ray cluster (default: start a local one on 127.0.0.1)")
    an.add_argument("--no-progress", action="store_true", help="no start-up lines and no progress bar (for logs)")
    an.add_argument("--verbose", action="store_true", help="also show Ray's own log lines and worker output")
    an.set_defaults(fn=cmd_analyze)

    comp = sub.add_parser("compile", help="build and cache a job's engine ahead of a run, and print the accuracy gate",
                          description="Build the engine a job would use (ONNX graph, TensorRT plan) where its actors "
                                      "run, store it in engine.cache_uri, and check it against torch fp32 on images "
                                      "from the job's own inputs. Run it ahead of a nightly job on the cluster's GPUs.")
    _job_args(comp, "an existing Ray cluster (default: start a local one on 127.0.0.1)")
    comp.set_defaults(fn=cmd_compile)

    sm = sub.add_parser("submit", help="submit a job to a Ray cluster through the Ray Jobs API",
                        description="Submit `vitpipe run` with this job spec to a Ray cluster. The spec travels with "
                                    "the job; credentials never do (the cluster's workers read them from their "
                                    "environment). Prints the job id.")
    _job_args(sm, "the cluster's dashboard address, e.g. http://127.0.0.1:8265", required=True)
    sm.add_argument("--wait", action="store_true", help="wait for the job to finish; exit 1 unless it succeeded")
    sm.set_defaults(fn=cmd_submit)
    for name, fn, what in (("status", cmd_status, "show a submitted job's status"),
                           ("logs", cmd_logs, "print a submitted job's logs"),
                           ("stop", cmd_stop, "stop a submitted job")):
        c = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        c.add_argument("job_id", help="the id `vitpipe submit` printed")
        c.add_argument("--address", required=True, help="the cluster's dashboard address, e.g. http://127.0.0.1:8265")
        if name == "logs":
            c.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        c.set_defaults(fn=fn)

    sc = sub.add_parser("schedule", help="print (or install) the crontab line for a nightly run",
                        description="Print the crontab line that runs a job on a schedule on this machine "
                                    "(flock makes an overlapping run exit; the output lease refuses a second writer "
                                    "anywhere). For Kubernetes see deploy/cronjob.yaml.")
    sc.add_argument("job", help="path to a job spec YAML file (use output.mode: incremental for nightly runs)")
    sc.add_argument("--cron", required=True, help="a crontab schedule: five fields, e.g. '0 2 * * *' or "
                                                   "'0 2 * * mon', or @daily / @hourly / @weekly")
    sc.add_argument("--log-dir", default="~/.vitpipe/logs", help="where each run's log goes [~/.vitpipe/logs]")
    sc.add_argument("--install", action="store_true", help="add the line to this user's crontab")
    sc.set_defaults(fn=cmd_schedule)

    rn = sub.add_parser("runs", help="list an output's past runs with their status and counts",
                        description="List the runs recorded under OUTPUT/_runs/: status, mode, counts, shards.")
    rn.add_argument("uri", help="the output directory (any fsspec URI)")
    rn.set_defaults(fn=cmd_runs)

    er = sub.add_parser("errors", help="summarize an output's error rows; optionally write a retry job spec",
                        description="Summarize error rows by stage and type with examples. --retry-spec writes a job "
                                    "spec (and a keys file beside it) that re-reads only the failed records.")
    er.add_argument("uri", help="the output directory (any fsspec URI)")
    er.add_argument("--retry-spec", help="write a job spec that retries only the failed records here (YAML)")
    er.add_argument("--retry-output", help="the retry job's output.uri [OUTPUT-retry]")
    er.set_defaults(fn=cmd_errors)

    demo = sub.add_parser("demo", help="label held-out handwritten digits with the bundled ViT, on a local Ray",
                          description="Write demo shards, run a labeling + embedding job on a local Ray, "
                                      "print the report, a few rows, and how to query the output.")
    demo.add_argument("--out", default="demo-output", help="where shards and output go (any fsspec URI) [demo-output]")
    demo.set_defaults(fn=cmd_demo)

    insp = sub.add_parser("inspect", help="show an output's manifest, files, schema and a few rows",
                          description="Show an output dataset's manifest, row counts, schema and a few rows.")
    insp.add_argument("uri", help="the output directory (any fsspec URI)")
    insp.add_argument("--rows", type=int, default=5, help="how many rows to show [5]")
    insp.add_argument("--all-files", action="store_true", help="list every file, not a summary and the first 5")
    insp.set_defaults(fn=cmd_inspect)

    rp = sub.add_parser("report", help="rebuild an output's report.html (and its analysis page) from what it holds",
                        description="Write OUTPUT/report.html from OUTPUT/_manifest.json and the error files, and "
                                    "OUTPUT/analysis/report.html if `vitpipe analyze` wrote there: self-contained "
                                    "pages (figures inline) to open in a browser.")
    rp.add_argument("uri", help="the output directory (any fsspec URI), or its analysis/ folder")
    rp.set_defaults(fn=cmd_report)

    sub.add_parser("bench", help="the side-by-side throughput benchmark (from a source checkout; "
                                 "`vitpipe bench --help` for its options)", add_help=False)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark lives in the repository's benchmarks/ (not in the installed package)."""
    if os.path.exists(os.path.join("benchmarks", "bench.py")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from benchmarks import bench
    except ImportError:
        raise RuntimeError("vitpipe bench runs benchmarks/bench.py from a source checkout: run it from the "
                           "repository root (or: python -m benchmarks.bench --help)") from None
    return bench.main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every option belongs to the benchmark: pass them through untouched
        args = argparse.Namespace(command="bench", fn=cmd_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except JobSpecError as e:
        print(f"vitpipe: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        # Spec, checkpoint, source, output and store errors: their message says what, where and the fix.
        print(f"vitpipe {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitpipe {args.command}: interrupted (a run keeps its finished shards for the next one)",
              file=sys.stderr)
        return 130
    except Exception as e:  # not a problem vitpipe knows: one line here, the traceback in a file
        if getattr(args, "verbose", False) or os.environ.get("VITPIPE_TRACEBACK"):
            raise
        print(f"vitpipe {args.command}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
              f"  unexpected; the traceback is in {_save_traceback(e)} (VITPIPE_TRACEBACK=1 prints it); "
              "please report it", file=sys.stderr)
        return 1


def _save_traceback(e: BaseException) -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="vitpipe-error-", suffix=".txt", delete=False) as f:
        f.write("".join(traceback.format_exception(e)))
    return f.name


if __name__ == "__main__":
    sys.exit(main())
