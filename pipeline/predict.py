"""The model stage: a Ray actor that loads its engine once, then turns each part of a shard
into rows and writes them (write.py) where they were made.

A part goes in as one row (sources.PART_SCHEMA); what comes out is one small record per
part (RESULT_SCHEMA: its files, its counts), which is all the driver ever receives.

Decoding happens here, fused into the actor: on CPU-only boxes a separate decode process
would steal a core from the multi-threaded model (DESIGN.md, measured), and the object
store then carries compressed bytes, not pixels; on a GPU the actor decodes JPEGs with
nvJPEG (decode_gpu.py). Only with `engine.decode: cpu` on GPUs do parts arrive decoded by
Decoder actors. `predict_part` is a plain function, so the stage is tested without Ray.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobSpec, OutputsSpec
from pipeline.decode import Preprocess, decode_records
from pipeline.engines.base import Engine, run_in_calls
from pipeline.model.checkpoints import Checkpoint, load_model
from pipeline.samples import part_sample
from pipeline.sources import Part, parts_of
from pipeline.write import ERROR_COLUMNS, PartWriter

PASS_THROUGH = ("key", "source_uri", "source_etag", "member", "label")
# What the driver receives per part: where its files are and what they hold, nothing more.
RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("part", pa.int32()), ("last", pa.bool_()),
                           ("fault", pa.string()), ("files", pa.string()), ("counts", pa.string()),
                           ("check", pa.string()), ("node", pa.string()), ("finished_at", pa.float64()),
                           ("ready_at", pa.float64())])  # when its actor had its engine: the report's start-up


def output_schema(embed_dim: int, outputs: OutputsSpec) -> pa.Schema:
    """The schema of the ok rows: provenance, then the embedding and the top-k classes."""
    fields = [pa.field("key", pa.string()), pa.field("source_uri", pa.string()), pa.field("source_etag", pa.string()),
              pa.field("member", pa.string()), pa.field("label", pa.int64())]
    if outputs.embeddings:
        value = pa.float16() if outputs.embedding_dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, embed_dim)))
    if outputs.top_k:
        fields += [pa.field("topk_ids", pa.list_(pa.int32())),
                   pa.field("topk_scores", pa.list_(pa.float32())),
                   pa.field("topk_labels", pa.list_(pa.string()))]
    return pa.schema(fields)


def predict_part(records: pa.Table, engine: Engine, pre: Preprocess, labels: list[str], outputs: OutputsSpec,
                 call_size: int, pool: Executor | None = None, gpu_decoder: Any = None,
                 schema: pa.Schema | None = None, sample: bool = False,
                 scores: str = "softmax") -> tuple[dict[str, pa.Table], dict]:
    """A part's records (RECORD_SCHEMA) -> ({"ok": rows, "errors": rows}, counts); with `sample`,
    also "samples": the page's thumbnails and rows of this part (samples.py), made here, where the
    pixels are, so that no one reads an image again for the page.

    Counts: records, ok, errors and skipped by type, labeled and correct (top-1), and how many
    records the GPU decoded and how many fell back to the CPU."""
    decoded = {"gpu": 0, "cpu": 0}
    if gpu_decoder is not None and "pixels" not in records.column_names:
        pixels, cols, decoded = gpu_decoder.decode(records, pool)  # (N, S, S, 3) on the GPU
    else:
        pixels, cols = decode_records(records, pre, pool)  # (N, S, S, 3)
    status = pa.array(cols["status"], pa.string())
    ok = np.flatnonzero(pc.equal(status, "ok").to_numpy(zero_copy_only=False))
    seen = _take(pixels, ok)  # (n, S, S, 3): what the model sees
    emb, logits = run_in_calls(engine, seen, call_size, pad=engine.info.device.startswith("cuda"))  # (n, D), (n, C)
    if outputs.normalize is True:  # resolved from auto by the Predictor (outputs.normalizes(family))
        emb = unit_length(emb)
    schema = schema or output_schema(engine.embed_dim, outputs)
    rows = records.select(list(PASS_THROUGH)).take(pa.array(ok, pa.int64()))
    data: dict[str, Any] = {c: rows.column(c) for c in PASS_THROUGH}
    if outputs.embeddings:
        dtype = np.float16 if outputs.embedding_dtype == "float16" else np.float32
        flat = pa.array(np.ascontiguousarray(emb, dtype=dtype).reshape(-1))
        data["embedding"] = pa.FixedSizeListArray.from_arrays(flat, engine.embed_dim)
    if outputs.top_k:
        data.update(top_k(logits, outputs.top_k, labels, has_head=engine.num_classes > 0, scores=scores))
    ok_rows = pa.table({f.name: data[f.name] for f in schema}, schema=schema)

    tables = {"ok": ok_rows, "errors": error_table(records, cols)}
    if sample and ok_rows.num_rows:
        tables["samples"] = part_sample(ok_rows, seen, emb if outputs.embeddings else None)
    return tables, part_counts(cols, ok_rows, decoded)


def unit_length(emb: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, D) rows of L2 norm 1 (a zero row stays zero), in float32."""
    emb = np.asarray(emb, np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def error_table(records: pa.Table, cols: dict[str, list]) -> pa.Table:
    """The error rows of a part: each failed record's provenance with its stage, type and message."""
    errors = [i for i, s in enumerate(cols["status"]) if s == "error"]
    err = records.select([c for c in ERROR_COLUMNS if c not in cols]).take(pa.array(errors, pa.int64()))
    for c in ("error_stage", "error_type", "error_message"):
        err = err.append_column(c, pa.array([cols[c][i] for i in errors], pa.string()))
    return err.select(list(ERROR_COLUMNS))


def _take(pixels: Any, idx: np.ndarray) -> Any:
    """The decoded images of the ok records (numpy, or a tensor on the GPU); no copy when all are ok."""
    if len(idx) == len(pixels):
        return pixels
    if isinstance(pixels, np.ndarray):
        return pixels[idx]
    import torch

    return pixels[torch.as_tensor(idx, device=pixels.device)]


def part_counts(cols: dict[str, list], ok_rows: pa.Table, decoded: dict) -> dict:
    """What the driver adds up (records = ok + errors; skipped members are counted apart)."""
    errors = Counter(t for s, t in zip(cols["status"], cols["error_type"], strict=True) if s == "error")
    skipped = Counter(t for s, t in zip(cols["status"], cols["error_type"], strict=True) if s == "skipped")
    labeled = correct = 0
    if "topk_ids" in ok_rows.column_names and ok_rows.num_rows:
        has = pc.is_valid(ok_rows.column("label"))
        labeled = pc.sum(has.cast(pa.int64())).as_py() or 0
        if labeled:
            top1 = pc.list_element(ok_rows.column("topk_ids"), 0).cast(pa.int64())
            correct = pc.sum(pc.and_(has, pc.equal(top1, ok_rows.column("label"))).cast(pa.int64())).as_py() or 0
    return {"records": ok_rows.num_rows + sum(errors.values()), "ok": ok_rows.num_rows, "errors": dict(errors),
            "skipped": dict(skipped), "labeled": labeled, "correct": correct, "decoded_gpu": decoded["gpu"],
            "fallback_cpu": decoded["cpu"]}


def top_k(logits: np.ndarray, k: int, labels: list[str], has_head: bool,
          scores: str = "softmax") -> dict[str, pa.Array]:
    """Top-k per row as Arrow list columns (empty lists for a model without a head): softmax
    probabilities, or (`scores` sigmoid: SigLIP's zero-shot labels) each class's own sigmoid."""
    n = len(logits)
    k = min(k, logits.shape[1]) if has_head else 0
    if scores == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))  # (n, C), not summing to 1
    else:
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)  # (n, C)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k)
    scores = np.take_along_axis(probs, idx, axis=1)  # (n, k)
    names = np.array(list(labels) + [str(j) for j in range(len(labels), logits.shape[1])], dtype=object)
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32))

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), typ))

    return {"topk_ids": lists(idx.astype(np.int32), pa.int32()),
            "topk_scores": lists(scores.astype(np.float32), pa.float32()),
            "topk_labels": lists(names[idx] if k else np.array([], dtype=object), pa.string())}


