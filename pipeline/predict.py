"""The model stage: a Ray actor that loads its engine once, then turns record batches into rows.

Decode runs here, fused into the actor: on CPU-only boxes a separate decode task
would steal a core from the multi-threaded model (DESIGN.md, measured), and the
object store then carries compressed bytes, not pixels. `predict_batch` is a
plain function, so the stage is tested without Ray.
"""

from __future__ import annotations

import json
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import JobSpec, OutputsSpec
from pipeline.decode import DecodeError, Preprocess, decode_image, decode_records
from pipeline.engines.base import BuiltEngine, Engine, build_engine
from pipeline.engines.batching import TunedEngine
from pipeline.model.checkpoints import Checkpoint, load_checkpoint

ENGINE_CHECK = "engine_check"  # the status of the marker row that carries an actor's engine check
PASS_THROUGH = ("key", "source_uri", "source_etag", "member", "label", "shard", "ordinal")


def load_model(spec: JobSpec) -> Checkpoint:
    """The job's checkpoint with the spec's overrides (pooling, size, normalization, labels)."""
    m = spec.model
    labels = None
    if m.labels:
        import fsspec

        with fsspec.open(m.labels, "r") as f:
            text = f.read()
        labels = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    return load_checkpoint(m.checkpoint, m.arch, m.pooling, m.image_size, m.num_classes, m.mean, m.std, labels,
                           m.heads)


def output_schema(embed_dim: int, outputs: OutputsSpec) -> pa.Schema:
    """The row schema every predictor batch has (ok, error and skipped rows together)."""
    fields = [
        pa.field("key", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_etag", pa.string()),
        pa.field("member", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("error_stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("shard", pa.string()),  # internal: the sink groups rows by shard, then drops it
        pa.field("ordinal", pa.int64()),  # internal: the row's place in its shard, its identity
    ]
    if outputs.embeddings:
        value = pa.float16() if outputs.embedding_dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, embed_dim)))
    if outputs.top_k:
        fields += [pa.field("topk_ids", pa.list_(pa.int32())),
                   pa.field("topk_scores", pa.list_(pa.float32())),
                   pa.field("topk_labels", pa.list_(pa.string()))]
    return pa.schema(fields)


