"""End to end on real parts: SeaweedFS S3 + a two-node Ray cluster -> Parquet read back by DuckDB/Polars."""

from __future__ import annotations

import json

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobSpec
from pipeline.demo import digit_jpegs, write_shards
from pipeline.model.checkpoints import load_model
from pipeline.runner import run_job
from pipeline.sink import OutputExistsError

from helpers import bad_input_members, image_bytes, tar_bytes

pytestmark = pytest.mark.heavy


def _spec(src: str, out: str, **sections) -> JobSpec:
    data = {"name": "test", "source": {"uri": src}, "model": {"checkpoint": "builtin:digits"},
            "engine": {"batch_size": 32}, "outputs": {"top_k": 3}, "output": {"uri": out},
            "ray": {"progress": False}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return JobSpec.model_validate(data)


def _duck(s3) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register_filesystem(s3)  # DuckDB reads s3:// through the same fsspec filesystem, no extension download
    return con


def test_s3_two_nodes_end_to_end(ray_cluster, s3):
    bucket = "vitpipe-e2e"
    s3.mkdir(bucket)
    digits = digit_jpegs("test")
    write_shards(digits, f"s3://{bucket}/shards", n_shards=5)
    # One more shard of larger photos-like JPEGs (mixed sizes; no labels) to exercise resize paths.
    big = [(f"photo-{i}.jpg", image_bytes(200 + 97 * i, 150 + 61 * i, seed=i)) for i in range(12)]
    s3.pipe(f"{bucket}/shards/photos-00000.tar", tar_bytes(big))
    s3.invalidate_cache()

    report = run_job(_spec(f"s3://{bucket}/shards/", f"s3://{bucket}/out/"))

    total = len(digits) + len(big)
    assert report.records_read == total == report.ok_rows + report.error_rows
    assert report.error_rows == 0 and report.actors == 2 and report.shards == 6
    assert report.top1_accuracy is not None and report.top1_accuracy > 0.9

    s3.invalidate_cache()
    assert s3.exists(f"{bucket}/out/_SUCCESS")
    # No pending files left behind (SeaweedFS may keep an empty directory entry; it holds nothing).
    assert [p for p in s3.find(f"{bucket}/out/_pending") if p.endswith(".parquet")] == []
    manifest = json.loads(s3.cat(f"{bucket}/out/_manifest.json"))
    con = _duck(s3)
    rows = con.sql(f"SELECT key, label, topk_ids[1] AS top1, len(embedding) AS d, len(topk_labels) AS k "
                   f"FROM read_parquet('s3://{bucket}/out/part-*.parquet')").fetchall()
    assert len(rows) == total
    assert len({r[0] for r in rows}) == total  # every key exactly once
    assert {r[3] for r in rows} == {96} and {r[4] for r in rows} == {3}
    labeled = [r for r in rows if r[1] is not None]
    assert len(labeled) == len(digits)
    assert sum(r[1] == r[2] for r in labeled) / len(labeled) > 0.9
    assert sum(f["rows"] for f in manifest["files"] if f["kind"] == "ok") == total
    assert manifest["counts"] == {"records": total, "ok": total, "errors": 0, "skipped": 0}
    # The schema is portable: a plain fixed_size_list, provenance in the key-value metadata.
    ok_file = next(f for f in manifest["files"] if f["kind"] == "ok")["path"]
    with s3.open(f"{bucket}/out/{ok_file}") as f:
        schema = pq.read_schema(f)
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[96]"
    assert schema.metadata[b"vitpipe.model_id"].decode() == manifest["model"]["id"]
    assert len(manifest["files"]) == 6  # one file per shard, not one per block


def test_bad_input_shard_is_confined_to_its_records(ray_cluster, s3):
    bucket = "vitpipe-bad"
    s3.mkdir(bucket)
    members, expected_errors, expected_ok = bad_input_members()
    s3.pipe(f"{bucket}/in/bad-00000.tar", tar_bytes(members))
    s3.pipe(f"{bucket}/in/good-00001.tar", tar_bytes([(f"fine{i}.png", image_bytes(40, 40, "PNG", seed=i))
                                                       for i in range(5)]))
    s3.invalidate_cache()
    report = run_job(_spec(f"s3://{bucket}/in/", f"s3://{bucket}/out/"))

    con = _duck(s3)
    ok = {r[0] for r in con.sql(f"SELECT key FROM 's3://{bucket}/out/part-*.parquet'").fetchall()}
    errs = con.sql(f"SELECT key, error_stage, error_type, error_message, source_uri "
                   f"FROM 's3://{bucket}/out/errors/part-*.parquet'").fetchall()
    assert ok == expected_ok | {f"fine{i}" for i in range(5)}
    got = {(k, t) for k, _, t, _, _ in errs}
    assert got == set(expected_errors.items())
    for key, stage, _, message, source in errs:
        assert stage in ("read", "decode") and len(message) > 10 and source.endswith("bad-00000.tar"), key
    assert report.records_read == len(ok) + len(errs) == report.ok_rows + report.error_rows
    assert report.skipped_members == {"NoImageMember": 2}
    assert report.errors_by_type["UnsafeMember"] == 3


def test_a_decode_stage_gives_the_same_rows_as_decoding_in_the_model_actor(ray_cluster, tmp_path):
    """The GPU layout (decode actors between the readers and the model actor), run on CPUs:
    same keys, same errors, same predictions as the CPU layout that decodes inside the actor."""
    members, expected_errors, _ = bad_input_members()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad-00000.tar").write_bytes(tar_bytes(members))
    write_shards(digit_jpegs("test")[:70], str(tmp_path / "in"), n_shards=2)
    fused = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "fused")))
    staged = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "staged"),
                           resources={"decode_actors": 1, "actors": 1, "cpus_per_actor": 0.5}))
    assert staged.records_read == fused.records_read and staged.error_rows == fused.error_rows == len(expected_errors)
    assert staged.errors_by_type == fused.errors_by_type
    a = pl.read_parquet(str(tmp_path / "fused" / "part-*.parquet")).sort("key")
    b = pl.read_parquet(str(tmp_path / "staged" / "part-*.parquet")).sort("key")
    assert a["key"].to_list() == b["key"].to_list() and a.height == fused.ok_rows
    assert a["topk_ids"].to_list() == b["topk_ids"].to_list()
    assert abs(a["embedding"].to_numpy() - b["embedding"].to_numpy()).max() < 1e-4
    errors = [pl.read_parquet(str(tmp_path / d / "errors" / "part-*.parquet")).sort("key")
              .select("key", "error_stage", "error_type") for d in ("fused", "staged")]
    assert errors[0].to_dicts() == errors[1].to_dicts()
    assert {(r["key"], r["error_type"]) for r in errors[1].to_dicts()} == set(expected_errors.items())


