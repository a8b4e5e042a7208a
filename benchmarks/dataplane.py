"""The data plane, measured side by side in one run: does the engine, not the plumbing, set the pace?

Workload 1, a fast engine (where plumbing shows): the bundled digits model on N small JPEGs
(64 px) in tar shards of 500 on local disk, labels and embeddings to Parquet, each approach a
whole process started as a user would start it:

  a engine     the bundled model alone on in-memory uint8 batches (2 threads): the ceiling
  b vitpipe    `vitpipe run jobs/label.yaml --set outputs.embeddings=true ...`
  c recipe     the plain Ray Data recipe (benchmarks/scripts/ray_recipe.py)
  d loader     a hand-written DataLoader script, 2 workers (benchmarks/scripts/loader.py)

For each: whole-process seconds and images/s, time from process start to the first row and
(vitpipe) to full speed, and CPU-ms per image by process role (driver, read, decode, model,
Ray's own processes). Then vitpipe again at a second size, for the driver's CPU per
*additional* image (the difference between the two runs), once with the digits model's
96-float embeddings and once with a 768-float one (a random ViT-B/32 at 32 px), and on a
3-node ray.cluster_utils.Cluster (part files written on every node).

Workload 2, ViT-Ti/16 at 224 px: benchmarks/bench.py's table (S3 on loopback), run here too.

    python -m benchmarks.dataplane --images 20000 --small 10000 --ti-images 1000

Timings never go into pass/fail tests; tests/test_bench_smoke.py runs a tiny version.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from benchmarks.bench import Monitor, role_kind

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("driver", "read", "decode", "model", "ray")


@dataclass
class Row:
    approach: str
    workload: str
    images: int
    seconds: float
    images_per_s: float
    first_row_s: float | None = None  # from process start
    full_speed_s: float | None = None  # from process start
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU-ms per image by kind of process
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU-seconds by role, as measured
    note: str = ""


def digit_shards(n: int, folder: Path, per_shard: int = 500) -> Path:
    """n digit JPEGs (the sklearn digits, cycled; each key new) as tar shards; reused if there."""
    from pipeline.demo import digit_jpegs

    folder = folder / f"digits-{n}"
    if folder.exists() and len(list(folder.glob("*.tar"))) == -(-n // per_shard):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pool = digit_jpegs("test") + digit_jpegs("train")
    for s in range(0, n, per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s, min(n, s + per_shard)):
                data, label = pool[i % len(pool)]
                for name, payload in ((f"d{i:07d}.jpg", data), (f"d{i:07d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (folder / f"shard-{s // per_shard:05d}.tar").write_bytes(buf.getvalue())
    return folder


def measure(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, Monitor, float]:
    """Run one approach as its own process tree; CPU by role comes from sampling that tree."""
    with Monitor(interval=1.0, memory=False) as mon:  # CPU only: the sampling itself stays cheap
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=(env or os.environ) | {"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        mon.driver = proc.pid
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), mon, t0


def per_kind(mon: Monitor, images: int) -> tuple[dict[str, float], dict[str, float]]:
    """(CPU-ms per image by kind, CPU-seconds by role)."""
    by_role = mon.cpu_by_role()
    kinds: dict[str, float] = {}
    for role, s in by_role.items():
        kinds[role_kind(role)] = kinds.get(role_kind(role), 0.0) + s
    return {k: round(1000 * v / images, 3) for k, v in kinds.items()}, by_role


def first_row(stdout: str) -> float | None:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("FIRST_ROW ")), None)
    return float(line.split()[1]) if line else None


def vitpipe_cmd(src: Path | str, out: Path, sets: tuple[str, ...] = ()) -> list[str]:
    """`vitpipe run jobs/label.yaml` on a folder of shards, embeddings on, replacing `out`."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "label.yaml"), "--no-progress"]
    for s in (f"source.uri={src}", f"output.uri={out}", "output.mode=full", "outputs.embeddings=true", *sets):
        cmd += ["--set", s]
    return cmd


def run_vitpipe(src: Path, out: Path, workload: str, sets: tuple[str, ...] = (), address: str | None = None) -> Row:
    done, mon, t0 = measure(vitpipe_cmd(src, out, sets) + (["--address", address] if address else []))
    report = json.loads((out / "_report.json").read_text())
    n = report["records_read"]
    ms, by_role = per_kind(mon, n)
    offset = report["started_at"] - t0  # process start -> run_job
    nodes = report.get("parts_by_node", {})
    return Row("b vitpipe", workload, n, round(mon.seconds, 2), round(n / mon.seconds, 1),
               _plus(report["time_to_first_row_s"], offset), _plus(report.get("time_to_full_speed_s"), offset),
               ms, by_role, f"{report['actors']} actor(s) x {report['threads_per_actor']} threads, "
                            f"{report['error_rows']} errors, dim {report['embedding_dim']}"
                            + (f", part files on {len(nodes)} nodes: {sorted(nodes.values())}" if address else ""))


def _plus(a: float | None, b: float) -> float | None:
    return None if a is None else round(a + b, 2)


