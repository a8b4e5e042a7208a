"""JobSpec -> Ray Data plan -> Parquet output -> RunReport. The one place that knows Ray Data.

The plan reads like Ray's batch-inference example, one stage per file:

    shards --read (sources.ShardReader)--> parts --[decode (decode.Decoder)]--> parts
           --predict + write (predict.Predictor, write.py)--> one small record per part
           --> the driver: ledger, lease, commit (sink.py)

Order matters: everything that can fail without a cluster (spec, checkpoint, listing,
output refusal) fails with nothing written. Ray starts meanwhile (it takes seconds and needs
none of that): in this thread, since Ray's processes die with the thread that started them,
while another thread loads the model, lists the shards and takes the output's lease. Where the
listing is still running when Ray is up, the dataset starts anyway and its input is a feed
that the listing thread fills (Early, feed.py): the model actors load their engine meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import pyarrow as pa
import ray

from pipeline import page
from pipeline.cluster import connect
from pipeline.config import JobSpec
from pipeline.plan import Plan, plan_resources
from pipeline.progress import Progress, plural
from pipeline.report import RunReport, full_speed_at, timeline_points
from pipeline.sink import ParquetSink, ShardPlan, versions
from pipeline.sources import Shard, ShardReader, list_shards

T = TypeVar("T")
# How long the listing side may still run, once Ray is up and the model loaded, before the model
# actors start without it (Early). A listing that ends within it starts them from the list: their
# number fits the shards (min of plan and shards), where an early start must start the plan's all.
EARLY_AFTER_S = 1.0

if TYPE_CHECKING:  # torch comes with these: imported where used, in the thread that loads the model
    import numpy as np
    from ray.actor import ActorHandle

    from pipeline.decode import Preprocess
    from pipeline.gate import RunCheck
    from pipeline.labels import LabelMap
    from pipeline.model.checkpoints import Checkpoint
    from pipeline.model.vit import ViTConfig


def init_ray(spec: JobSpec) -> None:
    """A local Ray on loopback without the services it has no use for, unless an address is given."""
    connect(spec.ray.address, spec.ray.verbose)


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each node alive in the connected Ray cluster now."""
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def plan_on_cluster(spec: JobSpec, model: ViTConfig) -> Plan:
    """The plan for the nodes alive in the connected Ray cluster now."""
    return plan_resources(spec, alive_nodes(), model)