class Predictor:
    """The Ray actor: constructed once per actor, called with a batch of parts (usually one)."""

    def __init__(self, job: dict, threads: int, call_size: int, decode: str, writer: dict,
                 backend: str | None = None, calibration: Any = None, gate_images: Any = None):
        import ray

        from pipeline.engines.build import build_engine
        from pipeline.gate import check_built

        spec = JobSpec.model_validate(job)
        e = spec.engine
        self.ckpt: Checkpoint = load_model(spec.model, spec.engine.cache_uri)
        # `backend` is what the driver's gate step resolved `auto` to, so all actors agree;
        # `calibration` (a Ray object ref: Ray Data keeps constructor kwargs inside its own pickled
        # state, so refs there are not resolved for us) is the int8/fp8 batch the gate step calibrated
        # on: its digest keys the cached graph, and an actor that misses the cache builds the same one.
        calibration, gate_images = (ray.get(x) if isinstance(x, ray.ObjectRef) else x
                                    for x in (calibration, gate_images))
        built = build_engine(self.ckpt, backend or e.backend, e.precision, e.device, threads, max_batch=call_size,
                             cache_uri=e.cache_uri, compile=e.compile, calibration=calibration)
        # engine.gate.placement actors: this actor checks its own engine now, on its own device, and
        # sends the figures with its parts (no separate GPU process to start just for the gate)
        self.check = None if gate_images is None else check_built(spec, self.ckpt, built, gate_images, threads)
        self.engine, self.call_size = built.engine, call_size
        self.outputs = spec.outputs.model_copy(update={"normalize": spec.outputs.normalizes(self.ckpt.config.family)})
        self.sample = spec.output.samples  # the page's sample of each part (samples.py)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self.schema = output_schema(self.engine.embed_dim, self.outputs)
        self.gpu_decoder = self._gpu_decoder(decode)
        self.writer = PartWriter(**writer)
        self.node = socket.gethostname() + ":" + ray.get_runtime_context().get_node_id()[:8]
        self.ready_at = time.time()

    def _gpu_decoder(self, decode: str):
        """nvJPEG where the plan says so and the engine is on a GPU; else the CPU path, said aloud."""
        if decode != "gpu" or not self.engine.info.device.startswith("cuda"):
            return None
        try:
            from pipeline.decode_gpu import GpuDecoder

            return GpuDecoder(self.ckpt.preprocess, self.engine.info.device)
        except ImportError as e:  # a GPU node without torchvision: decode on this actor's CPUs
            print(f"engine.decode gpu: torchvision is not importable here ({e}); decoding on the CPU",
                  file=sys.stderr, flush=True)
            return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.gate import in_actor_verdict

        in_actor_verdict(self.check)  # a miss raises here, in every call: no row is written after it
        # The figures go with the first part of every call, not only of the actor's first: the driver
        # may get an actor's calls out of order (Ray Data hands on whichever finished call it polls
        # first), and it accepts no row before it holds a check.
        results = [self._process(part, self.check if i == 0 else None) for i, part in enumerate(parts_of(batch))]
        return pa.concat_tables(results)

    def _process(self, part: Part, check: dict | None) -> pa.Table:
        tables, counts = predict_part(part.records, self.engine, self.ckpt.preprocess, self.ckpt.labels,
                                      self.outputs, self.call_size, self.pool, self.gpu_decoder, self.schema,
                                      sample=self.sample, scores=self.ckpt.config.scores)
        files = self.writer.write(part.shard.uri, part.index, tables)
        return result_row(part, files, counts, check, self.node, self.ready_at)


def result_row(part: Part, files: list[dict], counts: dict, check: dict | None, node: str,
               ready_at: float) -> pa.Table:
    """The one record the driver receives for a part."""
    return pa.table([[part.shard.uri], pa.array([part.index], pa.int32()), [part.last],
                     pa.array([part.fault], pa.string()), [json.dumps(files)], [json.dumps(counts)],
                     pa.array([json.dumps(check) if check else None], pa.string()), [node], [time.time()],
                     [ready_at]], schema=RESULT_SCHEMA)