def test_rerun_same_output_refuses_then_replaces(ray_cluster, tmp_path):
    write_shards(digit_jpegs("test")[:60], str(tmp_path / "in"), n_shards=2)
    out = tmp_path / "out"
    first = run_job(_spec(str(tmp_path / "in"), str(out)))
    before = sorted(p.name for p in out.glob("part-*.parquet"))
    manifest_before = (out / "_manifest.json").read_text()

    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        run_job(_spec(str(tmp_path / "in"), str(out)))
    assert (out / "_manifest.json").read_text() == manifest_before  # untouched
    assert sorted(p.name for p in out.glob("part-*.parquet")) == before

    second = run_job(_spec(str(tmp_path / "in"), str(out), output={"mode": "full"}))
    assert second.run_id != first.run_id
    df = pl.read_parquet(str(out / "part-*.parquet"))
    assert df.height == 60 and df["key"].n_unique() == 60  # replaced, not appended
    after = sorted(p.name for p in out.glob("part-*.parquet"))
    assert not set(after) & set(before)  # the old run's files are gone
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == second.run_id
    assert not (out / "_pending").exists()
    # Same job, same inputs: the same rows (keys, labels, predictions).
    old_rows = sorted(first_rows := [(r["key"], r["topk_ids"][0]) for r in df.to_dicts()])
    assert len(old_rows) == len(first_rows) == 60