def cluster_line(spec: JobSpec) -> str:
    """What the run got from Ray, for its start-up line: where, how many nodes, CPUs and GPUs."""
    nodes = alive_nodes()
    cpus, gpus = (sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU"))
    where = f"joined {spec.ray.address}" if spec.ray.address else "local"
    return f"Ray ready: {where}, {plural(len(nodes), 'node')}, {cpus:g} CPUs, {gpus:g} GPUs"


def new_run_id() -> str:
    """A run's id: when it started (sortable) and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def build_dataset(spec: JobSpec, shards: list[Shard] | ActorHandle, plan: Plan, backend: str | None,
                  preprocess: Preprocess, writer: dict, calibration: np.ndarray | None = None,
                  gate_images: np.ndarray | None = None, labels: dict[str, int] | None = None) -> ray.data.Dataset:
    """read -> [decode] -> predict + write, one part per row from the readers on. `shards` is the
    list, or a feed.ShardFeed that will hold it (and the label map) once the listing ends."""
    from pipeline.decode import Decoder
    from pipeline.predict import Predictor

    ds = read_stage(spec, shards, plan, labels)
    if plan.decoders:  # GPU clusters decoding on the CPU: their own actors, a part per call
        ds = ds.map_batches(Decoder, batch_size=1, batch_format="pyarrow", num_cpus=1,
                            fn_constructor_kwargs={"preprocess": preprocess.to_dict()},
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.decoders,
                                                               initial_size=plan.decoders))
    return model_stage(ds, Predictor, {
        "job": spec.model_dump(), "threads": plan.threads, "call_size": plan.call_size, "decode": plan.decode,
        "writer": writer, "backend": backend, "calibration": None if calibration is None else ray.put(calibration),
        "gate_images": None if gate_images is None else ray.put(gate_images)}, plan, _count(shards))


def _count(shards: list[Shard] | ActorHandle) -> int | None:
    """How many shards, where known (a feed's are not, when the actors start)."""
    return len(shards) if isinstance(shards, list) else None


def model_stage(ds: ray.data.Dataset, actor: type, kwargs: dict, plan: Plan, n_shards: int | None) -> ray.data.Dataset:
    """The model actors' stage, a part per call: predict.Predictor for `run`, analyze.Analyzer for
    `analyze`. min 1, not a fixed size: when a node dies and its actor cannot be placed again, the
    run goes on with the actors that remain instead of waiting for the lost capacity forever. Two
    parts in flight per actor (one running, the next one ready): a part is a large unit, and Ray's
    default of four let the first actor to start take the first parts of a short job alone."""
    actors = plan.actors if n_shards is None else min(plan.actors, n_shards)
    return ds.map_batches(actor, batch_size=1, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors,
                                                             max_tasks_in_flight_per_actor=2),
                          num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None)


def prepare_beside_ray(spec: JobSpec, prepare: Callable[[], T], progress: Progress) -> T:
    """Run `prepare` (load the model, list the shards, ...) in a thread while Ray starts in this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        prepared = pool.submit(prepare)
        start_ray_beside(spec, pool, progress)
    return prepared.result()


def start_ray_beside(spec: JobSpec, pool: ThreadPoolExecutor, progress: Progress,
                     undo: Callable[[], None] | None = None) -> None:
    """Start Ray in this thread while `pool`'s one thread does what needs no cluster (the model, the
    listing, the lease: submitted before): Ray takes seconds and needs none of it, and its processes
    die with the thread that started them. If Ray fails to start, `undo` gives back what was taken."""
    pool.submit(_import_ray_data)  # after the work submitted, in the same thread, still before Ray is up
    try:
        init_ray(spec)
    except BaseException:
        if undo:
            undo()
        raise
    progress.step(cluster_line(spec))


def _import_ray_data() -> None:
    """Ray Data's import takes ~1.8 CPU-s; done after Ray's start it delayed the first row by as much."""
    import ray.data  # noqa: F401


def read_stage(spec: JobSpec, shards: list[Shard] | ActorHandle, plan: Plan,
               labels: dict[str, int] | None) -> ray.data.Dataset:
    """Shards -> parts (one row each), by read actors; the first stage of `run` and `analyze` alike."""
    from pipeline.feed import read_feed

    if isinstance(shards, list):
        ds = ray.data.from_items([{"shard": json.dumps(s.to_dict())} for s in shards], override_num_blocks=len(shards))
        readers, feed = plan.read_actors(len(shards)), None
    else:  # a feed: the shards, and the label map, arrive after the actors start
        ds, readers, feed = read_feed(shards), plan.readers, shards
    return ds.map_batches(ShardReader, batch_size=1, batch_format="numpy", num_cpus=plan.read_cpus,
                          fn_constructor_kwargs={"source": spec.source.model_dump(), "labels": labels, "feed": feed},
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=readers, initial_size=readers))


def configure_data(spec: JobSpec, plan: Plan) -> None:
    """Ray Data's settings for a vitpipe dataset: our own progress bar, a bounded stall, a stage's own
    exceptions, and memory in flight capped by the plan."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of our own
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = spec.ray.stall_timeout_s  # bounded: a stuck stage fails the run
    # a stage's own exception, not Ray Data's UserCodeException around it: a model actor's GateError
    # then reaches the driver as one, with its figures
    ctx.raise_original_map_exception = True
    # A block per row at every stage (a shard, a part, a part's record): a stage's output moves on
    # as soon as it exists, and the feed's read task (feed.py) yields each shard as a block of its
    # own instead of one block of them all. Every row is a unit of work here; none is split.
    ctx.target_max_block_size = 1
    # Without a cap, Ray Data lets reads run ahead into half the object store: at 20,000 images the
    # benchmark's peak memory was 45% above the 2,000-image run; with it, memory stays flat.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=plan.buffer_mb(spec.resources.buffer_mb_per_actor) * 2**20)


def check_uris(spec: JobSpec) -> None:
    """memory:// lives in one process; Ray workers would see an empty filesystem."""
    for name, uri in [("source.uri", u) for u in spec.source.uris] + [("output.uri", spec.output.uri)]:
        if uri.startswith("memory://"):
            raise ValueError(f"{name} {uri!r}: memory:// is private to one process and Ray workers cannot see it; "
                             "use a local folder (file://) or object storage (s3://)")


