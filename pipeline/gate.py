"""The accuracy gate, its whole life in one module: a fast engine must agree with torch fp32
before it labels a million images.

- Its images: the first `engine.gate.samples` decodable images of the job's first *listed*
  shards (after the int8/fp8 calibration images), so a nightly run checks, and calibrates
  on, the same images every night and finds its cached engine (gate_images).
- Where it runs (placement): a torch engine has nothing to build, so its check need not hold
  the actors back: on CPUs a driver thread checks while the actors start; on GPUs each model
  actor checks its own engine on its own GPU and sends the figures with the first part of each call.
  Engines with a build step (ONNX export, TensorRT, int8/fp8 calibration, torch.compile) are
  built, cached and checked first, by one task with the actors' resources, so that the actors
  load them instead of each building them.
- The comparison (compare): mean embedding cosine >= min_cosine and top-1 agreement >=
  min_top1 against torch fp32 on the same device; the minimum cosine is reported too.
- The verdict: a miss stops the job before any row is written, with the figures and the way
  out (GateResult.refusal); a pass goes into the report and the manifest.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import JobSpec
from pipeline.decode import Preprocess, first_images
from pipeline.engines.base import BuiltEngine, Engine
from pipeline.engines.quantize import QUANTIZED
from pipeline.model.checkpoints import Checkpoint, load_model
from pipeline.plan import Plan

FIX = "Use a higher precision, another backend, or lower engine.gate thresholds if this is expected"


class GateError(RuntimeError):
    """The engine disagrees with torch fp32 beyond the job's thresholds."""


@dataclass
class GateResult:
    engine: str
    samples: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None
    min_cosine: float
    min_top1: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        top1 = "n/a (no head)" if self.top1_agreement is None else f"{self.top1_agreement:.4f}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"accuracy gate {verdict} for {self.engine} on {self.samples} images: embedding cosine mean "
                f"{self.cosine_mean:.5f} (min {self.cosine_min:.5f}, need >= {self.min_cosine}), top-1 agreement "
                f"{top1} (need >= {self.min_top1})")

    def refusal(self, consequence: str) -> GateError:
        """The error that stops a job on a miss: the figures, what happened, and the way out."""
        return GateError(f"{self.describe()}; {consequence}. {FIX}")


def compare(reference: Engine, candidate: Engine, images: np.ndarray, min_cosine: float = 0.999,
            min_top1: float = 0.99) -> GateResult:
    """Run both engines on the same uint8 batch (N, S, S, 3) and measure their agreement."""
    ref_emb, ref_logits = reference.run(images)
    emb, logits = candidate.run(images)
    cos = np.sum(ref_emb * emb, axis=1) / (np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(emb, axis=1) + 1e-12)
    top1 = float(np.mean(ref_logits.argmax(1) == logits.argmax(1))) if candidate.num_classes else None
    passed = float(cos.mean()) >= min_cosine and (top1 is None or top1 >= min_top1)
    return GateResult(candidate.info.name, len(images), round(float(cos.mean()), 6), round(float(cos.min()), 6),
                      None if top1 is None else round(top1, 4), min_cosine, min_top1, passed)


def needs_gate(spec: JobSpec) -> bool:
    """Every engine other than plain torch fp32 (the reference itself) is checked."""
    e = spec.engine
    return not (e.backend == "torch" and e.precision == "fp32" and not e.compile)


def needs_images(spec: JobSpec, where: str) -> bool:
    """Whether the check needs the job's first images (and so its listing) before the actors start:
    every gated engine, and `first` for a backend with a build to cache."""
    return needs_gate(spec) or (where == "first" and spec.engine.backend != "torch")


def gate_images(spec: JobSpec, shards: list, pre: Preprocess, n: int) -> np.ndarray:
    """The first n decodable images of the job's own inputs: the gate's fixed batch (N, S, S, 3)."""
    images = [pixels for _, pixels in first_images(spec.source, shards, pre, n)]
    return np.stack(images) if images else np.zeros((0, pre.image_size, pre.image_size, 3), np.uint8)


