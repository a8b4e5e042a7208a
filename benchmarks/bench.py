"""Side-by-side throughput on one machine, in one run: the numbers users choose a tool by.

  (a) engine   the engine alone on in-memory uint8 batches: the ceiling
  (b) vitpipe  end to end: JPEG tar shards in S3 (SeaweedFS on loopback) -> Parquet in S3
  (c) recipe   the plain Ray Data recipe of Ray's batch-inference docs: read_webdataset,
               PIL decode + float32 normalize in map_batches, a model class in map_batches
               (one CPU per actor, Ray's default), write_parquet
  (d) loader   a hand-written single-process PyTorch DataLoader script with workers

Same model weights, precision and images for all. Reports images/s, ratios b/a, b/c, b/d,
peak RSS of the process tree, time to first output row, CPU utilization, output files.
Timings never go into pass/fail tests; the smoke test only checks that a table came out.

    python -m benchmarks.bench --images 2000 --models vit_ti_16 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from pipeline.engines.torch_engine import DTYPES  # the same precision names as the engines

BUCKET = "vitpipe-bench"


@dataclass
class Result:
    approach: str
    model: str
    precision: str
    images: int
    seconds: float
    images_per_s: float
    peak_rss_mb: float
    cpu_util: float
    first_row_s: float | None
    files: int | None = None
    file_mb: float | None = None
    note: str = ""
    cpu_s_by_role: dict[str, float] | None = None  # where the CPU time went (Monitor.cpu_by_role)
    gpu_util: float | None = None  # mean GPU busy fraction over the run (NVML), where there is a GPU


class Monitor:
    """Samples memory (PSS) of this process and all its descendants (Ray workers too), and CPU use."""

    def __init__(self, interval: float = 1.0, memory: bool = True):
        """memory: sample PSS too (it reads every process's smaps: ~10x the cost of the CPU sample)."""
        self.interval, self.peak, self._stop, self.memory = interval, 0, threading.Event(), memory
        self.proc = psutil.Process()
        self.driver = self.proc.pid  # the process named "driver" (a subprocess, where one runs the job)
        self.node_of: dict[int, int] = {}  # process pid -> the pid of its node's raylet
        self.proc_cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds during the run)
        self._start_cpu: dict[int, float] = {}  # pid -> CPU seconds when first seen (processes alive before)
        self.gpu_samples: list[float] = []  # NVML's busy percentage of GPU 0, one per sample
        self._nvml = _nvml_handle()

    def __enter__(self) -> Monitor:
        psutil.cpu_percent()
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = [self.proc]
            for p in procs if self.memory else ():
                # PSS: shared pages (Ray's object store, torch libs) counted once across processes.
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_full_info().pss
            self.peak = max(self.peak, rss)
            self._sample_roles(procs)
            self._sample_nodes(procs)
            if self._nvml is not None:
                import pynvml

                with contextlib.suppress(pynvml.NVMLError):
                    self.gpu_samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu / 100.0)
            self._stop.wait(self.interval)

    def _sample_nodes(self, procs: list[psutil.Process]) -> None:
        """Which node each process belongs to (a ray.cluster_utils.Cluster runs one raylet per
        node, and a node's workers are that raylet's children); their CPU is _sample_roles'."""
        for raylet in (p for p in procs if _name(p) == "raylet"):
            with contextlib.suppress(psutil.Error):
                for w in [raylet, *raylet.children(recursive=True)]:
                    self.node_of[w.pid] = raylet.pid

    def _sample_roles(self, procs: list[psutil.Process]) -> None:
        """CPU seconds each process spent since the run began, with its role: the profile that says
        where the machine's time went besides the model (Ray's daemons, the S3 server, the driver)."""
        for p in procs:
            if p.pid == self.proc.pid and self.driver != self.proc.pid:
                continue  # the benchmark itself, watching a job in another process: not the job's time
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                used = t.user + t.system
                if p.pid not in self._start_cpu:
                    # a process that existed before the run counts from here; one born during it, from 0
                    self._start_cpu[p.pid] = used if p.create_time() < self.t0 else 0.0
                role = _role(p, self.driver)
                if role == "?" and p.pid in self.proc_cpu:  # exiting: keep the name it had
                    role = self.proc_cpu[p.pid][0]
                self.proc_cpu[p.pid] = (role, used - self._start_cpu[p.pid])

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds by role, largest first."""
        roles: dict[str, float] = {}
        for role, used in self.proc_cpu.values():
            roles[role] = roles.get(role, 0.0) + used
        return {r: round(v, 1) for r, v in sorted(roles.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    def node_shares(self) -> list[float]:
        """Each node's CPU seconds during the run (not since its processes started), head first."""
        nodes: dict[int, float] = {}
        for pid, raylet in self.node_of.items():
            nodes[raylet] = nodes.get(raylet, 0.0) + self.proc_cpu.get(pid, ("", 0.0))[1]
        return [round(v, 1) for _, v in sorted(nodes.items())]

    @property
    def gpu(self) -> float | None:
        """Mean fraction of sampled seconds in which the GPU was running a kernel (None: no GPU)."""
        return round(sum(self.gpu_samples) / len(self.gpu_samples), 2) if self.gpu_samples else None

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.seconds = time.time() - self.t0
        self.cpu = psutil.cpu_percent() / 100.0