def predict_batch(batch: pa.Table, engine: Engine, pre: Preprocess, labels: list[str],
                  outputs: OutputsSpec, pool: Executor | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Records (RECORD_COLUMNS) -> output rows (output_schema; pass it in to build it once)."""
    pixels, cols = decode_records(batch, pre, pool)
    ok = np.flatnonzero(np.array(cols["status"]) == "ok")
    n = batch.num_rows
    data: dict[str, object] = {c: batch.column(c) for c in PASS_THROUGH} | cols
    emb = np.zeros((n, engine.embed_dim), dtype=np.float32)  # (B, D)
    logits = np.zeros((n, max(engine.num_classes, 1)), dtype=np.float32)  # (B, C)
    if len(ok):
        e, lg = engine.run(pixels[ok])
        emb[ok] = e
        if engine.num_classes:
            logits[ok] = lg
    schema = schema or output_schema(engine.embed_dim, outputs)
    if outputs.embeddings:
        dtype = np.float16 if outputs.embedding_dtype == "float16" else np.float32
        flat = pa.array(emb.astype(dtype).reshape(-1))
        data["embedding"] = pa.FixedSizeListArray.from_arrays(flat, engine.embed_dim)
    if outputs.top_k:
        data.update(top_k(logits, outputs.top_k, labels, ok_mask=np.isin(np.arange(n), ok),
                          has_head=engine.num_classes > 0))
    return pa.table({f.name: data[f.name] for f in schema}, schema=schema)


def top_k(logits: np.ndarray, k: int, labels: list[str], ok_mask: np.ndarray, has_head: bool) -> dict[str, list]:
    """Softmax top-k per row; rows that are not ok (or a model without a head) get empty lists."""
    k = min(k, logits.shape[1])
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # (B, C)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (B, k)
    scores = np.take_along_axis(probs, idx, axis=1)  # (B, k)
    ids_col, scores_col, names_col = [], [], []
    for i in range(len(logits)):
        if not ok_mask[i] or not has_head:
            ids_col.append([]), scores_col.append([]), names_col.append([])
            continue
        ids_col.append(idx[i].tolist())
        scores_col.append(scores[i].tolist())
        names_col.append([labels[j] if j < len(labels) else str(j) for j in idx[i]])
    return {"topk_ids": ids_col, "topk_scores": scores_col, "topk_labels": names_col}


def calibration_images(spec: JobSpec, shards: list, pre: Preprocess, n: int) -> np.ndarray:
    """The first n decodable images of the job's own inputs: the gate's fixed batch (N, S, S, 3)."""
    from pipeline.sources import read_shard

    images: list[np.ndarray] = []
    for shard in shards:
        for chunk in read_shard(shard, spec.source):
            for rec in chunk:
                if rec["status"] != "record":
                    continue
                try:
                    images.append(decode_image(rec["image"], pre))
                except DecodeError:
                    continue
                if len(images) >= n:
                    return np.stack(images)
    return np.stack(images) if images else np.zeros((0, pre.image_size, pre.image_size, 3), np.uint8)


def needs_gate(spec: JobSpec) -> bool:
    """Every engine other than plain torch fp32 (the reference itself) is checked."""
    e = spec.engine
    return not (e.backend == "torch" and e.precision == "fp32" and not e.compile)


def check_engine(job: dict, images: np.ndarray, threads: int, calibration: np.ndarray | None = None,
                 backend: str | None = None, ckpt: Checkpoint | None = None) -> dict:
    """Build the job's engine where it will run (filling the cache), then gate it against torch fp32.

    images: the gate's batch; calibration: the int8/fp8 calibration batch (other images);
    backend: overrides the spec's (what the driver resolved `auto` to); ckpt: the job's checkpoint
    where the caller has it loaded already (the driver, for a gate beside the actors)."""
    spec = JobSpec.model_validate(job)
    e = spec.engine
    ckpt = ckpt or load_model(spec)
    built = build_engine(ckpt, backend or e.backend, e.precision, e.device, threads, max_batch=e.batch_size,
                         cache_uri=e.cache_uri, compile=e.compile, calibration=calibration)
    return engine_check(spec, ckpt, built, images, threads)


def engine_check(spec: JobSpec, ckpt: Checkpoint, built: BuiltEngine, images: np.ndarray, threads: int) -> dict:
    """What the manifest records of a built engine: which backend and why, its cache, and the
    gate's figures on `images` against a torch fp32 reference on the same device (None when the
    job needs no gate). The reference is dropped afterwards, so an actor keeps one model."""
    from pipeline.engines.gate import compare
    from pipeline.engines.torch_engine import TorchEngine

    e = spec.engine
    out = {"backend": built.backend, "reason": built.reason, "cache": built.cache, "engine": built.engine.info.name,
           "gate": None}
    if e.gate.enabled and needs_gate(spec) and len(images):
        reference = TorchEngine(ckpt, "fp32", built.engine.info.device.split(":")[0], threads)
        out["gate"] = compare(reference, built.engine, images, e.gate.min_cosine, e.gate.min_top1).to_dict()
    return out


def check_row(check: dict, schema: pa.Schema) -> pa.Table:
    """A marker row carrying an actor's engine check to the driver, ahead of that actor's rows.
    Like a shard's end marker it travels with the data (status says what it is, a spare column
    holds the payload), so no side channel is needed; the driver removes it (pop_checks)."""
    row = {f.name: pa.nulls(1, f.type) for f in schema}
    row["status"] = pa.array([ENGINE_CHECK])
    row["error_message"] = pa.array([json.dumps(check)])
    return pa.table(row, schema=schema)


def pop_checks(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Split the engine-check markers (check_row) off a batch of output rows."""
    marker = pc.equal(table.column("status"), ENGINE_CHECK)
    checks = [json.loads(m) for m in table.filter(marker).column("error_message").to_pylist()]
    return (table.filter(pc.invert(marker)) if checks else table), checks


class Predictor:
    """The Ray actor: constructed once per actor, called once per batch."""

    def __init__(self, job: dict, threads: int, backend: str | None = None, calibration: Any = None,
                 gate_images: Any = None):
        spec = JobSpec.model_validate(job)
        e = spec.engine
        self.ckpt: Checkpoint = load_model(spec)
        # `backend` is what the driver's gate step resolved `auto` to, so all actors agree;
        # `calibration` (a Ray object ref: Ray Data keeps constructor kwargs inside its own pickled
        # state, so refs there are not resolved for us) is the int8/fp8 batch the gate step calibrated
        # on: its digest keys the cached graph, and an actor that misses the cache builds the same one.
        calibration, gate_images = (ray.get(x) if isinstance(x, ray.ObjectRef) else x
                                    for x in (calibration, gate_images))
        built = build_engine(self.ckpt, backend or e.backend, e.precision, e.device, threads,
                             max_batch=e.batch_size, cache_uri=e.cache_uri, compile=e.compile,
                             calibration=calibration)
        # engine.gate.placement actors: this actor checks its own engine now, on its own device, and
        # sends the figures ahead of its first rows (no separate GPU process to start just for the gate)
        self.check = None if gate_images is None else engine_check(spec, self.ckpt, built, gate_images, threads)
        self.engine = TunedEngine(built.engine, e.batch_size, tune=e.tune_batch)
        self.outputs = spec.outputs
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self.schema = output_schema(self.engine.embed_dim, self.outputs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check, self.check = self.check, None
        if check and check["gate"] and not check["gate"]["passed"]:
            from pipeline.engines.gate import GateResult

            raise GateResult(**check["gate"]).refusal("checked in a model actor, no row was written")
        out = predict_batch(batch, self.engine, self.ckpt.preprocess, self.ckpt.labels, self.outputs, self.pool,
                            self.schema)
        return out if check is None else pa.concat_tables([check_row(check, self.schema), out])