def compile_job(spec: JobSpec) -> dict:
    """`vitpipe compile`: build and cache the job's engine where its actors would run, and gate it."""
    from pipeline import gate
    from pipeline.model.checkpoints import load_model

    check_uris(spec)
    ckpt = load_model(spec.model, spec.engine.cache_uri)
    shards = list_shards(spec.source)
    init_ray(spec)
    plan = plan_on_cluster(spec, ckpt.config)
    result, _ = gate.prepare(spec, ckpt, shards, plan)
    return result | {"model_id": ckpt.model_id, "model_source": ckpt.source}


def run_job(spec: JobSpec, ckpt: Checkpoint | None = None) -> RunReport:
    """Run one job to a committed output; raises before any work on a bad spec, source or output.

    Ray starts in this thread while another loads the model, lists the shards and takes the
    output's lease (prepare_run). Where the listing outlasts Ray's start and the engine's check
    needs none of the job's images, the model actors start before the listing ends (Early)."""
    t0 = time.time()
    check_uris(spec)
    run_id = new_run_id()
    progress = Progress(spec, t0)
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        loaded = pool.submit(lambda: ckpt or load_checkpoint(spec, progress))
        prepared = pool.submit(lambda: _prepare(spec, loaded.result(), run_id, progress))
        start_ray_beside(spec, pool, progress, undo=lambda: _lease_back(prepared))
        ckpt = loaded.result()
        writer = _writer(spec, run_id, ckpt)
        early = None
        try:
            wait([prepared], timeout=EARLY_AFTER_S)
            plan = None if prepared.done() else plan_on_cluster(spec, ckpt.config)
            early = Early.start(spec, ckpt, plan, prepared, writer, progress) if plan else None
            p = prepared.result()
        except BaseException as e:
            if early:
                early.stop()
            elif prepared.exception() is None:  # the plan failed (a bad placement): the lease back
                prepared.result().sink.abort(e)
            raise
    sink = p.sink
    try:
        engine_check, plan, timing = _process(spec, ckpt, plan, p, progress, writer, early)
        wall = time.time() - t0
        c = sink.counts
        device = "cuda" if plan and plan.gpu else "cpu"
        report = RunReport(
            run_id=run_id, job=spec.name, output_uri=spec.output.uri, mode=spec.output.mode,
            records_read=c.records, ok_rows=c.ok, error_rows=c.error_rows, errors_by_type=dict(c.errors),
            skipped_members=dict(c.skipped), duplicates_dropped=c.duplicates_dropped, shards=len(p.shards),
            shards_processed=len(p.work.todo), shards_resumed=len(p.work.adopted), shards_unchanged=len(p.work.kept),
            wall_s=round(wall, 3), images_per_s=round(c.records / wall, 2) if wall else 0.0,
            time_to_first_row_s=timing.get("first_row"), model_id=ckpt.model_id,
            model_source=ckpt.source, engine=f"{engine_check['backend']}-{device}-{spec.engine.precision}",
            engine_reason=engine_check["reason"], gate=engine_check["gate"], actors=plan.actors if plan else 0,
            threads_per_actor=plan.threads if plan else 0, decode_actors=plan.decoders if plan else 0,
            embedding_dim=ckpt.config.embed_dim, model_family=ckpt.config.family,
            normalized=spec.outputs.normalizes(ckpt.config.family), labeled=c.labeled,
            scores=ckpt.config.scores, zero_shot=ckpt.config.head_on_embedding,
            top1_accuracy=round(c.correct / c.labeled, 4) if c.labeled else None,
            started_at=round(t0, 3), time_to_start_s=timing.get("start"), time_to_full_speed_s=full_speed_at(c.timeline, t0),
            time_to_listed_s=round(p.at - t0, 3), time_to_model_ready_s=timing.get("model_ready"),
            started_early=early is not None,
            decoder=_decoder(plan, c), decoded_gpu=c.decoded_gpu, fallback_cpu=c.fallback_cpu,
            bad_shards=dict(c.bad_shards), parts_by_node=dict(sink.nodes),
            labels=p.labels.summary() if p.labels else None, lease=sink.lease.took_over, ledger=sink.ledger_read,
            timeline=timeline_points(c.timeline, t0),
        )
        sink.commit({
            "format": "vitpipe-output/1", "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "job": spec.model_dump(mode="json"),
            "model": {"id": ckpt.model_id, "source": ckpt.source, "family": ckpt.config.family,
                      "config": ckpt.config.to_dict(), "preprocess": ckpt.preprocess.to_dict(), "labels": ckpt.labels,
                      "normalize": spec.outputs.normalizes(ckpt.config.family), "scores": ckpt.config.scores,
                      "zero_shot": ckpt.config.head_on_embedding},
            "engine": report.engine, "engine_check": engine_check, "versions": versions(),
            "counts": {"records": c.records, "ok": c.ok, "errors": c.error_rows, "skipped": sum(c.skipped.values())},
            "report": report.to_dict(),
        })
    except BaseException as e:
        sink.abort(e)
        raise
    try:
        page.write_page(spec.output.uri)
    except Exception as e:  # the output is committed: a page that fails to draw must not fail the run
        print(f"report page: not written ({type(e).__name__}: {e}); the output is committed and complete; "
              f"rebuild the page with: vitpipe report {spec.output.uri}", file=sys.stderr)
    return report


