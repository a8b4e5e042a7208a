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
from dataclasses import dataclass

import pyarrow as pa
import ray
from tqdm import tqdm

from pipeline.config import JobSpec
from pipeline.model.checkpoints import Checkpoint, load_checkpoint
from pipeline.predict import Predictor, output_schema
from pipeline.sink import ParquetSink, versions
from pipeline.sources import RECORD_COLUMNS, Shard, SourceSpec, list_shards, read_shard

RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("source_uri", pa.string()), ("source_etag", pa.string()),
    ("member", pa.string()), ("label", pa.int64()), ("status", pa.string()), ("error_stage", pa.string()),
    ("error_type", pa.string()), ("error_message", pa.string()),
])
assert tuple(RECORD_SCHEMA.names) == RECORD_COLUMNS


@dataclass(frozen=True)
class Plan:
    """How many model actors and what each reserves, from the cluster's shape."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    read_cpus: float


def plan_resources(spec: JobSpec, nodes: list[dict]) -> Plan:
    """Size the actor pool from the alive nodes' resources, not from constants.

    CPU-only: one actor per node, reserving the node's CPUs less one read task's
    share, with as many torch threads as that rounds up to (the read tasks mostly
    wait on I/O). With GPUs: one actor per GPU. `resources.actors` and an explicit
    `cpus_per_actor` other than the default override this.
    """
    r = spec.resources
    cpus = [n.get("CPU", 0.0) for n in nodes]
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    read = r.read_cpus
    if r.gpus_per_actor > 0 or (gpus and spec.engine.device != "cpu"):
        per_gpu = r.gpus_per_actor or 1.0
        actors = r.actors or max(1, int(gpus // per_gpu))
        return Plan(actors, r.cpus_per_actor, per_gpu, max(1, math.ceil(r.cpus_per_actor)), read)
    if "cpus_per_actor" in r.model_fields_set:
        per = r.cpus_per_actor
        actors = r.actors or max(1, int((sum(cpus) - read) // per))
    else:
        usable = [c - read for c in cpus if c - read >= 0.5]
        if not usable:
            raise RuntimeError(f"the cluster has too few CPUs ({sum(cpus)}) for a model actor and a read task")
        per = min(usable)
        actors = r.actors or len(usable)
    return Plan(actors, per, 0.0, max(1, math.ceil(per)), read)


@dataclass
class RunReport:
    run_id: str
    job: str
    output_uri: str
    records_read: int
    ok_rows: int
    error_rows: int
    errors_by_type: dict[str, int]
    skipped_members: dict[str, int]
    shards: int
    wall_s: float
    images_per_s: float
    time_to_first_row_s: float | None
    model_id: str
    model_source: str
    engine: str
    actors: int
    threads_per_actor: int
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
            f"  shards         {self.shards}",
            f"  throughput     {self.images_per_s:.1f} images/s over {self.wall_s:.1f} s wall",
            f"  model          {self.model_source} (id {self.model_id[:12]}), embedding dim {self.embedding_dim}",
            f"  engine         {self.engine} x {self.actors} actor(s), {self.threads_per_actor} thread(s) each",
        ]
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
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def read_shards_udf(batch: dict, source: dict):
    """Ray read task: one shard in, a stream of record blocks out."""
    spec = SourceSpec.model_validate(source)
    for row in batch["shard"]:
        shard = Shard(**json.loads(row))
        for chunk in read_shard(shard, spec):
            yield pa.Table.from_pylist(chunk, schema=RECORD_SCHEMA)


def build_dataset(spec: JobSpec, shards: list[Shard], plan: Plan) -> ray.data.Dataset:
    items = [{"shard": json.dumps(s.to_dict())} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shards_udf, batch_size=1, batch_format="numpy", num_cpus=plan.read_cpus,
                        fn_kwargs={"source": spec.source.model_dump()},
                        compute=ray.data.TaskPoolStrategy(size=spec.resources.max_shards_in_flight))
    return ds.map_batches(
        Predictor, batch_size=spec.engine.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"job": spec.model_dump(), "threads": plan.threads},
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
    )


def run_job(spec: JobSpec, ckpt: Checkpoint | None = None) -> RunReport:
    """Run one job to a committed output; raises before any Ray work on a bad spec or output."""
    t0 = time.time()
    m = spec.model
    ckpt = ckpt or load_checkpoint(m.checkpoint, m.arch, m.pooling, m.image_size, m.num_classes)
    shards = list_shards(spec.source)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    model_id = ckpt.model_id
    schema = output_schema(ckpt.config.dim, spec.outputs)
    meta = {"run_id": run_id, "model_id": model_id, "model_source": ckpt.source,
            "job": spec.model_dump_json(), "engine": f"{spec.engine.backend}-{spec.engine.precision}"}
    sink = ParquetSink(spec.output, run_id, schema, meta)
    sink.check_writable()

    init_ray(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of our own, below
    ctx.print_on_execution_start = False
    plan = plan_resources(spec, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    ds = build_dataset(spec, shards, plan)

    first_row_s = None
    bar = tqdm(desc=f"{spec.name}", unit="img", disable=not spec.ray.progress, file=sys.stderr, mininterval=1.0)
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if first_row_s is None:
                first_row_s = time.time() - t0
            sink.write(table)
            c = sink.counts
            bar.update(table.num_rows)
            bar.set_postfix(ok=c.ok, errors=c.error_rows, refresh=False)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()

    wall = time.time() - t0
    c = sink.counts
    device = "cuda" if plan.gpus_per_actor else "cpu"
    engine_name = f"{spec.engine.backend}-{device}-{spec.engine.precision}"
    report = RunReport(
        run_id=run_id, job=spec.name, output_uri=spec.output.uri, records_read=c.records, ok_rows=c.ok,
        error_rows=c.error_rows, errors_by_type=dict(c.errors), skipped_members=dict(c.skipped),
        shards=len(shards), wall_s=round(wall, 3), images_per_s=round(c.records / wall, 2) if wall else 0.0,
        time_to_first_row_s=None if first_row_s is None else round(first_row_s, 3), model_id=model_id,
        model_source=ckpt.source, engine=engine_name,
        actors=plan.actors, threads_per_actor=plan.threads, embedding_dim=ckpt.config.dim, labeled=c.labeled,
        top1_accuracy=round(c.correct / c.labeled, 4) if c.labeled else None,
    )
    sink.commit({
        "format": "vitpipe-output/1", "run_id": run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": spec.model_dump(mode="json"),
        "model": {"id": model_id, "source": ckpt.source, "config": ckpt.config.to_dict(),
                  "preprocess": ckpt.preprocess.to_dict(), "labels": ckpt.labels},
        "engine": report.engine, "versions": versions(),
        "shards": [s.to_dict() | {"files": len(s.files)} for s in shards],
        "counts": {"records": c.records, "ok": c.ok, "errors": c.error_rows, "skipped": sum(c.skipped.values())},
        "report": report.to_dict(),
    })
    return report