@pytest.mark.parametrize("placement", ["auto", "actors"])
def test_float16_gap_embeddings_only(ray_cluster, tmp_path, placement):
    write_shards(digit_jpegs("test")[:40], str(tmp_path / "in"), n_shards=2)
    out = tmp_path / "emb"
    report = run_job(_spec(str(tmp_path / "in"), str(out), model={"pooling": "gap"},
                           outputs={"top_k": 0, "embedding_dtype": "float16"},
                           engine={"precision": "bf16", "gate": {"placement": placement}}))
    assert report.ok_rows == 40 and report.error_rows == 0 and report.actors == 2
    # bf16 on CPU: the gate ran beside the actors' start (auto: in the driver) or inside each of the
    # two actors, whose figures came ahead of their rows; either way they reached the report
    assert report.engine == "torch-cpu-bf16" and report.gate["passed"] and report.gate["samples"] == 40
    check = json.loads((out / "_manifest.json").read_text())["engine_check"]
    assert check["gate"]["cosine_mean"] > 0.999 and check["backend"] == "torch"
    assert check["engine"].startswith("torch-cpu-bf16")
    assert not [p for p in out.rglob("*.parquet") if "errors" in p.parts]  # no check marker reached the output
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert str(schema.field("embedding").type) == "fixed_size_list<element: halffloat>[96]"
    assert "topk_ids" not in schema.names
    df = pl.read_parquet(str(out / "part-*.parquet"))
    assert df.height == 40 and df["embedding"].dtype.size == 96


def test_a_model_actor_sends_its_engine_check_with_every_call_and_refuses_after_a_miss(ray_cluster, tmp_path):
    """engine.gate.placement actors: each model actor checks its own engine and the driver accepts
    no row before it holds a check. The driver can get an actor's calls out of order (Ray Data
    hands on whichever finished call it polls first: a CI run of the float16 test failed so), so
    every call's first part carries the figures; and an actor whose check missed refuses every
    call, not only its first (a retried call must not write rows either)."""
    from pipeline.gate import GateError, gate_images
    from pipeline.predict import Predictor
    from pipeline.sources import list_shards, part_row, read_parts

    write_shards(digit_jpegs("test")[:40], str(tmp_path / "in"), n_shards=2)
    spec = _spec(str(tmp_path / "in"), str(tmp_path / "o"), engine={"precision": "bf16", "gate": {"placement": "actors"}})
    shards = list_shards(spec.source)
    images = gate_images(spec, shards, load_model(spec.model).preprocess, spec.engine.gate.samples)
    writer = {"uri": str(tmp_path / "o"), "run_id": "r", "metadata": {}, "row_group_rows": 100}
    actor = Predictor(spec.model_dump(), threads=1, call_size=16, decode="cpu", writer=writer, backend="torch",
                      gate_images=images)
    calls = [part_row(p) for s in shards for p in read_parts(s, spec.source)]
    assert len(calls) == 2
    for out in (actor(calls[1]), actor(calls[0])):  # either order
        check = json.loads(out.column("check")[0].as_py())
        assert check["gate"]["passed"] and check["gate"]["samples"] == len(images)
    actor.check = actor.check | {"gate": actor.check["gate"] | {"passed": False}}  # as if the engine had missed
    for call in calls:
        with pytest.raises(GateError):
            actor(call)