def run_script(name: str, approach: str, src: Path, out: Path, workload: str) -> Row:
    done, mon, t0 = measure([sys.executable, str(ROOT / "benchmarks" / "scripts" / f"{name}.py"), str(src), str(out)])
    n = int(next(ln for ln in done.stdout.splitlines() if ln.startswith("DONE ")).split()[1])
    if name == "loader":  # its worker processes read and decode; its main process runs the model
        mon.proc_cpu = {pid: ("loader workers" if role.startswith("python") else role, cpu)
                        for pid, (role, cpu) in mon.proc_cpu.items()}
    ms, by_role = per_kind(mon, n)
    first = first_row(done.stdout)
    return Row(approach, workload, n, round(mon.seconds, 2), round(n / mon.seconds, 1),
               None if first is None else round(first - t0, 2), None, ms, by_role)


def engine_alone(seconds: float = 4.0, sizes: tuple[int, ...] = (32, 64, 128, 256, 512)) -> Row:
    """The bundled model alone on in-memory uint8 batches, at its best call size of a few."""
    from pipeline.engines.torch_engine import TorchEngine
    from pipeline.model.checkpoints import load_checkpoint

    ckpt = load_checkpoint("builtin:digits")
    S = ckpt.preprocess.image_size
    engine = TorchEngine(ckpt, "fp32", "cpu", threads=os.cpu_count() or 1)
    rates, total, spent = {}, 0, 0.0
    for size in sizes:
        x = np.random.default_rng(0).integers(0, 255, (size, S, S, 3), dtype=np.uint8)  # (B, S, S, 3)
        engine.run(x)
        t0, n = time.time(), 0
        while time.time() - t0 < seconds:
            engine.run(x)
            n += len(x)
        rates[size] = n / (time.time() - t0)
        total, spent = total + n, spent + time.time() - t0
    best = max(rates, key=lambda s: rates[s])
    return Row("a engine", "digits 32px", total, round(spent, 2), round(rates[best], 1),
               note=f"in memory, 2 threads, best call size {best} (" +
                    ", ".join(f"{s}: {r:.0f}" for s, r in rates.items()) + ")")


def driver_per_image(small: Row, big: Row) -> tuple[float, float]:
    """(driver CPU-ms per additional image, the driver's fixed CPU-seconds) from two run sizes."""
    d_small, d_big = small.cpu_s.get("driver", 0.0), big.cpu_s.get("driver", 0.0)
    per = (d_big - d_small) / max(1, big.images - small.images)
    return round(per * 1000, 4), round(d_small - per * small.images, 2)