def placement(spec: JobSpec, plan: Plan) -> tuple[str, str | None]:
    """Where the check runs (engine.gate.placement), and the backend the actors are told to use
    (None: each GPU actor's own resolution of `auto`).

    auto: on CPUs a driver thread while the actors start (bf16, 2,000 images: first model
    call 8.9 -> 6.4 s); on GPUs inside each model actor (as a task of its own the gate
    started a second GPU process first, 8-10 s of the H200 run's 16.6 s to the first row);
    first for engines with a build to cache."""
    from pipeline.engines.build import resolve_backend

    e = spec.engine
    # the driver cannot resolve `auto` for GPU actors (it may have no GPU, or another kind)
    backend = (None if e.backend == "auto" else e.backend) if plan.gpu else resolve_backend(e.backend, e.precision,
                                                                                             "cpu")[0]
    where = e.gate.placement
    if where == "auto":
        where = ("actors" if plan.gpu else "driver") if backend == "torch" and not e.compile else "first"
    if where == "driver" and plan.gpu:
        raise ValueError("engine.gate.placement: driver runs the engine in the driver process, which has no GPU "
                         "reserved for it; use actors (each GPU actor checks its own engine) or first")
    return where, backend


def build_and_check(job: dict, images: np.ndarray, threads: int, call_size: int,
                    calibration: np.ndarray | None = None, backend: str | None = None,
                    ckpt: Checkpoint | None = None) -> dict:
    """Build the job's engine where it will run (filling the cache), then gate it against torch fp32.

    Runs as a Ray task (placement first) or a driver thread (driver). images: the gate's batch;
    calibration: the int8/fp8 calibration batch (other images); backend: overrides the spec's
    (what the driver resolved `auto` to); ckpt: the job's checkpoint, where the caller has it."""
    from pipeline.engines.build import build_engine

    spec = JobSpec.model_validate(job)
    e = spec.engine
    ckpt = ckpt or load_model(spec.model, spec.engine.cache_uri)
    built = build_engine(ckpt, backend or e.backend, e.precision, e.device, threads, max_batch=call_size,
                         cache_uri=e.cache_uri, compile=e.compile, calibration=calibration)
    return check_built(spec, ckpt, built, images, threads)


def check_built(spec: JobSpec, ckpt: Checkpoint, built: BuiltEngine, images: np.ndarray, threads: int) -> dict:
    """What the manifest records of a built engine: which backend and why, its cache, and the
    gate's figures on `images` against a torch fp32 reference on the same device (None when the
    job needs no gate). The reference is dropped afterwards, so an actor keeps one model."""
    from pipeline.engines.torch_engine import TorchEngine

    e = spec.engine
    out = {"backend": built.backend, "reason": built.reason, "cache": built.cache, "engine": built.engine.info.name,
           "gate": None}
    if e.gate.enabled and needs_gate(spec) and len(images):
        reference = TorchEngine(ckpt, "fp32", built.engine.info.device.split(":")[0], threads)
        out["gate"] = compare(reference, built.engine, images, e.gate.min_cosine, e.gate.min_top1).to_dict()
    return out


def in_actor_verdict(check: dict | None) -> None:
    """A model actor's own check (placement actors): raise before its first row on a miss."""
    if check and check["gate"] and not check["gate"]["passed"]:
        raise GateResult(**check["gate"]).refusal("checked in a model actor, no row was written")