def test_onnx_backend_matches_torch_end_to_end(ray_cluster, tmp_path):
    write_shards(digit_jpegs("test")[:48], str(tmp_path / "in"), n_shards=2)
    cache = str(tmp_path / "engines")
    torch_run = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "t")))
    onnx_run = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "o"), engine={"backend": "onnx", "cache_uri": cache}))
    assert onnx_run.engine == "onnx-cpu-fp32" and torch_run.engine == "torch-cpu-fp32"
    assert onnx_run.gate["passed"] and onnx_run.gate["cosine_min"] > 0.9999
    a = pl.read_parquet(str(tmp_path / "t" / "part-*.parquet")).sort("key")
    b = pl.read_parquet(str(tmp_path / "o" / "part-*.parquet")).sort("key")
    assert a["key"].to_list() == b["key"].to_list()
    diff = (a["embedding"].to_numpy() - b["embedding"].to_numpy())
    assert abs(diff).max() < 1e-4
    manifest = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert manifest["engine_check"]["backend"] == "onnx" and manifest["engine_check"]["gate"]["passed"]
    assert any(p.name.endswith(".bin") for p in (tmp_path / "engines").iterdir())  # the cached graph


def test_int8_is_calibrated_on_the_jobs_images_gated_and_labels_them(ray_cluster, tmp_path):
    import numpy as np
    import ray

    from pipeline.engines.build import build_engine
    from pipeline.predict import Predictor

    write_shards(digit_jpegs("test")[:160], str(tmp_path / "in"), n_shards=2)
    spec = _spec(str(tmp_path / "in"), str(tmp_path / "o"),
                 engine={"backend": "onnx", "precision": "int8", "cache_uri": str(tmp_path / "engines"),
                         "calibration_samples": 48, "gate": {"samples": 64, "min_cosine": 0.995, "min_top1": 0.95}})
    report = run_job(spec)
    assert report.engine == "onnx-cpu-int8" and report.ok_rows == 160 and report.top1_accuracy > 0.9
    assert report.gate["passed"] and report.gate["samples"] == 64  # the 64 images after the 48 calibrated on
    check = json.loads((tmp_path / "o" / "_manifest.json").read_text())["engine_check"]
    assert check["calibration_images"] == 48 and "int8 Q/DQ graph (48 calibration images)" in check["cache"]
    keys = duckdb.sql(f"SELECT count(DISTINCT key) FROM '{tmp_path}/o/part-*.parquet'").fetchall()
    assert keys == [(160,)]
    # An actor on a node whose cache misses builds the same graph from the calibration batch it is handed.
    from pipeline.gate import gate_images
    from pipeline.sources import list_shards

    ckpt = load_model(spec.model)
    cal = gate_images(spec, list_shards(spec.source), ckpt.preprocess, 48)
    job = spec.model_copy(update={"engine": spec.engine.model_copy(update={"cache_uri": str(tmp_path / "other")})})
    writer = {"uri": str(tmp_path / "w"), "run_id": "r", "metadata": {}, "row_group_rows": 100}
    actor = Predictor(job.model_dump(), threads=1, call_size=16, decode="cpu", writer=writer, backend="onnx",
                      calibration=ray.put(cal))
    cached = build_engine(ckpt, "onnx", "int8", "cpu", 1, cache_uri=str(tmp_path / "engines"), calibration=cal)
    assert "Q/DQ graph (48 calibration images): hit" in cached.cache
    x = np.asarray(cal[:16])
    assert np.array_equal(actor.engine.run(x)[1], cached.engine.run(x)[1])


