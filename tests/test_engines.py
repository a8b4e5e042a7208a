"""Engines: ONNX Runtime vs torch, the engine cache, the accuracy gate, TensorRT where it exists."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from pipeline.engines.build import build_engine, resolve_backend
from pipeline.engines.cache import CacheKey, EngineCache
from pipeline.engines.onnx_engine import OnnxEngine, onnx_bytes
from pipeline.engines.tensorrt_engine import tensorrt_available
from pipeline.engines.torch_engine import TorchEngine
from pipeline.gate import compare
from pipeline.model.checkpoints import load_checkpoint, random_checkpoint


@pytest.fixture(scope="module")
def small_ckpt():
    # Non-default on purpose: patch 8 at 64 px, gap pooling, 10 classes.
    return load_checkpoint(None, arch="vit_ti_8", image_size=64, num_classes=10, pooling="gap")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)  # (B, S, S, 3)


def test_onnx_runtime_matches_torch_fp32(small_ckpt, images):
    ref_emb, ref_logits = TorchEngine(small_ckpt, "fp32", "cpu", 1).run(images)
    engine = OnnxEngine(small_ckpt, "fp32", "cpu", 1)
    emb, logits = engine.run(images)
    assert np.abs(logits - ref_logits).max() < 1e-4
    assert np.abs(emb - ref_emb).max() < 1e-4
    # The batch axis is dynamic: one image, and more than the export example's two.
    one_emb, _ = engine.run(images[:1])
    assert np.abs(one_emb - ref_emb[:1]).max() < 1e-4


def test_onnx_graph_takes_uint8_nhwc_with_dynamic_batch(small_ckpt):
    import onnx

    model = onnx.load_from_string(onnx_bytes(small_ckpt))
    inp = model.graph.input[0]
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert [o.name for o in model.graph.output] == ["embeddings", "logits"]


def test_bf16_torch_passes_the_gate(small_ckpt, images):
    ref = TorchEngine(small_ckpt, "fp32", "cpu", 1)
    result = compare(ref, TorchEngine(small_ckpt, "bf16", "cpu", 1), images)
    assert result.passed and 0.99 < result.cosine_mean < 1.0
    assert result.top1_agreement is not None


class Broken:
    """A deliberately broken engine: the real one with its embeddings and logits scrambled."""

    def __init__(self, engine):
        self.engine, self.info = engine, engine.info
        self.embed_dim, self.num_classes = engine.embed_dim, engine.num_classes

    def run(self, images):
        emb, logits = self.engine.run(images)
        rng = np.random.default_rng(1)
        return emb + rng.normal(0, 5 * emb.std(), emb.shape).astype(np.float32), logits[:, ::-1].copy()


def test_gate_refuses_a_broken_engine_and_says_by_how_much(small_ckpt, images):
    ref = TorchEngine(small_ckpt, "fp32", "cpu", 1)
    result = compare(ref, Broken(TorchEngine(small_ckpt, "fp32", "cpu", 1)), images)
    assert not result.passed
    assert result.cosine_mean < 0.9
    text = result.describe()
    assert "FAILED" in text and "need >= 0.999" in text


def test_cache_miss_hit_corrupt_and_rebuild(tmp_path):
    cache = EngineCache(str(tmp_path))
    key = CacheKey("m" * 64, "onnx", "1.0", "fp32", 32, "cpu")
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"artifact-%d" % len(builds)

    first = cache.get_or_build(key, build)
    assert (first.status, first.data) == ("built", b"artifact-1")
    assert cache.get_or_build(key, build).status == "hit" and len(builds) == 1
    # Corrupt the artifact: it must be rebuilt, never loaded.
    (tmp_path / f"{key.name}.bin").write_bytes(b"tampered")
    again = cache.get_or_build(key, build)
    assert again.status.startswith("rebuilt (checksum mismatch") and again.data == b"artifact-2"
    # A different key (another precision) is another entry.
    other = CacheKey("m" * 64, "onnx", "1.0", "bf16", 32, "cpu")
    assert cache.get_or_build(other, build).status == "built" and len(builds) == 3
    meta = json.loads((tmp_path / f"{key.name}.json").read_text())
    assert meta["key"]["precision"] == "fp32" and len(meta["sha256"]) == 64


def test_cache_entry_for_another_key_is_not_loaded(tmp_path):
    cache = EngineCache(str(tmp_path))
    key = CacheKey("a" * 64, "onnx", "1.0", "fp32", 32, "cpu")
    cache.get_or_build(key, lambda: b"x")
    meta_path = tmp_path / f"{key.name}.json"
    meta = json.loads(meta_path.read_text())
    meta["key"]["model_id"] = "b" * 64
    meta_path.write_text(json.dumps(meta))
    data, why = cache.load(key)
    assert data is None and "another key" in why


def _concurrent_builds(cache_uri: str, n: int = 4) -> tuple[list[str], list[int]]:
    key = CacheKey("c" * 64, "tensorrt", "10.0", "fp16", 32, "sm_90")
    builds: list[int] = []
    statuses: list[str] = []
    start = threading.Barrier(n)

    def build() -> bytes:
        builds.append(1)
        threading.Event().wait(0.5)  # a slow build, so the others arrive while it runs
        return b"plan"

    def worker() -> None:
        cache = EngineCache(cache_uri, poll_s=0.05)
        start.wait()
        statuses.append(cache.get_or_build(key, build).status)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return statuses, builds


def test_concurrent_builders_build_once_on_local_disk(tmp_path):
    statuses, builds = _concurrent_builds(str(tmp_path))
    assert len(builds) == 1
    assert sorted(statuses) == ["built"] + ["built by another worker"] * 3


@pytest.mark.heavy
def test_concurrent_builders_build_once_on_s3(s3):
    s3.mkdir("vitpipe-cache")
    statuses, builds = _concurrent_builds("s3://vitpipe-cache/engines")
    assert len(builds) == 1  # SeaweedFS honors If-None-Match: * on the lock
    assert statuses.count("built") == 1 and len(statuses) == 4


def test_build_engine_uses_the_cache(tmp_path, small_ckpt, images):
    first = build_engine(small_ckpt, "onnx", "fp32", "cpu", 1, cache_uri=str(tmp_path))
    second = build_engine(small_ckpt, "onnx", "fp32", "cpu", 1, cache_uri=str(tmp_path))
    assert first.cache == "onnx graph: built" and second.cache == "onnx graph: hit"
    assert np.allclose(first.engine.run(images)[0], second.engine.run(images)[0])


def test_auto_backend_on_cpu():
    assert resolve_backend("auto", "fp32", "cpu")[0] == "onnx"
    backend, why = resolve_backend("auto", "bf16", "cpu")
    assert backend == "torch" and "bf16" in why
    assert resolve_backend("torch", "fp32", "auto") == ("torch", "asked for in the job spec")


def test_onnx_refuses_bf16_on_cpu(small_ckpt):
    with pytest.raises(ValueError, match="only on a GPU"):
        OnnxEngine(small_ckpt, "bf16", "cpu", 1)


TRT_OK, TRT_WHY = tensorrt_available()


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT backend needs tensorrt and a CUDA GPU: {TRT_WHY}")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_engine_passes_the_gate(tmp_path, precision):
    ckpt = random_checkpoint("vit_s_16")
    x = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    built = build_engine(ckpt, "tensorrt", precision, "cuda", 1, max_batch=16, cache_uri=str(tmp_path))
    assert built.backend == "tensorrt"
    result = compare(TorchEngine(ckpt, "fp32", "cuda", 1), built.engine, x)
    assert result.passed, result.describe()
    again = build_engine(ckpt, "tensorrt", precision, "cuda", 1, max_batch=16, cache_uri=str(tmp_path))
    assert "plan: hit" in again.cache


@pytest.fixture(scope="module")
def digits():
    """The bundled digits model and real decoded digit images: (checkpoint, calibration, held-out)."""
    from pipeline.decode import decode_image
    from pipeline.demo import digit_jpegs

    ckpt = load_checkpoint("builtin:digits")
    x = np.stack([decode_image(data, ckpt.preprocess) for data, _ in digit_jpegs("test")[:192]])
    return ckpt, x[:64], x[64:]  # (N, 32, 32, 3) uint8


def _graph_ops(data: bytes) -> dict[str, int]:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load_from_string(data).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_int8_calibration_makes_a_symmetric_qdq_graph_that_passes_the_gate(tmp_path, digits):
    import onnx
    from onnx import numpy_helper

    from pipeline.engines.quantize import quantize_onnx

    ckpt, calibration, held_out = digits
    built = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path), calibration=calibration)
    assert built.engine.info.precision == "int8"
    assert "int8 Q/DQ graph (64 calibration images): built" in built.cache
    # What TensorRT consumes: every MatMul fed by Q/DQ pairs, int8 zero points all 0 (symmetric).
    q = quantize_onnx(onnx_bytes(ckpt), calibration, "int8")
    ops = _graph_ops(q)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["MatMul"] > 0
    graph = onnx.load_from_string(q).graph
    zero_points = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # Judged on images it was not calibrated on, against torch fp32.
    result = compare(TorchEngine(ckpt, "fp32", "cpu", 1), built.engine, held_out, min_cosine=0.995, min_top1=0.95)
    assert result.passed, result.describe()
    assert result.cosine_mean < 0.99999  # it really is quantized, not the fp32 graph under another name


def test_int8_cache_key_includes_the_calibration_batch(tmp_path, digits):
    ckpt, calibration, held_out = digits
    first = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path), calibration=calibration)
    again = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path), calibration=calibration)
    other = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path), calibration=held_out[:64])
    assert "Q/DQ graph (64 calibration images): built" in first.cache
    assert "Q/DQ graph (64 calibration images): hit" in again.cache
    assert "onnx graph: hit" in other.cache and "Q/DQ graph (64 calibration images): built" in other.cache
    assert np.array_equal(first.engine.run(held_out[:8])[1], again.engine.run(held_out[:8])[1])


def test_fp8_graph_for_tensorrt_runs_on_onnx_runtime(digits):
    """FP8 engines run only on TensorRT (compute capability >= 8.9); the graph it is built from is
    checked here: e4m3 Q/DQ pairs on both inputs of every MatMul, amax scales, and ONNX Runtime's
    (emulated) run of it close to torch fp32 on images it was not calibrated on."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from pipeline.engines.quantize import E4M3_MAX, quantize_onnx

    ckpt, calibration, held_out = digits
    q = quantize_onnx(onnx_bytes(ckpt), calibration, "fp8")
    model = onnx.load_from_string(q)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    by_output = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(by_output[i].op_type == "DequantizeLinear" for n in matmuls for i in n.input[:2])
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["fp8_zero_point"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    weight = next(i for n in matmuls for i in n.input[1:2] if i.endswith("/fp8_dq"))
    w_name = weight.removesuffix("/fp8_dq")
    if w_name in inits:  # a weight's scale is its own amax / 448
        amax = np.abs(numpy_helper.to_array(inits[w_name])).max()
        assert np.isclose(numpy_helper.to_array(inits[f"{w_name}/fp8_scale"]), amax / E4M3_MAX)
    emb = ort.InferenceSession(q, providers=["CPUExecutionProvider"]).run(["embeddings"], {"images": held_out})[0]
    ref = TorchEngine(ckpt, "fp32", "cpu", 1).run(held_out)[0]
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert 0.998 < cos.mean() < 0.99999, cos.mean()  # close to fp32, and really quantized


def test_quantized_precisions_name_their_backends(small_ckpt):
    from pipeline.config import EngineSpec

    with pytest.raises(ValueError, match="int8 runs on backend onnx or tensorrt"):
        EngineSpec(backend="torch", precision="int8")
    with pytest.raises(ValueError, match="fp8 runs only on backend tensorrt"):
        EngineSpec(backend="onnx", precision="fp8")
    assert EngineSpec(backend="auto", precision="fp8").precision == "fp8"
    assert resolve_backend("auto", "fp8", "cpu") == ("tensorrt", "auto: fp8 runs only as a TensorRT engine")
    if not TRT_OK:
        with pytest.raises(RuntimeError, match="fp8 needs TensorRT on a GPU"):
            build_engine(small_ckpt, "auto", "fp8", "cpu", 1, calibration=np.zeros((1, 64, 64, 3), np.uint8))
    assert resolve_backend("auto", "int8", "cpu")[0] == "onnx"
    with pytest.raises(ValueError, match="needs calibration images"):
        build_engine(small_ckpt, "onnx", "int8", "cpu", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT backend needs tensorrt and a CUDA GPU: {TRT_WHY}")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_quantized_from_the_calibrated_graph_passes_the_gate(tmp_path, digits, precision):
    from pipeline.engines.build import gpu_capability

    if precision == "fp8" and int(gpu_capability()[3:]) < 89:
        pytest.skip(f"fp8 needs compute capability >= 8.9; this GPU is {gpu_capability()}")
    ckpt, calibration, held_out = digits
    built = build_engine(ckpt, "tensorrt", precision, "cuda", 1, max_batch=32, cache_uri=str(tmp_path),
                         calibration=calibration)
    assert built.engine.info.precision == precision and "plan: built" in built.cache
    result = compare(TorchEngine(ckpt, "fp32", "cuda", 1), built.engine, held_out, min_cosine=0.995, min_top1=0.95)
    assert result.passed, result.describe()


def test_cache_put_replaces_an_entry_and_a_torn_replace_reads_as_a_miss(tmp_path):
    cache = EngineCache(str(tmp_path))
    key = CacheKey("any-model", "tensorrt-timing-cache", "10.0", "any", 0, "sm_90")
    cache.put(key, b"timings v1")
    cache.put(key, b"timings v2, longer")
    assert cache.load(key) == (b"timings v2, longer", "hit")
    (tmp_path / f"{key.name}.bin").write_bytes(b"timings v3")  # .bin replaced, .json not yet
    data, why = cache.load(key)
    assert data is None and why.startswith("checksum mismatch")


class _CountingEngine:
    """Wraps a real engine and records the size of every call it gets."""

    def __init__(self, engine, device: str | None = None):
        from dataclasses import replace

        self.engine, self.calls = engine, []
        self.info = replace(engine.info, device=device) if device else engine.info  # the work stays real
        self.embed_dim, self.num_classes = engine.embed_dim, engine.num_classes

    def run(self, images):
        self.calls.append(len(images))
        return self.engine.run(images)


def test_engine_calls_have_the_fixed_size_and_change_no_row(small_ckpt):
    """No tuning on the job's first images (it made them slower): every call has the call size,
    the last one shorter on a CPU and padded to the full shape on a GPU, and rows come back in
    order with the padding cut off."""
    from pipeline.engines.base import run_in_calls

    torch_engine = TorchEngine(small_ckpt, "fp32", "cpu", 1)
    x = np.random.default_rng(0).integers(0, 255, (37, 64, 64, 3), dtype=np.uint8)
    ref_emb, ref_logits = torch_engine.run(x)
    cpu = _CountingEngine(torch_engine)
    emb, logits = run_in_calls(cpu, x, 16)
    assert cpu.calls == [16, 16, 5]
    assert emb.shape == ref_emb.shape and np.abs(emb - ref_emb).max() < 1e-4
    assert np.abs(logits - ref_logits).max() < 1e-4
    gpu = _CountingEngine(torch_engine, device="cuda:0")
    emb, _ = run_in_calls(gpu, x, 16, pad=True)
    assert gpu.calls == [16, 16, 16] and emb.shape == ref_emb.shape and np.abs(emb - ref_emb).max() < 1e-4
    emb, logits = run_in_calls(cpu, x[:0], 16)  # a part whose every record failed
    assert emb.shape == (0, small_ckpt.config.dim) and logits.shape[0] == 0


def test_the_gate_waits_for_nothing_but_a_build_and_never_runs_in_a_driver_without_the_gpu():
    from pipeline.config import JobSpec
    from pipeline.gate import placement
    from pipeline.plan import Plan

    cpu, gpu = Plan(1, 1.75, 0.0, 2, 0.25), Plan(1, 1.0, 1.0, 1, 0.25)

    def spec(**engine) -> JobSpec:
        return JobSpec.model_validate({"name": "t", "source": {"uri": "/in"}, "model": {"arch": "vit_ti_16"},
                                       "engine": engine, "output": {"uri": "/out"}})

    # torch has nothing to build: on CPUs the check runs in the driver while the actors start,
    # on GPUs inside each model actor (no second GPU process just for the gate)
    assert placement(spec(precision="bf16"), cpu) == ("driver", "torch")
    assert placement(spec(backend="auto", precision="bf16"), cpu) == ("driver", "torch")  # auto -> torch
    assert placement(spec(precision="fp16"), gpu) == ("actors", "torch")
    # a build to cache first: ONNX export, int8 calibration, torch.compile
    assert placement(spec(backend="auto", precision="fp32"), cpu) == ("first", "onnx")
    assert placement(spec(backend="onnx", precision="int8"), cpu)[0] == "first"
    assert placement(spec(precision="bf16", compile=True), cpu)[0] == "first"
    assert placement(spec(precision="fp16", compile=True), gpu)[0] == "first"
    # auto on GPUs may mean TensorRT: resolved and built on a GPU worker, not by this driver
    assert placement(spec(backend="auto", precision="fp16"), gpu) == ("first", None)
    # asked for
    assert placement(spec(precision="bf16", gate={"placement": "actors"}), cpu) == ("actors", "torch")
    assert placement(spec(precision="bf16", gate={"placement": "first"}), cpu) == ("first", "torch")
    with pytest.raises(ValueError, match="placement: driver .* no GPU"):
        placement(spec(precision="fp16", gate={"placement": "driver"}), gpu)


def test_the_plan_decodes_on_the_gpu_or_gives_it_decode_actors_and_fits_every_actor():
    from pipeline.config import JobSpec
    from pipeline.plan import plan_resources

    def spec(engine: dict | None = None, **resources) -> JobSpec:
        return JobSpec.model_validate({"name": "t", "source": {"uri": "/in"}, "model": {"arch": "vit_ti_16"},
                                       "engine": engine or {}, "resources": resources, "output": {"uri": "/out"}})

    gpu_node, cpu_node = {"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0}
    # decode auto on a GPU: nvJPEG in the model actor, no decode actors; 4 readers; up to 4 CPUs for
    # the actor's CPU side (fallback decoding, Arrow, Parquet); call size 256
    p = plan_resources(spec(), [gpu_node])
    assert (p.actors, p.gpus_per_actor, p.decode, p.decoders, p.readers, p.cpus_per_actor, p.call_size) == \
        (1, 1.0, "gpu", 0, 4, 4.0, 256)
    # decode cpu: every CPU the model and read actors leave goes to decode actors, a reader per 3
    p = plan_resources(spec({"decode": "cpu"}), [gpu_node])  # 16 CPUs = 1 + 13 decoders + 5 readers x 0.25
    assert (p.actors, p.gpus_per_actor, p.cpus_per_actor, p.decoders, p.decode) == (1, 1.0, 1.0, 13, "cpu")
    assert p.read_actors(shards=100) == 5 and p.read_actors(shards=3) == 3
    assert p.buffer_mb(512) == int((1 + 13 / 4) * 512)  # room for the decoders' pixels too
    p = plan_resources(spec({"decode": "cpu"}), [gpu_node, gpu_node, cpu_node])  # 34 = 2 + 29 + 10 x 0.25
    assert (p.actors, p.decoders, p.read_actors(100)) == (2, 29, 10)
    assert plan_resources(spec(decode_actors=3), [gpu_node]).decoders == 3
    # CPUs only: decoding inside the model actors; a reader per actor, reserving nothing by default
    p = plan_resources(spec(), [cpu_node, cpu_node])
    assert (p.actors, p.gpus_per_actor, p.cpus_per_actor, p.decoders, p.call_size) == (2, 0.0, 2.0, 0, 32)
    assert p.read_actors(shards=100) == 2 and p.read_cpus == 0 and p.buffer_mb(512) == 1024
    p = plan_resources(spec(decode_actors=2), [{"CPU": 4.0}, {"CPU": 4.0}])  # asked for: CPUs come off the actors
    assert (p.actors, p.cpus_per_actor, p.decoders) == (2, 3.0, 2)
    # readers that reserve CPUs: each node keeps room for its share, so every actor fits at once
    p = plan_resources(spec(readers=4, read_cpus=0.25), [cpu_node, cpu_node])
    assert (p.readers, p.cpus_per_actor, p.threads) == (4, 1.5, 2)
    assert p.actors * p.cpus_per_actor + p.readers * p.read_cpus <= 4.0
    assert plan_resources(spec({"batch_size": 48}), [cpu_node]).call_size == 48
    with pytest.raises(ValueError, match="decode gpu: the cluster has no GPU"):
        plan_resources(spec({"decode": "gpu"}), [cpu_node])


def test_the_cpu_call_size_keeps_activations_cache_sized():
    """No tuning on the job's first images: the call size follows from the model's shape."""
    from pipeline.config import JobSpec
    from pipeline.model.checkpoints import load_checkpoint
    from pipeline.model.vit import config_for_arch
    from pipeline.plan import call_size

    spec = JobSpec.model_validate({"source": {"uri": "/in"}, "output": {"uri": "/out"}})
    assert call_size(spec, False, config_for_arch("vit_ti_16")) == 32  # measured best on the 2-core box
    assert call_size(spec, False, config_for_arch("vit_b_16")) == 16
    assert call_size(spec, False, load_checkpoint("builtin:digits").config) == 256  # 817 images/s vs 447 at 32
    assert call_size(spec, True, config_for_arch("vit_b_16")) == 256
    asked = JobSpec.model_validate({"source": {"uri": "/in"}, "output": {"uri": "/out"}, "engine": {"batch_size": 8}})
    assert call_size(asked, False, config_for_arch("vit_ti_16")) == 8


def test_a_runs_gate_is_settled_before_the_first_row_counts():
    """RunCheck during a run: an actor's figures settle it with that actor's first part; with the
    check in a driver thread, the first part waits for that thread and a miss there stops the run;
    a part from an actor that sent no figures is a bug, said so; a run whose parts never reached an
    actor still reports a check."""
    import json
    from concurrent.futures import Future

    from pipeline.gate import GateError, RunCheck

    figures = {"engine": "torch-cpu-bf16", "samples": 8, "cosine_mean": 0.9995, "cosine_min": 0.999,
               "top1_agreement": 1.0, "min_cosine": 0.999, "min_top1": 0.99, "passed": True}
    actors = RunCheck("actors", "torch", None, None, actor_images=None)
    with pytest.raises(RuntimeError, match="sent no engine check first .* bug"):
        actors.see(None)
    actors.see(json.dumps({"backend": "torch", "reason": "r", "cache": "", "gate": figures}))
    assert actors.result["gate"]["passed"] and actors.final("auto") is actors.result
    actors.see(None)  # later parts: settled already

    missed = Future()
    missed.set_result({"backend": "torch", "reason": "r", "cache": "", "gate": figures | {"passed": False,
                                                                                         "cosine_mean": 0.98}})
    driver = RunCheck("driver", "torch", missed, None, actor_images=None)
    with pytest.raises(GateError, match="FAILED .* cosine mean 0.98000"):
        driver.see(None)
    assert RunCheck("actors", None, None, None, None).final("auto")["reason"] == "no part reached a model actor"
