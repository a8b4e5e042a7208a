"""JobSpec -> Ray Data plan -> Parquet output -> RunReport. The one place that knows Ray.

Order matters: everything that can fail without a cluster (spec, checkpoint,
listing, output refusal) fails first, with nothing started and nothing written.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
from tqdm import tqdm

from pipeline.config import JobSpec
from pipeline.decode import Decoder, Preprocess
from pipeline.engines.base import resolve_backend
from pipeline.engines.gate import GateError, GateResult
from pipeline.engines.quantize import QUANTIZED
from pipeline.model.checkpoints import Checkpoint
from pipeline.predict import (
    Predictor,
    calibration_images,
    check_engine,
    load_model,
    needs_gate,
    output_schema,
    pop_checks,
)
from pipeline.sink import ParquetSink, versions
from pipeline.sources import Shard, ShardReader, list_shards


@dataclass(frozen=True)
class Plan:
    """How many model actors and what each reserves, from the cluster's shape."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    read_cpus: float
    decoders: int = 0  # decode actors of 1 CPU; 0: decoding runs inside the model actors
    readers: int = 1  # read actors (each reads one shard at a time)

    def read_actors(self, shards: int) -> int:
        return min(self.readers, shards)

    def buffer_mb(self, per_actor: int) -> int:
        """Object-store memory the run may hold in flight: per model actor and, where decode actors
        feed a GPU, for every four of them too (each holds decoded pixels, 9.6 MB per 64 images)."""
        return int((self.actors + self.decoders / 4) * per_actor)