def _lease_back(prepared: Future) -> None:
    """Ray did not start: give back the lease the prepare thread took, if it took one."""
    if prepared.exception() is None:
        prepared.result().sink.close()


def _writer(spec: JobSpec, run_id: str, ckpt: Checkpoint) -> dict:
    """What the model actors' PartWriter needs: where, which run, and the part files' metadata."""
    meta = {"run_id": run_id, "model_id": ckpt.model_id, "model_source": ckpt.source,
            "job": spec.model_dump_json(), "engine": f"{spec.engine.backend}-{spec.engine.precision}"}
    return {"uri": spec.output.uri, "run_id": run_id, "metadata": meta, "row_group_rows": spec.output.row_group_rows}


class Prepared(NamedTuple):
    """What the prepare thread found: the listing, the output's sink (lease taken) and its plan."""

    shards: list[Shard]
    sink: ParquetSink
    work: ShardPlan
    labels: LabelMap | None
    at: float  # unix time the output's plan was known: the listing and the output check are done


def _prepare(spec: JobSpec, ckpt: Checkpoint, run_id: str, progress: Progress) -> Prepared:
    """The shards, and the output's sink with its lease taken and its work planned.
    Runs beside Ray's start-up, after the model is loaded (torch is first imported there)."""
    from pipeline.labels import plan_labels

    shards = listed(spec, progress)
    labels = plan_labels(spec.source, shards, ckpt)
    sink = ParquetSink(spec.output, run_id, ckpt.model_id)
    work = sink.begin(shards)  # refuses a finished output in mode error; takes the lease
    progress.step(f"output {spec.output.uri}: {plural(len(work.todo), 'shard')} to do, {len(work.adopted)} "
                  f"resumed, {len(work.kept)} unchanged")
    return Prepared(shards, sink, work, labels, time.time())


@dataclass
class Early:
    """A dataset started before the listing ended: its actors load the model while the driver lists
    the source and checks the output; a feed (feed.py) hands them the shards to do once known.

    Only where the listing side is still running EARLY_AFTER_S after Ray is up and the model
    loaded, and the engine's check needs none of the job's images (gate.needs_images): the plain
    fp32 torch reference, the default. `first` is the iteration's first step, taken in a thread of
    its own, because Ray Data starts a dataset (and its actors) at the first step, and that step
    returns only with the first part's record."""

    check: RunCheck
    batches: Iterator[pa.Table]
    first: Future
    started: float

    @classmethod
    def start(cls, spec: JobSpec, ckpt: Checkpoint, plan: Plan, prepared: Future, writer: dict,
              progress: Progress) -> Early | None:
        from pipeline import gate
        from pipeline.feed import fill, new_feed

        if gate.needs_images(spec, gate.placement(spec, plan)[0]):
            return None
        feed = new_feed()
        check, ds = _start_dataset(spec, ckpt, plan, feed, [], writer, None, progress)
        progress.step("starting the read and model actors while the listing runs")
        batches = iter(_batches(ds))
        stepper = ThreadPoolExecutor(1, thread_name_prefix="first-step")
        first = stepper.submit(next, batches, None)
        stepper.shutdown(wait=False)

        def hand_over(done: Future) -> None:  # in the prepare thread, as soon as it is done
            p = None if done.exception() else done.result()
            fill(feed, p.work.todo if p else [], p.labels.to_index if p and p.labels else None)

        prepared.add_done_callback(hand_over)
        return cls(check, batches, first, time.time())

    def stop(self) -> None:
        """The listing or the output check failed: the feed handed over no shard, so the dataset ends
        with nothing written; wait for that, so that its actors are gone before the error is raised."""
        with contextlib.suppress(Exception):  # the failure to raise is the prepare thread's, not this
            self.first.result(timeout=60)


