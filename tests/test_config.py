"""Job specs: bad ones fail before any Ray work with the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobSpecError, describe_spec, load_job_spec

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"source": {"uri": "s3://bucket/shards/"}, "output": {"uri": "s3://bucket/out/"}}


def _write(tmp_path, data) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", ["label.yaml", "embed.yaml", "label-gpu.yaml", "clip-embed.yaml",
                                  "dinov2-dedup.yaml", "zero-shot.yaml"])
def test_example_specs_are_valid(name):
    spec = load_job_spec(ROOT / "jobs" / name)
    assert spec.source.uri and spec.output.uri


def test_defaults_and_overrides(tmp_path):
    spec = load_job_spec(_write(tmp_path, GOOD), ["engine.batch_size=64", "outputs.embedding_dtype=float16",
                                                  "model.checkpoint=null", "model.arch=vit_s_16"])
    assert spec.engine.batch_size == 64 and spec.outputs.embedding_dtype == "float16"
    assert spec.model.checkpoint is None and spec.model.arch == "vit_s_16"
    assert spec.output.mode == "error" and spec.source.format == "webdataset"


def test_read_actors_keep_their_old_name(tmp_path):
    """resources.max_shards_in_flight became resources.readers (it counts read actors, not shards);
    specs written with the old name still mean the same."""
    old = load_job_spec(_write(tmp_path, {**GOOD, "resources": {"max_shards_in_flight": 3}}))
    new = load_job_spec(_write(tmp_path, GOOD), ["resources.readers=5"])
    assert old.resources.readers == 3 and new.resources.readers == 5
    assert "readers" in new.model_dump()["resources"] and "max_shards_in_flight" not in new.model_dump()["resources"]


@pytest.mark.parametrize("patch,expect", [
    ({"engine": {"precision": "int4"}}, ["engine.precision", "'fp32', 'bf16', 'fp16', 'int8' or 'fp8'", "int4"]),
    ({"engine": {"batchsize": 8}}, ["engine.batchsize: unknown key"]),
    ({"source": {"uri": "x", "format": "zip"}}, ["source.format", "'webdataset', 'images' or 'parquet'"]),
    ({"outputs": {"top_k": -1}}, ["outputs.top_k", "greater than or equal to 0"]),
    ({"model": {"arch": "vit_q_16", "checkpoint": None}}, ["model.arch", "unknown arch", "vit_ti_16"]),
    ({"model": {"checkpoint": None}}, ["set model.checkpoint, or model.arch"]),
    ({"output": None}, ["output"]),
])
def test_bad_specs_name_the_key(tmp_path, patch, expect):
    data = {**GOOD, **patch}
    with pytest.raises(JobSpecError) as e:
        load_job_spec(_write(tmp_path, data))
    for words in expect:
        assert words in str(e.value)


def test_missing_required_sections(tmp_path):
    with pytest.raises(JobSpecError, match=r"source: Field required[\s\S]*output: Field required"):
        load_job_spec(_write(tmp_path, {"name": "x"}))


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(JobSpecError, match="expected key.path=value"):
        load_job_spec(_write(tmp_path, GOOD), ["engine.batch_size"])
    p = tmp_path / "broken.yaml"
    p.write_text("source: [unclosed")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job_spec(p)


def test_spec_reference_lists_every_field():
    ref = describe_spec()
    for key in ("source.uri", "source.format", "model.checkpoint", "model.pooling", "engine.precision",
                "engine.batch_size", "outputs.top_k", "outputs.embedding_dtype", "output.uri", "output.mode",
                "resources.actors", "resources.cpus_per_actor", "resources.gpus_per_actor"):
        assert f"  {key}:" in ref


def test_cli_rejects_bad_spec_before_starting_ray(tmp_path):
    p = _write(tmp_path, {**GOOD, "engine": {"precision": "int4"}})
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "engine.precision" in r.stderr and "int4" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.time() - t < 60


def test_outputs_normalize_is_auto_true_or_false_and_auto_follows_the_family(tmp_path):
    spec = load_job_spec(_write(tmp_path, GOOD))
    assert spec.outputs.normalize == "auto"
    assert [spec.outputs.normalizes(f) for f in ("clip", "siglip", "dinov2", "vit", "deit")] == [True, True, False,
                                                                                                False, False]
    off = load_job_spec(_write(tmp_path, GOOD), ["outputs.normalize=false"])
    assert off.outputs.normalize is False and not off.outputs.normalizes("clip")
    assert load_job_spec(_write(tmp_path, GOOD), ["outputs.normalize=true"]).outputs.normalizes("dinov2")
    with pytest.raises(JobSpecError, match="outputs.normalize"):
        load_job_spec(_write(tmp_path, GOOD), ["outputs.normalize=sometimes"])


def test_family_archs_and_poolings_are_accepted_and_a_typo_is_named(tmp_path):
    spec = load_job_spec(_write(tmp_path, GOOD), ["model.checkpoint=null", "model.arch=dinov2_l_14_reg",
                                                  "model.pooling=cls+gap"])
    assert spec.model.arch == "dinov2_l_14_reg" and spec.model.pooling == "cls+gap"
    with pytest.raises(JobSpecError, match="unknown arch 'clip_b_17'.*clip_b_16"):
        load_job_spec(_write(tmp_path, GOOD), ["model.checkpoint=null", "model.arch=clip_b_17"])