def markdown(rows: list[Row], derived: list[str], meta: dict, ti_table: str) -> str:
    engine = {r.workload: r for r in rows if r.approach == "a engine"}
    lines = [f"# vitpipe data-plane benchmark: {meta['when']}", "", f"Machine: {meta['machine']}.", "",
             "| approach | workload | images | s (whole process) | images/s | vs engine | vitpipe / this | "
             "first row s | full speed s | CPU-ms/img: driver | read | decode | model | Ray's own | note |",
             "|---" * 16 + "|"]
    for r in rows:
        a = engine.get(r.workload.split(",")[0])
        b = next((x for x in rows if x.approach == "b vitpipe" and x.workload == r.workload), None)
        ms = [f"{r.cpu_ms[k]:.3f}" if k in r.cpu_ms else "" for k in KINDS]
        lines.append(f"| {r.approach} | {r.workload} | {r.images} | {r.seconds} | {r.images_per_s} | "
                     f"{r.images_per_s / a.images_per_s:.2f} | " if a else f"| {r.approach} | {r.workload} | "
                     f"{r.images} | {r.seconds} | {r.images_per_s} | | ")
        lines[-1] += (f"{b.images_per_s / r.images_per_s:.2f} | " if b and r.approach != "b vitpipe" else "| ") + \
            f"{r.first_row_s or ''} | {r.full_speed_s or ''} | " + " | ".join(ms) + f" | {r.note} |"
    lines += ["", *derived, "", "CPU-seconds by role (raw):", ""]
    lines += [f"- {r.approach}, {r.workload}: " + ", ".join(f"{k} {v}" for k, v in list(r.cpu_s.items())[:12])
              for r in rows if r.cpu_s]
    if ti_table:
        lines += ["", "## ViT-Ti/16 at 224 px (benchmarks/bench.py, same run)", "", ti_table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000, help="digits workload size [20000]")
    p.add_argument("--small", type=int, default=10000, help="vitpipe's second size, for the driver's CPU per "
                                                            "additional image [10000]")
    p.add_argument("--wide-images", default="2000,4000", help="the two sizes of the 768-float embedding run "
                                                              "[2000,4000]; 0 skips it")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the cluster run (0 skips it) [3]")
    p.add_argument("--ti-images", type=int, default=1000, help="ViT-Ti/16 224 px workload (0 skips it) [1000]")
    p.add_argument("--no-profile", action="store_true", help="skip the driver's profile (py-spy, one more "
                                                               "vitpipe run at --images)")
    p.add_argument("--only", default="a,b,c,d", help="approaches on the digits workload [a,b,c,d]")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and Markdown go")
    p.add_argument("--name", default="dataplane", help="file name stem of the results")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) - {""}
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"}
    rows: list[Row] = []
    derived: list[str] = []
    ti_table = ""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> str:
        text = markdown(rows, derived, meta, ti_table)
        (out_dir / f"{args.name}.md").write_text(text)
        (out_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                                               "derived": derived}, indent=2))
        return text

    with tempfile.TemporaryDirectory(prefix="vitpipe-dataplane-") as tmp:
        tmp = Path(tmp)
        src = digit_shards(args.images, tmp)
        wl = f"digits 32px, {args.images // 500} tar shards, local disk"
        steps = [("a", lambda: engine_alone()), ("b", lambda: run_vitpipe(src, tmp / "b", wl)),
                 ("c", lambda: run_script("ray_recipe", "c ray recipe", src, tmp / "c", wl)),
                 ("d", lambda: run_script("loader", "d dataloader", src, tmp / "d.parquet", wl))]
        for key, step in steps:
            if key in only:
                row = step()
                row.workload = "digits 32px" if key == "a" else row.workload
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
                save()
        big = next((r for r in rows if r.approach == "b vitpipe"), None)
        if big and args.small:
            small_src = digit_shards(args.small, tmp)
            small = run_vitpipe(small_src, tmp / "b-small", f"digits 32px, {args.small // 500} tar shards, local disk")
            rows.append(small)
            per, fixed = driver_per_image(small, big)
            derived.append(f"- driver, 96-float embeddings: {per} CPU-ms per additional image "
                           f"({args.small} -> {args.images} images), fixed {fixed} CPU-s")
            save()
        if big and args.wide_images != "0":
            n1, n2 = (int(x) for x in args.wide_images.split(","))
            wide = ("model.checkpoint=null", "model.arch=vit_b_32", "model.image_size=32", "model.num_classes=10")
            pair = [run_vitpipe(digit_shards(n, tmp), tmp / f"wide-{n}", f"ViT-B/32 random, 768-d, {n} digits",
                                wide) for n in (n1, n2)]
            rows += pair
            per, fixed = driver_per_image(*pair)
            derived.append(f"- driver, 768-float embeddings: {per} CPU-ms per additional image ({n1} -> {n2} "
                           f"images), fixed {fixed} CPU-s")
            save()
        for r in rows:
            if r.approach == "b vitpipe":
                rest = sum(r.cpu_ms.get(k, 0.0) for k in ("driver", "read", "ray"))
                derived.append(f"- {r.workload}: read + driver + Ray's own = {rest:.3f} CPU-ms per image")
        if big and not args.no_profile:
            derived.append(driver_roles(src, tmp / "spy", args.images))
            save()
        if args.nodes > 1:
            rows.append(cluster_run(args.nodes, digit_shards(args.small or args.images, tmp), tmp))
            save()
        if args.ti_images:
            from benchmarks import bench

            bench.main(["--images", str(args.ti_images), "--models", "vit_ti_16", "--precisions", "fp32",
                        "--out", str(out_dir), "--name", f"{args.name}-vit_ti_16", "--engine-seconds", "6"])
            ti_table = (out_dir / f"{args.name}-vit_ti_16.md").read_text().split("\n", 2)[2]
    print(save())
    return 0


def driver_roles(src: Path, out: Path, images: int) -> str:
    """One more vitpipe run of the big size, its driver under py-spy: where the driver's CPU goes,
    and Ray Data's scheduling loop per second of streaming (a cost per second, not per row)."""
    from benchmarks.driver_profile import profile

    try:
        by_role = profile(vitpipe_cmd(src, out), cwd=ROOT)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return f"- driver profile: not taken ({e})"
    report = json.loads((out / "_report.json").read_text())
    streaming = report["wall_s"] - (report["time_to_first_row_s"] or 0)
    loop = by_role.get("Ray Data's scheduling loop", 0.0)
    return (f"- where the driver's CPU goes (py-spy on the driver of a separate {images}-image run, "
            f"{sum(by_role.values()):.1f} CPU-s): " + ", ".join(f"{k} {v}" for k, v in by_role.items()) +
            f"; Ray Data's scheduling loop: {loop / streaming:.3f} CPU-s per second of streaming "
            f"({streaming:.1f} s from the first row to the end)")


def cluster_run(nodes: int, src: Path, tmp: Path) -> Row:
    """vitpipe on a ray.cluster_utils.Cluster of `nodes` nodes splitting this machine's CPUs: every
    node's model actor writes its own part files, and the driver's share per image stays what it is."""
    import ray
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // nodes) if (os.cpu_count() or 1) >= nodes else 1
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    try:
        row = run_vitpipe(src, tmp / "cluster", f"digits 32px, {nodes}-node Cluster", address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return row


if __name__ == "__main__":
    raise SystemExit(main())