def start(spec: JobSpec, ckpt: Checkpoint, shards: list, plan: Plan, where: str = "first",
          backend: str | None = None) -> tuple[dict | object | Future | None, np.ndarray | None, np.ndarray | None]:
    """Start building (and caching) the engine and its check where `placement` says; returns
    (the check, the calibration batch, the gate's images for the actors).

    The check is a dict when done, an object ref (first: a task with the model actors'
    resources) or a future (driver: a thread of this process) to pass to `finish`, or None
    (actors: each actor's figures arrive with its parts). For int8/fp8 the calibration
    batch is the first engine.calibration_samples images of the job; the gate uses the
    engine.gate.samples after them."""
    import ray

    e = spec.engine
    if not needs_images(spec, where):
        return {"backend": backend or e.backend, "reason": "asked for in the job spec (fp32: the reference, "
                "no gate)", "cache": "", "gate": None}, None, None
    n_cal = e.calibration_samples if e.precision in QUANTIZED else 0
    images = gate_images(spec, shards, ckpt.preprocess, n_cal + e.gate.samples)
    calibration, images = (images[:n_cal], images[n_cal:]) if n_cal else (None, images)
    if calibration is not None and len(images) == 0:  # a tiny job: gate on the calibration images
        images = calibration
    if where == "actors":
        return None, calibration, images
    if where == "driver":  # a thread of this process, which has torch and the model loaded
        pool = ThreadPoolExecutor(1, thread_name_prefix="gate")
        future = pool.submit(build_and_check, spec.model_dump(), images, plan.threads, plan.call_size, calibration,
                             backend, ckpt)
        pool.shutdown(wait=False)
        return future, calibration, None
    task = ray.remote(build_and_check).options(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None)
    return task.remote(spec.model_dump(), images, plan.threads, plan.call_size, calibration, backend), calibration, None


def finish(check: dict | object | Future, calibration: np.ndarray | None) -> dict:
    """Wait for the check; raises GateError (naming the figures) when the engine missed the gate."""
    import ray

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


@dataclass
class RunCheck:
    """The gate during one run: started before the dataset (begin), settled by the first part
    record at the latest (see), read at the end (result). `pending` is what `start` returned;
    `result` the settled check (backend, reason, cache, gate figures)."""

    where: str  # first | driver | actors (placement)
    backend: str | None
    pending: dict | object | Future | None
    calibration: np.ndarray | None
    actor_images: np.ndarray | None  # actors: the images each model actor checks its own engine on
    result: dict | None = None

    @classmethod
    def begin(cls, spec: JobSpec, ckpt: Checkpoint, listed: list, plan: Plan) -> RunCheck:
        """Start the check where `placement` says; `first` (an engine with a build) is settled here,
        before any actor starts, so that the actors load the engine it cached."""
        where, backend = placement(spec, plan)
        pending, calibration, images = start(spec, ckpt, listed, plan, where, None if where == "first" else backend)
        run = cls(where, backend, pending, calibration, images)
        if where == "first" or isinstance(pending, dict):
            run.result = finish(pending, calibration)
        return run

    @property
    def actor_backend(self) -> str | None:
        """The backend the model actors are told to use (None: each GPU actor resolves `auto`)."""
        return self.result["backend"] if self.where == "first" else self.backend

    def see(self, actor_check: str | None) -> None:
        """Every part record, before its rows count: an actor's own figures come with the first part
        of each of its calls (a miss has raised in the actor already); otherwise the driver thread's
        check must be settled before the first row is accepted."""
        if actor_check and self.result is None:
            self.result = finish(json.loads(actor_check), self.calibration)
        if self.result is None:
            if self.pending is None:
                raise RuntimeError("model stage: a part arrived from an actor that sent no engine check first "
                                   "(engine.gate.placement actors); this is a bug, please report it")
            self.result = finish(self.pending, self.calibration)

    def final(self, default_backend: str) -> dict:
        """The settled check for the report; a run whose parts never reached an actor settles it here."""
        if self.result is None:
            self.result = finish(self.pending, self.calibration) if self.pending is not None else {
                "backend": self.backend or default_backend, "reason": "no part reached a model actor",
                "cache": "", "gate": None}
        return self.result


def plain(miss: GateError) -> GateError:
    """An actor's miss as the driver raises it: its own first line, without Ray's traceback and the
    retry advice Ray Data appends on lines of their own."""
    return GateError(str(getattr(miss, "cause", miss)).split("\n", 1)[0])


def prepare(spec: JobSpec, ckpt: Checkpoint, shards: list, plan: Plan) -> tuple[dict, np.ndarray | None]:
    """`vitpipe compile`: build, cache and gate the engine before any bulk work. Raises GateError on a miss."""
    check, calibration, _ = start(spec, ckpt, shards, plan)
    return finish(check, calibration), calibration