def _nvml_handle():
    """GPU 0's NVML handle, or None without a GPU or without nvidia-ml-py (then no GPU column)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no library, no driver, no GPU: all mean the same here
        return None


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _role(p: psutil.Process, driver: int) -> str:
    """A short name for what a process does: Ray names its workers by the task they run."""
    if p.pid == driver:
        return "driver"
    try:
        name = p.name()
        cmd = " ".join(p.cmdline()[:3])
    except psutil.Error:
        return "?"
    if name.startswith("ray::") or cmd.startswith("ray::"):
        title = cmd.split()[0] if cmd.startswith("ray::") else name
        # Ray Data's actors: ray::MapWorker(MapBatches(Predictor)), or fused: ...(a)->MapBatches(b)): the last
        udfs = re.findall(r"MapBatches\((\w+)", title)
        return udfs[-1] if udfs else title
    for script, role in (("log_monitor.py", "ray log monitor"), ("autoscaler/_private/monitor.py", "ray monitor"),
                         ("dashboard/dashboard.py", "ray dashboard"), ("dashboard/agent.py", "ray::DashboardAgent")):
        if script in cmd:
            return role
    if "weed" in name or "weed" in cmd:
        return "s3 server"
    return name


# What each role is, for CPU-ms per image by kind of work (DESIGN.md, Data flow)
MODEL_ROLES = ("Predictor", "RecipeModel", "Model", "model")
READ_ROLES = ("ShardReader", "ReadWebDataset", "ReadFiles", "reader")
DECODE_ROLES = ("Decoder", "recipe_decode", "decode", "loader workers", "pt_data_worker")


def role_kind(role: str) -> str:
    """model | read | decode | driver | s3 server | ray (Ray's own processes: raylet, GCS, agents, idle
    workers, Ray Data's helper actors)."""
    if role == "driver" or role == "s3 server":
        return role
    if any(r in role for r in MODEL_ROLES):
        return "model"
    if any(r in role for r in DECODE_ROLES):
        return "decode"
    if any(r in role for r in READ_ROLES):
        return "read"
    return "ray"


class FirstFile:
    """Time until the first output file shows up under a prefix (for writers we cannot hook)."""

    def __init__(self, fs, prefix: str):
        self.fs, self.prefix, self.t0, self.at = fs, prefix, time.time(), None
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.at is None:
            try:
                self.fs.invalidate_cache()
                if any(p.endswith(".parquet") for p in self.fs.find(self.prefix)):
                    self.at = time.time() - self.t0
            except OSError:
                pass
            self._stop.wait(0.25)

    def stop(self) -> float | None:
        self._stop.set()
        return None if self.at is None else round(self.at, 2)


# --- input -----------------------------------------------------------------------------------------

def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs of mixed sizes, 200 to 2,000 px on the long side (smooth, so realistically sized)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        long = int(rng.integers(200, 2001))
        short = int(long * rng.uniform(0.6, 1.0))
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        small = rng.integers(0, 255, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_input(fs, jpegs: list[bytes], per_shard: int = 100) -> str:
    """Given images, as tar shards of per_shard; returns the prefix URI."""
    return _upload(fs, f"{BUCKET}/input/n{len(jpegs)}", len(jpegs), per_shard,
                   lambda: (shard_tar(jpegs[s : s + per_shard], first=s) for s in range(0, len(jpegs), per_shard)))


def generate_input(fs, n: int, per_shard: int = 100) -> str:
    """n images made in worker processes and uploaded a shard at a time as they come: the
    benchmark process never holds them all (20,000 JPEGs are ~1.7 GB). Processes, not threads:
    with 16 threads the first GPU run took 92 s to make 20,000 images, most of it waiting on
    the GIL, and a GPU machine's time is the scarce part."""
    jobs = [(s, min(s + per_shard, n), s // per_shard) for s in range(0, n, per_shard)]

    def tars() -> Iterator[bytes]:
        with ProcessPoolExecutor(os.cpu_count() or 1) as makers:
            yield from makers.map(_generated_shard, jobs)

    return _upload(fs, f"{BUCKET}/input/gen{n}", n, per_shard, tars)


def _upload(fs, prefix: str, n: int, per_shard: int, tars: Callable[[], Iterable[bytes]]) -> str:
    """The shards tars() makes, uploaded as they come, unless an earlier run against the same
    server left them all; returns the prefix URI."""
    if not _already_there(fs, prefix, n, per_shard):
        with ThreadPoolExecutor(8) as puts:
            done = [puts.submit(fs.pipe, f"{prefix}/shard-{i:05d}.tar", tar) for i, tar in enumerate(tars())]
            for f in done:
                f.result()
    return f"s3://{prefix}/"


def _generated_shard(job: tuple[int, int, int]) -> bytes:
    start, end, seed = job
    return shard_tar(make_jpegs(end - start, seed=seed), first=start)


def _already_there(fs, prefix: str, n: int, per_shard: int) -> bool:
    """An input made by an earlier run against the same server: every shard is in place."""
    return fs.exists(prefix) and len(fs.find(prefix)) == -(-n // per_shard)


def shard_tar(jpegs: list[bytes], first: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, data in enumerate(jpegs, start=first):
            info = tarfile.TarInfo(f"img{i:07d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def output_files(fs, prefix: str) -> tuple[int, float]:
    fs.invalidate_cache()
    files = [p for p in fs.find(prefix) if p.endswith(".parquet") and "/errors/" not in p]
    sizes = [fs.info(p)["size"] for p in files]
    return len(files), round(sum(sizes) / max(1, len(sizes)) / 1e6, 3)


# --- (a) the engine alone --------------------------------------------------------------------------

def bench_engine(ckpt, precision: str, threads: int, batch: int, seconds: float = 10.0, device: str = "cpu") -> Result:
    """The ceiling: the engine alone at its best call size (the sizes vitpipe's actors try). On a GPU
    each call includes the copy of the uint8 batch to the device and of the results back, as in
    the pipeline; nothing else (no decode, no Ray)."""
    from pipeline.engines.torch_engine import TorchEngine

    S = ckpt.preprocess.image_size
    x = np.random.default_rng(0).integers(0, 255, (batch, S, S, 3), dtype=np.uint8)  # (B, S, S, 3)
    sizes = sorted({max(1, batch // 4), max(1, batch // 2), batch})
    rates: dict[int, float] = {}
    with Monitor() as mon:
        engine = TorchEngine(ckpt, precision, device, threads)
        for size in sizes:
            engine.run(x[:size])  # a new shape's one-off costs
            t0, n = time.time(), 0
            while time.time() - t0 < seconds / len(sizes):
                engine.run(x[:size])
                n += size
            rates[size] = n / (time.time() - t0)
    best = max(rates, key=lambda s: rates[s])
    per_size = ", ".join(f"{s}: {r:.1f}" for s, r in rates.items())
    n = round(rates[best] * seconds / len(sizes))
    where = f"{threads} threads" if device == "cpu" else f"torch {device}"
    return Result("a engine", ckpt.source.removeprefix("random:"), precision, n, round(seconds / len(sizes), 2),
                  round(rates[best], 2), mon.peak / 1e6, round(mon.cpu, 2), None,
                  note=f"{where}, best call size {best} (images/s by size {per_size})",
                  cpu_s_by_role=mon.cpu_by_role(), gpu_util=mon.gpu)


# --- (b) vitpipe ------------------------------------------------------------------------------------

def bench_vitpipe(fs, src: str, arch: str, precision: str, batch: int | None, tag: str, device: str = "cpu",
                  overrides: tuple[str, ...] = ()) -> Result:
    from pipeline.config import JobSpec, apply_override
    from pipeline.runner import run_job

    out = f"s3://{BUCKET}/out/vitpipe-{tag}"
    data = {
        "name": f"bench-{tag}", "source": {"uri": src},
        "model": {"checkpoint": None, "arch": arch},
        # Random weights: 1000 near-uniform logits make top-1 agreement meaningless, so the gate checks
        # the embedding cosine only here (its figures are still reported); real checkpoints keep 0.99.
        "engine": {"precision": precision, "batch_size": batch, "device": device, "backend": "torch",
                   "gate": {"min_top1": 0.0}},
        "outputs": {"top_k": 5}, "output": {"uri": out, "mode": "full"}, "ray": {"progress": False},
    }
    for item in overrides:
        apply_override(data, item)
    spec = JobSpec.model_validate(data)
    with Monitor() as mon:
        report = run_job(spec)
    files, mb = output_files(fs, out.removeprefix("s3://"))
    gate = report.gate or {}
    gate_note = f", gate cosine {gate['cosine_mean']} top-1 {gate['top1_agreement']}" if gate else ""
    where = (f"{report.actors} actor(s) x {report.threads_per_actor} threads" if device == "cpu" else
             f"{report.actors} GPU actor(s), {report.decode_actors} decode actors")
    return Result("b vitpipe", arch, precision, report.records_read, round(mon.seconds, 2),
                  round(report.records_read / mon.seconds, 2), mon.peak / 1e6, round(mon.cpu, 2),
                  report.time_to_first_row_s, files, mb,
                  note=f"{where}, {report.error_rows} errors, {report.engine}" + gate_note + _nodes_note(mon)
                       + "".join(f", {o}" for o in overrides),
                  cpu_s_by_role=mon.cpu_by_role(), gpu_util=mon.gpu)


def _nodes_note(mon: Monitor) -> str:
    shares = mon.node_shares()
    if len(shares) < 2:
        return ""
    total = sum(shares) or 1.0
    return ", CPU-s by node " + " / ".join(f"{s} ({s / total:.0%})" for s in shares)


# --- (c) the plain Ray Data recipe --------------------------------------------------------------------

class RecipeModel:
    """As in Ray's batch-inference docs: load the model in __init__, run it in __call__."""

    def __init__(self, arch: str, precision: str, use_engine: bool, device: str = "cpu"):
        import torch

        from pipeline.model.checkpoints import random_checkpoint

        self.ckpt = random_checkpoint(arch)
        self.use_engine = use_engine
        self.device = device
        if use_engine:
            from pipeline.engines.torch_engine import TorchEngine

            self.engine = TorchEngine(self.ckpt, precision, device, threads=torch.get_num_threads())
        else:
            self.dtype = DTYPES[precision]
            self.model = self.ckpt.build().to(device, self.dtype).eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        if self.use_engine:
            emb, logits = self.engine.run(batch["image"])
        else:
            with torch.inference_mode():
                x = torch.from_numpy(batch["image"]).to(self.device, self.dtype)  # (B, 3, S, S) float32 from decode
                emb, logits = (t.float().cpu().numpy() for t in self.model(x))
        top = np.argsort(-logits, axis=1)[:, :5]
        return {"key": batch["__key__"], "embedding": emb, "topk_ids": top}


def recipe_decode(batch: dict, size: int = 224, uint8: bool = False) -> dict:
    """torchvision-style Resize(256) + CenterCrop(224) + ToTensor + Normalize, in PIL + numpy."""
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    out = []
    for data in batch["jpg"]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        s = 256 / min(w, h)
        img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        a = np.asarray(img.crop((left, top, left + size, top + size)))
        out.append(a if uint8 else (a.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std)
    return {"__key__": batch["__key__"], "image": np.stack(out)}


def bench_recipe(fs, src: str, arch: str, precision: str, batch: int, tag: str, use_engine: bool,
                 device: str = "cpu") -> Result:
    import pyarrow.fs as pafs
    import ray

    out = f"{BUCKET}/out/recipe-{tag}"
    if fs.exists(out):
        fs.rm(out, recursive=True)
    with Monitor() as mon:
        first = FirstFile(fs, out)
        ds = ray.data.read_webdataset(src, decoder=None)  # raw bytes; decoded with PIL below
        ds = ds.map_batches(recipe_decode, batch_size=batch, fn_kwargs={"uint8": use_engine})
        ds = ds.map_batches(RecipeModel, batch_size=batch, fn_constructor_kwargs={
            "arch": arch, "precision": precision, "use_engine": use_engine, "device": device},
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, num_gpus=1 if device == "cuda" else None)
        ds.write_parquet(out, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))  # the same s3fs client
        first_s = first.stop()
    files, mb = output_files(fs, out)
    n = sum(pq_rows(fs, p) for p in fs.find(out) if p.endswith(".parquet"))
    what = "our engine, uint8" if use_engine else "plain torch model, float32 transport"
    actor = "1 actor x 1 CPU" if device == "cpu" else "1 actor x 1 CPU + 1 GPU"
    return Result("c2 recipe+engine" if use_engine else "c ray recipe", arch, precision, n, round(mon.seconds, 2), round(n / mon.seconds, 2),
                  mon.peak / 1e6, round(mon.cpu, 2), first_s, files, mb, note=f"{what}, {actor}",
                  cpu_s_by_role=mon.cpu_by_role(), gpu_util=mon.gpu)


def pq_rows(fs, path: str) -> int:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


# --- (d) a hand-written DataLoader script -------------------------------------------------------------

class TarImages(torch.utils.data.IterableDataset):
    """An IterableDataset over tar shards, split across workers, as a user would write it."""

    def __init__(self, shards: list[str]):
        super().__init__()
        self.shards = shards

    def __iter__(self):
        import fsspec

        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        for uri in mine:
            with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    if m.isfile():
                        data = tar.extractfile(m).read()
                        yield m.name, recipe_decode({"jpg": [data], "__key__": [m.name]})["image"][0]


def bench_dataloader(fs, src: str, ckpt, precision: str, batch: int, tag: str, device: str = "cpu") -> Result:
    """As a user would write it: workers decode (one per CPU less two, at least 2), the main
    process runs the model (on 2 threads on CPU, else on the GPU with pinned batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    shards = ["s3://" + p for p in sorted(fs.find(src.removeprefix("s3://"))) if p.endswith(".tar")]
    out = f"{BUCKET}/out/loader-{tag}"
    workers = max(2, (os.cpu_count() or 1) - 2)
    with Monitor() as mon:
        t0 = time.time()
        loader = torch.utils.data.DataLoader(TarImages(shards), batch_size=batch, num_workers=workers,
                                             persistent_workers=False, pin_memory=device == "cuda")
        torch.set_num_threads(2)
        model = ckpt.build().to(device, DTYPES[precision]).eval()
        keys, embs, first = [], [], None
        with torch.inference_mode():
            for names, x in loader:
                emb, _ = model(x.to(device, DTYPES[precision], non_blocking=True))
                keys += list(names)
                embs.append(emb.float().cpu().numpy())
                first = first or time.time() - t0
        emb = np.concatenate(embs)
        table = pa.table({"key": keys, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)),
                                                                                       emb.shape[1])})
        with fs.open(f"{out}/part-0.parquet", "wb") as f:
            pq.write_table(table, f, compression="zstd")
    files, mb = output_files(fs, out)
    return Result("d dataloader", ckpt.source.removeprefix("random:"), precision, len(keys), round(mon.seconds, 2),
                  round(len(keys) / mon.seconds, 2), mon.peak / 1e6, round(mon.cpu, 2), round(first, 2), files, mb,
                  note=f"{workers} workers, model " + ("on 2 threads" if device == "cpu" else f"on {device}")
                       + " in the main process", cpu_s_by_role=mon.cpu_by_role(), gpu_util=mon.gpu)


# --- the run ----------------------------------------------------------------------------------------

def after_first_row(r: Result) -> str:
    """Throughput once output flows: start-up (worker processes, imports, CUDA, the gate) left
    out, which on a GPU is most of a short run's wall time."""
    if not r.first_row_s or r.seconds <= r.first_row_s:
        return ""
    return f"{r.images / (r.seconds - r.first_row_s):.1f}"


def markdown(results: list[Result], meta: dict) -> str:
    gpu = any(r.gpu_util is not None for r in results)
    lines = [f"# vitpipe benchmark: {meta['when']}", "",
             f"Machine: {meta['machine']}; images: {meta['images']} JPEGs, 200-2,000 px, in tar shards on "
             "SeaweedFS S3 (loopback); vitpipe engine call size {batch}, recipe and "
             "DataLoader batch {user_batch}; Ray: {ray}.".format(
                 batch=meta.get("vitpipe_batch") or "default (32 CPU, 256 GPU)", user_batch=meta.get("user_batch", meta["batch"]), ray="local" if meta.get("nodes", 1) <= 1
                 else f"ray.cluster_utils.Cluster, {meta['nodes']} nodes splitting the CPUs"), "",
             "| approach | model | precision | images | s | images/s | vs engine (b/a) | vitpipe / this | "
             "peak RSS MB | CPU util | " + ("GPU util | " if gpu else "") + "first row s | images/s after it | "
             "files | MB/file | note |",
             "|---" * (16 if gpu else 15) + "|"]
    for r in results:
        a = next((x for x in results if x.approach == "a engine" and (x.model, x.precision) == (r.model, r.precision)),
                 None)
        b = next((x for x in results if x.approach == "b vitpipe" and (x.model, x.precision) == (r.model, r.precision)),
                 None)
        ratio_a = f"{r.images_per_s / a.images_per_s:.2f}" if a else ""
        ratio_b = f"{b.images_per_s / r.images_per_s:.2f}" if b and r.approach != "b vitpipe" else ""
        lines.append(f"| {r.approach} | {r.model} | {r.precision} | {r.images} | {r.seconds} | {r.images_per_s} | "
                     f"{ratio_a} | {ratio_b} | {r.peak_rss_mb:.0f} | {r.cpu_util} | "
                     + (f"{'' if r.gpu_util is None else r.gpu_util} | " if gpu else "") + f"{r.first_row_s or ''} | "
                     f"{after_first_row(r)} | "
                     f"{r.files or ''} | {r.file_mb or ''} | {r.note} |")
    lines += ["", "Where the CPU time went (CPU-seconds by process role, over the row's wall time x "
              f"{os.cpu_count()} CPUs):", ""]
    for r in results:
        if r.cpu_s_by_role and r.approach != "a engine":  # (a) is the engine alone, in this process
            top = sorted(r.cpu_s_by_role.items(), key=lambda kv: -kv[1])[:8]
            lines.append(f"- {r.approach} {r.precision}: " + ", ".join(f"{k} {v}" for k, v in top)
                         + f" (of {r.seconds * (os.cpu_count() or 1):.0f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="2000",
                   help="how many images; a comma-separated list gives each model of --models its own count, so "
                        "one run covers ViT-Ti at 2,000 and ViT-B at 320 on a small machine [2000]")
    p.add_argument("--models", default="vit_ti_16", help="comma-separated archs [vit_ti_16]")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated [fp32,bf16]")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where every approach runs its model: auto = cuda when torch sees a GPU [auto]")
    p.add_argument("--batch", type=int, default=None,
                   help="vitpipe's engine.batch_size (images per engine call) [vitpipe's default: 32 on CPU, 256 "
                        "on a GPU]; (a) times 1/4, 1/2 and all of it (of 64 / 256 when not given) and reports the best")
    p.add_argument("--user-batch", type=int, default=None,
                   help="the batch size of the recipe and the DataLoader script, as their authors would pick "
                        "[32 on CPU, 128 on a GPU]")
    p.add_argument("--only", default="a,b,c,d", help="which approaches to run [a,b,c,d]")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and Markdown go")
    p.add_argument("--name", default="bench", help="file name stem of the results")
    p.add_argument("--engine-seconds", type=float, default=10.0, help="how long (a) runs [10]")
    p.add_argument("--nodes", type=int, default=1,
                   help="1: a local Ray; N > 1: a ray.cluster_utils.Cluster of N nodes splitting this machine's "
                        "CPUs (vitpipe's table row then says how CPU time divided between the nodes) [1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a job-spec override for vitpipe's run (b), as `vitpipe run --set`; repeatable")
    p.add_argument("--s3", choices=["local", "env"], default="local",
                   help="local: start SeaweedFS on 127.0.0.1 [default]; env: use the S3 that AWS_ENDPOINT_URL names")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    vitpipe_batch = args.vitpipe_batch = args.batch  # None: vitpipe's own default
    args.batch = args.batch or (256 if gpu else 64)
    args.user_batch = args.user_batch or (128 if gpu else 32)

    import ray
    import s3fs

    from pipeline.model.checkpoints import random_checkpoint
    from pipeline.s3local import environ, start_seaweedfs

    only = set(args.only.split(","))
    models = args.models.split(",")
    counts = images_per_model(args.images, models)
    args.images = ", ".join(f"{counts[m]} ({m})" for m in models) if len(set(counts.values())) > 1 else \
        str(counts[models[0]])
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-") as tmp:
        server = start_seaweedfs(Path(tmp) / "s3") if args.s3 == "local" else None
        try:
            with environ(server.env if server else {}):
                fs = s3fs.S3FileSystem(skip_instance_cache=True)
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                inputs = {}
                for n in sorted(set(counts.values())):
                    t = time.time()
                    inputs[n] = generate_input(fs, n)
                    print(f"input: {n} JPEGs in {inputs[n]} ({time.time() - t:.0f} s to make)", flush=True)
                cluster = start_ray(args.nodes)
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False
                for arch in models:
                    ckpt, src = random_checkpoint(arch), inputs[counts[arch]]
                    for prec in args.precisions.split(","):
                        tag = f"{arch}-{prec}"
                        dev = args.device
                        steps = [("a", bench_engine, (ckpt, prec, os.cpu_count() or 1, args.batch, args.engine_seconds,
                                                      dev)),
                                 ("b", bench_vitpipe, (fs, src, arch, prec, vitpipe_batch, tag, dev, tuple(args.set))),
                                 ("c", bench_recipe, (fs, src, arch, prec, args.user_batch, tag, False, dev)),
                                 ("c", bench_recipe, (fs, src, arch, prec, args.user_batch, tag + "-eng", True, dev)),
                                 ("d", bench_dataloader, (fs, src, ckpt, prec, args.user_batch, tag, dev))]
                        first = None
                        for key, fn, fn_args in steps:
                            if key in only:
                                r = fn(*fn_args)
                                first = first or (r if key == "a" else None)
                                results.append(r)
                                print(json.dumps(asdict(r)), flush=True)
                                write_results(args, results)  # a later failure keeps what was measured
                        if first and len(only) > 1:
                            # The engine again after the others: this shared host's speed drifts by up to
                            # 25% over minutes, so (a) is the mean of before and after.
                            again = bench_engine(*steps[0][2])
                            before, after = first.images_per_s, again.images_per_s
                            first.images += again.images
                            first.seconds = round(first.seconds + again.seconds, 2)
                            first.images_per_s = round(first.images / first.seconds, 2)
                            first.note += f"; {before} before, {after} after the others (mean shown)"
                            write_results(args, results)
                ray.shutdown()
                if cluster:
                    cluster.shutdown()
        finally:
            if server:
                server.stop()
    print(write_results(args, results))
    return 0


def images_per_model(images: str, models: list[str]) -> dict[str, int]:
    """--images "2000" (every model) or "2000,640,320" (one count per model, in order)."""
    counts = [int(x) for x in images.split(",")]
    if len(counts) == 1:
        counts *= len(models)
    if len(counts) != len(models) or min(counts) < 1:
        raise SystemExit(f"--images {images!r}: give one count, or one per model of --models ({len(models)})")
    return dict(zip(models, counts, strict=True))


def start_ray(nodes: int):
    """A local Ray, or a Cluster of `nodes` nodes that split this machine's CPUs; returns the Cluster."""
    import ray

    if nodes <= 1:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        _warm_ray_data()
        return None
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    _warm_ray_data()
    return cluster


def _warm_ray_data() -> None:
    """Ray Data starts its own helper actors (stats, autoscaling coordinator, location tracker)
    once per cluster, on the first dataset: ~3 CPU-seconds that would otherwise be charged to
    whichever approach happens to run first. Like ray.init itself, that is cluster set-up."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(4).map_batches(lambda b: b).materialize()


def write_results(args: argparse.Namespace, results: list[Result]) -> str:
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": args.images, "batch": args.batch,
            "vitpipe_batch": getattr(args, "vitpipe_batch", None),
            "user_batch": args.user_batch,
            "nodes": args.nodes,
            "device": args.device,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or 'cpu'}"
                       + (f", GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}" if args.device == "cuda"
                          else "")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    table = markdown(results, meta)
    (out / f"{args.name}.md").write_text(table)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