def test_a_nightly_int8_run_finds_the_graph_calibrated_the_night_before(ray_cluster, tmp_path):
    """Calibration and gate images come from the first listed shards, not the shards to do: an
    incremental run that only does the new shard calibrates on the same images, so its cached
    int8 graph (a TensorRT plan on a GPU: minutes to build) is found instead of built again."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(digit_jpegs("test")[:64], str(src), n_shards=2)
    engine = {"backend": "onnx", "precision": "int8", "cache_uri": str(tmp_path / "engines"),
              "calibration_samples": 32, "gate": {"samples": 32, "min_cosine": 0.995, "min_top1": 0.9}}
    first = run_job(_spec(str(src), str(out), engine=engine, output={"mode": "incremental"}))
    check1 = json.loads((out / "_manifest.json").read_text())["engine_check"]
    write_shards(digit_jpegs("test")[64:96], str(src), n_shards=1, prefix="later")  # tomorrow's new shard
    second = run_job(_spec(str(src), str(out), engine=engine, output={"mode": "incremental"}))
    check2 = json.loads((out / "_manifest.json").read_text())["engine_check"]
    assert (first.shards_processed, second.shards_processed, second.shards_unchanged) == (2, 1, 2)
    assert check1["cache"].endswith(": built") and check2["cache"].endswith(": hit"), (check1, check2)
    assert check2["gate"] == check1["gate"]  # the same engine on the same images
    keys = duckdb.sql(f"SELECT count(DISTINCT key), count(*) FROM '{out}/part-*.parquet'").fetchall()
    assert keys == [(96, 96)]


@pytest.mark.parametrize("placement", ["driver", "actors"])
def test_gate_miss_stops_the_job_before_any_output(ray_cluster, tmp_path, placement):
    from pipeline.gate import GateError

    write_shards(digit_jpegs("test")[:32], str(tmp_path / "in"), n_shards=1)
    out = tmp_path / "out"
    with pytest.raises(GateError, match=r"FAILED .* cosine mean 0\.9\d+ .*need >= 1\.0.* higher precision"):
        run_job(_spec(str(tmp_path / "in"), str(out),
                      engine={"precision": "bf16", "gate": {"min_cosine": 1.0, "placement": placement}}))
    # The gate ran beside the actors' start or inside the actor, but no row reached the sink:
    # nothing committed and nothing staged that a later run could adopt.
    assert not (out / "_SUCCESS").exists() and not list(out.rglob("*.parquet"))


@pytest.mark.parametrize("fmt", ["hf_dir", "jax_npz"])
def test_an_hf_directory_or_a_jax_npz_labels_real_images_through_a_job_spec(ray_cluster, tmp_path, fmt):
    """The trained digits model written as a transformers directory (save_pretrained) and as a
    google-research .npz, each named in model.checkpoint of a job spec that labels real images."""
    pytest.importorskip("transformers")
    from test_checkpoints import hf_from_ours, jax_npz

    from pipeline.demo import LABELS
    from pipeline.model.checkpoints import load_checkpoint

    hf = hf_from_ours(load_checkpoint("builtin:digits"), LABELS)
    if fmt == "hf_dir":
        hf.save_pretrained(tmp_path / "vit-digits")
        (tmp_path / "vit-digits" / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 32, "width": 32}}))
        model = {"checkpoint": str(tmp_path / "vit-digits")}
    else:
        (tmp_path / "ViT-digits.npz").write_bytes(jax_npz(hf))
        (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
        model = {"checkpoint": str(tmp_path / "ViT-digits.npz"), "labels": str(tmp_path / "labels.txt")}
    write_shards(digit_jpegs("test")[:120], str(tmp_path / "in"), n_shards=2)
    report = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "out"), model=model))
    assert report.model_source == model["checkpoint"] and report.ok_rows == 120
    assert report.top1_accuracy > 0.9  # the same weights and preprocessing as the demo model (0.98)
    names = pl.read_parquet(str(tmp_path / "out" / "part-*.parquet"))["topk_labels"].list.first().unique().to_list()
    assert set(names) <= set(LABELS) and len(names) > 5


def test_a_timm_file_labels_real_images_through_a_job_spec(ray_cluster, tmp_path):
    """A plain timm-layout state dict (no vitpipe metadata) named in model.checkpoint, with labels from a file."""
    from safetensors.torch import save_file

    from pipeline.demo import LABELS
    from pipeline.model.checkpoints import load_checkpoint

    demo = load_checkpoint("builtin:digits")
    save_file({k: v.contiguous() for k, v in demo.state_dict.items()}, str(tmp_path / "vit_digits_timm.safetensors"))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    write_shards(digit_jpegs("test")[:120], str(tmp_path / "in"), n_shards=2)
    report = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "out"),
                           model={"checkpoint": str(tmp_path / "vit_digits_timm.safetensors"), "heads": 4,
                                  "labels": str(tmp_path / "labels.txt")}))
    assert report.model_source.endswith("vit_digits_timm.safetensors")
    assert report.top1_accuracy > 0.8  # timm's default crop preprocessing, not the demo's squash: a little lower
    names = pl.read_parquet(str(tmp_path / "out" / "part-*.parquet"))["topk_labels"].list.first().unique().to_list()
    assert set(names) <= set(LABELS)


def test_parts_are_written_by_the_actors_and_the_driver_only_counts_them(ray_cluster, s3, monkeypatch):
    """Shards cut into parts of 16: each part is one file written by the model actor that made its
    rows, on either node; the driver receives one small record per part, never a row."""
    import pipeline.sink as sink

    bucket = "vitpipe-parts"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:90], f"s3://{bucket}/in", n_shards=2)  # 45 records each: 3 parts
    received: list[int] = []
    add = sink.ParquetSink.add
    monkeypatch.setattr(sink.ParquetSink, "add", lambda self, r: (received.append(len(json.dumps(r))), add(self, r)))
    report = run_job(_spec(f"s3://{bucket}/in", f"s3://{bucket}/out", source={"records_per_part": 16}))
    assert report.records_read == report.ok_rows == 90
    assert len(received) == 6 and max(received) < 2000  # 6 parts; 90 rows of 96 floats would be > 60 KB
    import ray

    nodes = {n["NodeID"][:8] for n in ray.nodes()}
    assert sum(report.parts_by_node.values()) == 6  # each written where it was made, on a cluster node
    assert {n.split(":")[1] for n in report.parts_by_node} <= nodes
    s3.invalidate_cache()
    manifest = json.loads(s3.cat(f"{bucket}/out/_manifest.json"))
    assert sorted(f["rows"] for f in manifest["files"]) == [13, 13, 16, 16, 16, 16]
    keys = _duck(s3).sql(f"SELECT key FROM read_parquet('s3://{bucket}/out/part-*.parquet')").fetchall()
    assert len(keys) == 90 and len({k[0] for k in keys}) == 90


def test_a_cut_or_unreadable_shard_is_an_error_row_and_the_job_goes_on(ray_cluster, s3):
    """Beside good shards: a tar cut in the middle of a member (an upload in progress), random bytes
    named .tar and a zero-byte .tar. The records before each fault stay ok rows, each fault is one
    error row naming the shard and the fix, the report counts the bad shards, and the ledger keeps
    the shard as cut short; once it is rewritten (new ETag) the next incremental run reads it again."""
    bucket = "vitpipe-faults"
    s3.mkdir(bucket)
    import io

    import webdataset as wds

    good = digit_jpegs("test")[:60]
    write_shards(good[:40], f"s3://{bucket}/in", n_shards=2, prefix="good")
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:  # the shard as the webdataset library writes it
        for i, (data, y) in enumerate(good[40:50]):
            tar.write({"__key__": f"cut-{i}", "jpg": data, "cls": str(y).encode()})
    whole = buf.getvalue()
    cut_at = whole.index(b"cut-7.jpg") + 512 + 100  # 100 bytes into the 8th member's data
    s3.pipe(f"{bucket}/in/cut.tar", whole[:cut_at])
    s3.pipe(f"{bucket}/in/random.tar", bytes(range(256)) * 20)
    s3.pipe(f"{bucket}/in/empty.tar", b"")
    s3.invalidate_cache()
    spec = _spec(f"s3://{bucket}/in", f"s3://{bucket}/out", output={"mode": "incremental"})
    report = run_job(spec)
    assert report.bad_shards == {"TruncatedShard": 1, "UnreadableShard": 2}
    assert report.ok_rows == 40 + 7 and report.records_read == report.ok_rows + report.error_rows == 50
    con = _duck(s3)
    errs = con.sql(f"SELECT key, error_stage, error_type, error_message FROM "
                   f"'s3://{bucket}/out/errors/part-*.parquet' ORDER BY key").fetchall()
    assert [(k.rsplit("/", 1)[1], stage, t) for k, stage, t, _ in errs] == [
        ("cut.tar#shard", "read", "TruncatedShard"), ("empty.tar#shard", "read", "UnreadableShard"),
        ("random.tar#shard", "read", "UnreadableShard")]
    assert "after member 'cut-7.cls'" in errs[0][3] and "rewrite the shard" in errs[0][3]
    cut_keys = con.sql(f"SELECT key FROM 's3://{bucket}/out/part-*.parquet' WHERE key LIKE 'cut-%'").fetchall()
    assert sorted(k[0] for k in cut_keys) == [f"cut-{i}" for i in range(7)]
    s3.invalidate_cache()
    ledger = [json.loads(s3.cat(p)) for p in s3.glob(f"{bucket}/out/_ledger/*.json")]
    assert sorted(e["fault"] or "" for e in ledger) == ["", "", "TruncatedShard", "UnreadableShard",
                                                        "UnreadableShard"]
    # the upload finishes: the shard is whole now (a new ETag), and only it is read again
    s3.pipe(f"{bucket}/in/cut.tar", whole)
    s3.invalidate_cache()
    again = run_job(spec)
    assert (again.shards_processed, again.shards_unchanged) == (1, 4) and again.bad_shards == {}
    assert again.ok_rows == 10
    keys = con.sql(f"SELECT key FROM 's3://{bucket}/out/part-*.parquet' WHERE key LIKE 'cut-%'").fetchall()
    assert sorted(k[0] for k in keys) == [f"cut-{i}" for i in range(10)]
    manifest = json.loads(s3.cat(f"{bucket}/out/_manifest.json"))
    assert manifest["totals"]["ok"] == 50 and manifest["totals"]["errors"] == 2


def test_an_imagefolder_tree_is_labeled_by_its_folder_names(ray_cluster, tmp_path):
    """ImageNet's layout, CLASS/NAME.JPEG: folders named like the model's labels ('seven'), or by class
    index ('3'), give the ground truth; a folder that maps to nothing ('cats') is counted and named,
    its images unlabeled, not guessed."""
    from collections import defaultdict

    from pipeline.demo import LABELS

    by_class = defaultdict(list)
    for data, y in digit_jpegs("test")[:150]:
        by_class[y].append(data)
    root = tmp_path / "tree"
    for y, images in by_class.items():
        folder = root / (str(y) if y == 3 else LABELS[y].upper() if y == 5 else LABELS[y])  # 'FIVE': any case
        folder.mkdir(parents=True)
        for i, data in enumerate(images):
            (folder / f"img{i:04d}.JPEG").write_bytes(data)
    (root / "cats").mkdir()
    for i in range(4):
        (root / "cats" / f"cat{i}.JPEG").write_bytes(image_bytes(64, 64, seed=i))
    report = run_job(_spec(str(root), str(tmp_path / "out"),
                           source={"format": "images", "images_per_shard": 50, "label_from": "folder"}))
    assert report.ok_rows == 154 and report.labeled == 150  # the cats have no label
    assert report.top1_accuracy > 0.9  # the bundled model on held-out digits, judged by folder names
    assert report.labels == {"from": "folder", "names": 11, "mapped": 10, "unmapped": {"cats": 4}}
    rows = pl.read_parquet(str(tmp_path / "out" / "part-*.parquet"))
    sevens = rows.filter(pl.col("key").str.starts_with("seven/"))
    assert sevens.height == len(by_class[7]) and set(sevens["label"].to_list()) == {7}
    assert set(rows.filter(pl.col("key").str.starts_with("3/"))["label"].to_list()) == {3}
    assert rows.filter(pl.col("key").str.starts_with("cats/"))["label"].null_count() == 4


def test_hugging_face_datasets_parquet_with_classlabel_names(ray_cluster, tmp_path):
    """Parquet written by the `datasets` library: the image column is struct<bytes, path>, the label a
    ClassLabel whose names live in the schema's metadata. Its names map to the model's classes by
    name (here in another order than the model's), and a file whose images are paths beside it
    (bytes null) is read too."""
    datasets = pytest.importorskip("datasets")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.demo import LABELS

    order = LABELS[::-1]  # the dataset's class ids are not the model's
    samples = digit_jpegs("test")[:80]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=order)})
    ds = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(d)) for d, _ in samples[:60]],
                                     "label": [order.index(LABELS[y]) for _, y in samples[:60]]}, features=features)
    (tmp_path / "in").mkdir()
    ds.to_parquet(str(tmp_path / "in" / "train-00000-of-00002.parquet"))
    # the second file as datasets writes images it did not embed: bytes null, a path beside the file
    (tmp_path / "in" / "imgs").mkdir()
    paths = []
    for i, (data, _) in enumerate(samples[60:]):
        (tmp_path / "in" / "imgs" / f"{i}.jpg").write_bytes(data)
        paths.append(f"imgs/{i}.jpg")
    schema = pq.read_schema(tmp_path / "in" / "train-00000-of-00002.parquet")
    image = pa.array([{"bytes": None, "path": p} for p in paths] + [{"bytes": None, "path": "imgs/missing.jpg"}],
                     schema.field("image").type)
    label = pa.array([order.index(LABELS[y]) for _, y in samples[60:]] + [0], schema.field("label").type)
    pq.write_table(pa.Table.from_arrays([image, label], schema=schema), tmp_path / "in" / "train-00001-of-00002.parquet")

    report = run_job(_spec(str(tmp_path / "in"), str(tmp_path / "out"),
                           source={"format": "parquet", "image_column": "image", "label_column": "label"}))
    assert report.records_read == 81 and report.ok_rows == 80 and report.errors_by_type == {"ReadError": 1}
    assert report.labels == {"from": "classlabel", "names": 10, "mapped": 10, "unmapped": {}}
    assert report.labeled == 80 and report.top1_accuracy > 0.9  # read through the names, not the raw ids
    rows = pl.read_parquet(str(tmp_path / "out" / "part-*.parquet"))
    assert (rows["label"] == rows["topk_ids"].list.first()).mean() > 0.9
    assert "imgs/0.jpg" in rows["member"].to_list()


def test_the_model_actors_start_while_a_slow_listing_runs(ray_cluster, slow_store):
    """A bucket that lists slowly (each LIST held 3 s): the model actors load their engine while the
    driver still lists the source and checks the output; the shards to do, and the folders' label
    map, reach the running dataset once known (feed.py); every image lands once, labeled. A refusal
    found after the actors started (the output holds a finished run) stops the run, nothing written."""
    from pipeline.demo import LABELS

    store, proxy = slow_store
    bucket = "vitpipe-early-actors"
    store.mkdir(bucket)
    digits = digit_jpegs("test")[:120]
    store.pipe({f"{bucket}/tree/{LABELS[y]}/img{i:04d}.jpg": data for i, (data, y) in enumerate(digits)})
    proxy.list_delay_s = 3.0
    spec = _spec(f"s3://{bucket}/tree", f"s3://{bucket}/out",
                 source={"format": "images", "images_per_shard": 20, "label_from": "folder"})

    report = run_job(spec)
    assert report.started_early
    assert report.time_to_model_ready_s < report.time_to_listed_s < report.time_to_first_row_s
    assert report.ok_rows == report.labeled == 120 and report.top1_accuracy > 0.9
    store.invalidate_cache()
    rows = _duck(store).sql(f"SELECT key, label FROM read_parquet('s3://{bucket}/out/part-*.parquet')").fetchall()
    assert len(rows) == len({k for k, _ in rows}) == 120
    assert all(LABELS[label] == key.split("/")[0] for key, label in rows)  # the label map came through the feed

    manifest = store.cat(f"{bucket}/out/_manifest.json")
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        run_job(spec)
    store.invalidate_cache()
    assert store.cat(f"{bucket}/out/_manifest.json") == manifest
    assert [p for p in store.find(f"{bucket}/out/_pending") if p.endswith(".parquet")] == []