def plan_resources(spec: JobSpec, nodes: list[dict]) -> Plan:
    """Size the actor pool from the alive nodes' resources, not from constants.

    CPU-only: one actor per node, reserving the node's CPUs less one read actor's
    share, with as many torch threads as that rounds up to (the readers mostly
    wait on I/O); each actor decodes its own batches on those threads. With GPUs:
    one actor per GPU, and every CPU that the model and read actors leave goes to
    decode actors, since decoding, not the GPU, is then the work. `resources.actors`,
    `decode_actors` and an explicit `cpus_per_actor` override this.
    """
    r = spec.resources
    cpus = [n.get("CPU", 0.0) for n in nodes]
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    read = r.read_cpus
    if r.gpus_per_actor > 0 or (gpus and spec.engine.device != "cpu"):
        per_gpu = r.gpus_per_actor or 1.0
        actors = r.actors or max(1, int(gpus // per_gpu))
        # one read actor per 3 decoders: on the first GPU run, 2 readers for 14 decoders kept the
        # decoders ~45% busy (a reader spends ~1 ms of CPU per image, a decoder ~6)
        def readers_for(d: int) -> int:
            return r.readers or max(2 * actors, math.ceil(d / 3))

        free = sum(cpus) - actors * r.cpus_per_actor
        decoders = int(free) if r.decode_actors is None else r.decode_actors
        while r.decode_actors is None and decoders > 1 and decoders + readers_for(decoders) * read > free:
            decoders -= 1  # every actor must fit at once, or one waits for CPUs that never come
        readers = readers_for(decoders)
        return Plan(actors, r.cpus_per_actor, per_gpu, max(1, math.ceil(r.cpus_per_actor)), read, decoders,
                    readers)
    decoders = r.decode_actors or 0  # asked for on CPUs only: they take their CPUs off the model actors
    if "cpus_per_actor" in r.model_fields_set:
        per = r.cpus_per_actor
        actors = r.actors or max(1, int((sum(cpus) - read - decoders) // per))
    else:
        share = decoders / max(1, sum(1 for c in cpus if c))
        usable = [c - read - share for c in cpus if c - read - share >= 0.5]
        if not usable:
            raise RuntimeError(f"the cluster has too few CPUs ({sum(cpus)}) for a model actor and a read actor")
        per = min(usable)
        actors = r.actors or len(usable)
    return Plan(actors, per, 0.0, max(1, math.ceil(per)), read, decoders, r.readers or 2 * actors)


@dataclass
class RunReport:
    run_id: str
    job: str
    output_uri: str
    mode: str
    records_read: int
    ok_rows: int
    error_rows: int
    errors_by_type: dict[str, int]
    skipped_members: dict[str, int]
    duplicates_dropped: int
    shards: int
    shards_processed: int
    shards_resumed: int
    shards_unchanged: int
    wall_s: float
    images_per_s: float
    time_to_first_row_s: float | None
    model_id: str
    model_source: str
    engine: str
    engine_reason: str
    gate: dict | None
    actors: int
    threads_per_actor: int
    decode_actors: int
    embedding_dim: int
    labeled: int
    top1_accuracy: float | None

    def to_dict(self) -> dict:
        return dict(vars(self))

    def summary(self) -> str:
        lines = [
            f"run {self.run_id} ({self.job}) -> {self.output_uri}",
            f"  records read   {self.records_read}  = ok {self.ok_rows} + errors {self.error_rows}",
        ]
        for t, n in sorted(self.errors_by_type.items()):
            lines.append(f"    error {t}: {n}")
        for t, n in sorted(self.skipped_members.items()):
            lines.append(f"  skipped ({t}): {n}")
        lines += [
            f"  shards         {self.shards} listed: {self.shards_processed} processed, {self.shards_resumed} resumed "
            f"from an interrupted run, {self.shards_unchanged} unchanged (mode {self.mode})",
            f"  throughput     {self.images_per_s:.1f} images/s over {self.wall_s:.1f} s wall",
            f"  model          {self.model_source} (id {self.model_id[:12]}), embedding dim {self.embedding_dim}",
            f"  engine         {self.engine} x {self.actors} actor(s), {self.threads_per_actor} thread(s) each"
            f" ({self.engine_reason})",
        ]
        if self.decode_actors:
            lines.append(f"  decode         {self.decode_actors} decode actor(s) of 1 CPU feed the model actors")
        if self.gate:
            g = self.gate
            lines.append(f"  accuracy gate  cosine {g['cosine_mean']:.5f} (min {g['cosine_min']:.5f}), "
                         f"top-1 agreement {g['top1_agreement']} on {g['samples']} images vs torch fp32")
        if self.top1_accuracy is not None:
            lines.append(f"  top-1 accuracy {self.top1_accuracy:.4f} on {self.labeled} labeled images")
        return "\n".join(lines)


def init_ray(spec: JobSpec) -> None:
    """A local Ray bound to loopback with no dashboard, unless an address is given."""
    if ray.is_initialized():
        return
    if spec.ray.address:
        ray.init(address=spec.ray.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # address="local": always a new local Ray, never silently joining one started by `ray start`.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def gate_placement(spec: JobSpec, plan: Plan) -> tuple[str, str | None]:
    """Where the engine's accuracy gate runs (engine.gate.placement), and the backend the actors are
    told to use (None: what the check resolves, or each GPU actor's own resolution of `auto`).

    auto: a torch engine has nothing to build or cache, so its check need not hold the actors
    back. On CPUs it runs in a driver thread while the actors start (bf16, 2,000 images: first
    model call 8.9 -> 6.4 s). On GPUs each model actor checks its own engine: as a task of its own
    the gate started a second GPU process first (worker, torch import, CUDA init, the model built
    twice), 8-10 s of the H200 run's 16.6 s to the first row. Engines with a build step (ONNX
    export, TensorRT, int8/fp8 calibration, torch.compile) are built, cached and checked first, so
    that the actors load them instead of each building them."""
    e = spec.engine
    gpu = plan.gpus_per_actor > 0
    # the driver cannot resolve `auto` for GPU actors (it may have no GPU, or another kind)
    backend = (None if e.backend == "auto" else e.backend) if gpu else resolve_backend(e.backend, e.precision, "cpu")[0]
    where = e.gate.placement
    if where == "auto":
        where = ("actors" if gpu else "driver") if backend == "torch" and not e.compile else "first"
    if where == "driver" and gpu:
        raise ValueError("engine.gate.placement: driver runs the engine in the driver process, which has no GPU "
                         "reserved for it; use actors (each GPU actor checks its own engine) or first")
    return where, backend


def start_engine_check(spec: JobSpec, ckpt: Checkpoint, shards: list[Shard], plan: Plan, where: str = "first",
                       backend: str | None = None) -> tuple[dict | ray.ObjectRef | Future | None, np.ndarray | None,
                                                            np.ndarray | None]:
    """Start building (and caching) the engine and its accuracy gate where gate_placement says;
    returns (the check, the calibration batch, the gate's images for the actors).

    The check is a dict when done, an object ref (first: a task with the model actors' resources)
    or a future (driver: a thread of this process) to pass to finish_engine_check, or None
    (actors: each actor's figures arrive with its first rows, see Predictor). For int8/fp8 the
    calibration batch is the first engine.calibration_samples images of the job; the gate uses
    the engine.gate.samples after them."""
    e = spec.engine
    if not needs_gate(spec) and (where != "first" or e.backend == "torch"):
        return {"backend": backend or e.backend, "reason": "asked for in the job spec (fp32: the reference, "
                "no gate)", "cache": "", "gate": None}, None, None
    n_cal = e.calibration_samples if e.precision in QUANTIZED else 0
    images = calibration_images(spec, shards, ckpt.preprocess, n_cal + e.gate.samples)
    calibration, images = (images[:n_cal], images[n_cal:]) if n_cal else (None, images)
    if calibration is not None and len(images) == 0:  # a tiny job: gate on the calibration images
        images = calibration
    if where == "actors":
        return None, calibration, images
    if where == "driver":  # a thread of this process, which has torch and the model loaded
        pool = ThreadPoolExecutor(1, thread_name_prefix="gate")
        future = pool.submit(check_engine, spec.model_dump(), images, plan.threads, calibration, backend, ckpt)
        pool.shutdown(wait=False)
        return future, calibration, None
    task = ray.remote(check_engine).options(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None)
    return task.remote(spec.model_dump(), images, plan.threads, calibration, backend), calibration, None


def finish_engine_check(check: dict | ray.ObjectRef | Future, calibration: np.ndarray | None) -> dict:
    """Wait for the check; raises GateError (naming the figures) when the engine missed the gate."""
    if isinstance(check, Future):
        check = check.result()
    result = ray.get(check) if isinstance(check, ray.ObjectRef) else check
    if calibration is not None:
        result["calibration_images"] = len(calibration)
    gate = result["gate"]
    if gate is not None:
        g = GateResult(**gate)
        print(g.describe(), file=sys.stderr)
        if not g.passed:
            raise g.refusal("the job did not start")
    return result


def prepare_engine(spec: JobSpec, ckpt: Checkpoint, shards: list[Shard], plan: Plan) -> tuple[dict, np.ndarray | None]:
    """Build, cache and gate the engine before any bulk work. Raises GateError on a miss."""
    check, calibration, _ = start_engine_check(spec, ckpt, shards, plan)
    return finish_engine_check(check, calibration), calibration


def build_dataset(spec: JobSpec, shards: list[Shard], plan: Plan, backend: str | None, preprocess: Preprocess,
                  calibration: np.ndarray | None = None, gate_images: np.ndarray | None = None) -> ray.data.Dataset:
    items = [{"shard": json.dumps(s.to_dict())} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    readers = plan.read_actors(len(shards))
    ds = ds.map_batches(ShardReader, batch_size=1, batch_format="numpy", num_cpus=plan.read_cpus,
                        fn_constructor_kwargs={"source": spec.source.model_dump()},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=readers, initial_size=1))
    if plan.decoders:  # GPU clusters: decoding on its own CPU actors, one block of records per call
        ds = ds.map_batches(Decoder, batch_size=None, batch_format="pyarrow", num_cpus=1,
                            fn_constructor_kwargs={"preprocess": preprocess.to_dict()},
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.decoders,
                                                               initial_size=plan.decoders))
    return ds.map_batches(
        Predictor, batch_size=spec.engine.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"job": spec.model_dump(), "threads": plan.threads, "backend": backend,
                               "calibration": None if calibration is None else ray.put(calibration),
                               "gate_images": None if gate_images is None else ray.put(gate_images)},
        # min 1, not a fixed size: when a node dies and its actor cannot be placed again, the run goes on
        # with the actors that remain instead of waiting for the lost capacity forever.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(plan.actors, len(shards)),
                                           initial_size=min(plan.actors, len(shards))),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
    )


def check_uris(spec: JobSpec) -> None:
    """memory:// lives in one process; Ray workers would see an empty filesystem."""
    sources = spec.source.uri if isinstance(spec.source.uri, list) else [spec.source.uri]
    for name, uri in [("source.uri", u) for u in sources] + [("output.uri", spec.output.uri)]:
        if uri.startswith("memory://"):
            raise ValueError(f"{name} {uri!r}: memory:// is private to one process and Ray workers cannot see it; "
                             "use a local folder (file://) or object storage (s3://)")


def compile_job(spec: JobSpec) -> dict:
    """`vitpipe compile`: build and cache the job's engine where its actors would run, and gate it."""
    check_uris(spec)
    ckpt = load_model(spec)
    shards = list_shards(spec.source)
    init_ray(spec)
    plan = plan_resources(spec, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    result, _ = prepare_engine(spec, ckpt, shards, plan)
    return result | {"model_id": ckpt.model_id, "model_source": ckpt.source}


def run_job(spec: JobSpec, ckpt: Checkpoint | None = None) -> RunReport:
    """Run one job to a committed output; raises before any Ray work on a bad spec, source or output."""
    t0 = time.time()
    check_uris(spec)
    ckpt = ckpt or load_model(spec)
    shards = list_shards(spec.source)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    model_id = ckpt.model_id
    schema = output_schema(ckpt.config.dim, spec.outputs)
    meta = {"run_id": run_id, "model_id": model_id, "model_source": ckpt.source,
            "job": spec.model_dump_json(), "engine": f"{spec.engine.backend}-{spec.engine.precision}"}
    sink = ParquetSink(spec.output, run_id, schema, meta, model_id)
    work = sink.begin(shards)  # refuses a finished output in mode error; takes the lease
    try:
        engine_check, plan, first_row_s = _process(spec, ckpt, work.todo, sink, t0, shards)
        wall = time.time() - t0
        c = sink.counts
        device = "cuda" if plan and plan.gpus_per_actor else "cpu"
        report = RunReport(
            run_id=run_id, job=spec.name, output_uri=spec.output.uri, mode=spec.output.mode,
            records_read=c.records, ok_rows=c.ok, error_rows=c.error_rows, errors_by_type=dict(c.errors),
            skipped_members=dict(c.skipped), duplicates_dropped=c.duplicates_dropped, shards=len(shards),
            shards_processed=len(work.todo), shards_resumed=len(work.adopted), shards_unchanged=len(work.kept),
            wall_s=round(wall, 3), images_per_s=round(c.records / wall, 2) if wall else 0.0,
            time_to_first_row_s=None if first_row_s is None else round(first_row_s, 3), model_id=model_id,
            model_source=ckpt.source, engine=f"{engine_check['backend']}-{device}-{spec.engine.precision}",
            engine_reason=engine_check["reason"], gate=engine_check["gate"], actors=plan.actors if plan else 0,
            threads_per_actor=plan.threads if plan else 0, decode_actors=plan.decoders if plan else 0,
            embedding_dim=ckpt.config.dim, labeled=c.labeled,
            top1_accuracy=round(c.correct / c.labeled, 4) if c.labeled else None,
        )
        sink.commit({
            "format": "vitpipe-output/1", "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "job": spec.model_dump(mode="json"),
            "model": {"id": model_id, "source": ckpt.source, "config": ckpt.config.to_dict(),
                      "preprocess": ckpt.preprocess.to_dict(), "labels": ckpt.labels},
            "engine": report.engine, "engine_check": engine_check, "versions": versions(),
            "counts": {"records": c.records, "ok": c.ok, "errors": c.error_rows, "skipped": sum(c.skipped.values())},
            "report": report.to_dict(),
        })
    except BaseException as e:
        sink.abort(e)
        raise
    return report


def _process(spec: JobSpec, ckpt: Checkpoint, todo: list[Shard], sink: ParquetSink,
             t0: float, listed: list[Shard]) -> tuple[dict, Plan | None, float | None]:
    """Stream the shards to do through Ray into the sink; returns (engine check, plan, first-row time).

    The gate's and the int8/fp8 calibration's images come from the first *listed* shards, not the
    first shards to do: a nightly incremental run does only the new shards, and calibrating on them
    changed the calibration batch, so the cached int8 graph (or TensorRT plan, minutes to build)
    missed every night; `vitpipe compile` lists all shards too, so its build is the one runs find."""
    if not todo:
        return {"backend": spec.engine.backend, "reason": "no shard needed processing", "cache": "",
                "gate": None}, None, None
    init_ray(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of our own, below
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = spec.ray.stall_timeout_s  # bounded: a stuck stage fails the run
    # a stage's own exception, not Ray Data's UserCodeException around it: a model actor's GateError
    # then reaches this driver as one (below), with its figures
    ctx.raise_original_map_exception = True
    plan = plan_resources(spec, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    # Without a cap, Ray Data lets reads run ahead into half the object store: at 20,000 images the
    # benchmark's peak memory was 45% above the 2,000-image run; with it, memory stays flat.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=plan.buffer_mb(spec.resources.buffer_mb_per_actor) * 2**20)
    where, backend = gate_placement(spec, plan)
    check, calibration, gate_images = start_engine_check(spec, ckpt, listed, plan, where,
                                                         None if where == "first" else backend)
    # first: finished here, before the dataset starts; driver and actors: below, before the first row
    engine_check = finish_engine_check(check, calibration) if where == "first" or isinstance(check, dict) else None
    ds = build_dataset(spec, todo, plan, engine_check["backend"] if where == "first" else backend, ckpt.preprocess,
                       calibration, gate_images)
    first_row_s = None
    bar = tqdm(desc=spec.name, unit="img", disable=not spec.ray.progress, file=sys.stderr, mininterval=1.0)
    try:
        # prefetch 0: a finished shard's rows reach the sink as soon as they exist; with Ray's default
        # (1) the driver held each block until the next one arrived, a shard late (first row 10-11 s
        # -> 8.2 s in the 2,000-image benchmark)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            table, checks = pop_checks(table)  # each actor's own check, ahead of its first rows
            for c in checks:
                result = finish_engine_check(c, calibration)
                engine_check = engine_check or result
            if engine_check is None:  # a gate miss raises here: no row was written, the run aborts
                if check is None:
                    raise RuntimeError("model stage: rows arrived from an actor that sent no engine check first "
                                       "(engine.gate.placement actors); this is a bug, please report it")
                engine_check = finish_engine_check(check, calibration)
            if first_row_s is None:
                first_row_s = time.time() - t0
            sink.write(table)
            c = sink.counts
            bar.update(c.records + sum(c.skipped.values()) - bar.n)
            bar.set_postfix(ok=c.ok, errors=c.error_rows, shards=f"{len(sink.done)}/{len(todo)}", refresh=False)
    except GateError as miss:  # an actor's check failed: its own message, without Ray's traceback and
        # the retry advice Ray Data appends to the message on lines of its own
        raise GateError(str(getattr(miss, "cause", miss)).split("\n", 1)[0]) from None
    finally:
        bar.close()
    if engine_check is None:
        engine_check = finish_engine_check(check, calibration) if check is not None else {
            "backend": backend or spec.engine.backend, "reason": "no batch reached a model actor", "cache": "",
            "gate": None}
    return engine_check, plan, first_row_s