def _start_dataset(spec: JobSpec, ckpt: Checkpoint, plan: Plan, shards: list[Shard] | ActorHandle,
                   listed: list[Shard], writer: dict, labels: dict[str, int] | None,
                   progress: Progress) -> tuple[RunCheck, ray.data.Dataset]:
    """The engine's check begun (gate.py, on the first `listed` images where it needs them) and the
    dataset over `shards` (the list, or a feed) built with what the check decided."""
    from pipeline import gate

    configure_data(spec, plan)
    check = gate.RunCheck.begin(spec, ckpt, listed, plan)
    if check.where == "first":
        progress.step(f"engine {check.result['backend']} built and checked on the first listed images")
    return check, build_dataset(spec, shards, plan, check.actor_backend, ckpt.preprocess, writer,
                                check.calibration, check.actor_images, labels)


def _batches(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    """The model stage's records as they come; prefetch 0: a finished part reaches the sink at once."""
    return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)


def load_checkpoint(spec: JobSpec, progress: Progress) -> Checkpoint:
    """The job's model, and a start-up line once it is in memory (a hub download can take minutes)."""
    from pipeline.model.checkpoints import load_model

    ckpt = load_model(spec.model, spec.engine.cache_uri)
    progress.step(f"model {ckpt.source} loaded")
    return ckpt


def listed(spec: JobSpec, progress: Progress) -> list[Shard]:
    """The source's shards, and a start-up line with how many (a big bucket lists for minutes)."""
    shards = list_shards(spec.source)
    progress.step(f"listed {plural(len(shards), 'shard')} under {', '.join(spec.source.uris)}")
    return shards


def _decoder(plan: Plan | None, c) -> str:
    if plan is None:
        return ""
    if plan.decoders:
        return f"CPU, {plan.decoders} decode actor(s) of 1 CPU feeding the GPU actors"
    if plan.decode == "gpu":
        return f"GPU (nvJPEG in the model actors): {c.decoded_gpu} records"
    return "CPU, inside the model actors"


def _process(spec: JobSpec, ckpt: Checkpoint, plan: Plan | None, p: Prepared, progress: Progress, writer: dict,
             early: Early | None) -> tuple[dict, Plan | None, dict]:
    """Stream the shards to do through Ray; returns (engine check, plan, {"start", "first_row",
    "model_ready"} in s). The gate's and the int8/fp8 calibration's images come from the first
    *listed* shards, not the first shards to do (gate.py)."""
    from pipeline import gate

    t0 = progress.t0
    nothing = {"backend": spec.engine.backend, "reason": "no shard needed processing", "cache": "", "gate": None}
    if early:
        check, timing = early.check, {"start": round(early.started - t0, 3)}
        first = early.first.result()  # the dataset ends at once when the feed holds no shard
        if not p.work.todo:
            return nothing, None, {}
        batches = itertools.chain([first] if first is not None else [], early.batches)
    else:
        if not p.work.todo:
            return nothing, None, {}
        plan = plan or plan_on_cluster(spec, ckpt.config)
        check, ds = _start_dataset(spec, ckpt, plan, p.work.todo, p.shards, writer,
                                   p.labels.to_index if p.labels else None, progress)
        timing = {"start": round(time.time() - t0, 3)}
        progress.starting(len(p.work.todo))
        batches = _batches(ds)
    sink, total = p.sink, len(p.work.todo)
    bar = progress.bar()
    try:
        for table in batches:
            for result in table.to_pylist():
                check.see(result["check"])
                sink.add(result)
                ready = round(result["ready_at"] - t0, 3)
                timing["model_ready"] = min(timing.get("model_ready", ready), ready)
                if "first_row" not in timing:
                    timing["first_row"] = round(time.time() - t0, 3)
                    # the page's plotting library, imported while the driver waits on the actors
                    threading.Thread(target=page.warm, name="page-warm", daemon=True).start()
            c = sink.counts
            bar.update(c.records + sum(c.skipped.values()) - bar.n)
            bar.set_postfix(ok=c.ok, errors=c.error_rows, shards=f"{len(sink.done)}/{total}", refresh=False)
    except gate.GateError as miss:  # an actor's check failed
        raise gate.plain(miss) from None
    finally:
        bar.close()
    engine_check = check.final(spec.engine.backend)
    return engine_check, plan, timing
