"""The data plane's stages without Ray: parts, the model stage's rows and counts, the part
writer, the driver's bookkeeping of parts, shard faults, and the GPU decoder's resize and
orientation (its nvJPEG call runs in tests/test_gpu.py, on a GPU)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import OutputSpec, OutputsSpec, SourceSpec
from pipeline.decode import Preprocess, decode_image
from pipeline.demo import digit_jpegs, write_shards
from pipeline.engines.torch_engine import TorchEngine
from pipeline.ledger import SNAPSHOT, Ledger, ShardEntry, shard_key
from pipeline.model.checkpoints import load_checkpoint
from pipeline.predict import output_schema, predict_part, top_k
from pipeline.sink import ParquetSink
from pipeline.sources import Shard, list_shards, read_parts
from pipeline.write import PartWriter

from helpers import exif_rotated_jpeg, image_bytes, tar_bytes


@pytest.fixture(scope="module")
def digits():
    return load_checkpoint("builtin:digits")


def test_a_shard_is_cut_into_parts_that_carry_every_record_once(tmp_path):
    write_shards(digit_jpegs("test")[:45], str(tmp_path), n_shards=1)
    source = SourceSpec(uri=str(tmp_path), records_per_part=16)
    (shard,) = list_shards(source)
    parts = list(read_parts(shard, source))
    assert [p.records.num_rows for p in parts] == [16, 16, 13] and [p.last for p in parts] == [False, False, True]
    keys = [k for p in parts for k in p.records.column("key").to_pylist()]
    assert keys == sorted(set(keys)) and len(keys) == 45
    # exactly a multiple of the part size: the last full part is the one marked last (no empty tail part)
    source = SourceSpec(uri=str(tmp_path), records_per_part=15)
    assert [(p.records.num_rows, p.last) for p in read_parts(shard, source)] == [(15, False), (15, False), (15, True)]


@pytest.mark.parametrize(("name", "data", "kind", "kept"), [
    ("cut", "cut", "TruncatedShard", 2),  # cut in the middle of the third member: the two before it stay
    ("random", bytes(np.random.default_rng(1).integers(0, 255, 3000, dtype=np.uint8)), "UnreadableShard", 0),
    ("empty", b"", "UnreadableShard", 0),
])
def test_a_faulty_shard_keeps_what_was_read_and_ends_with_its_error(tmp_path, name, data, kind, kept):
    if data == "cut":
        whole = tar_bytes([(f"k{i}.jpg", image_bytes(40, 40, seed=i)) for i in range(4)])
        third = whole.index(b"k2.jpg") + 512 + 300  # 300 bytes into the third member's data
        data = whole[:third]
    (tmp_path / f"{name}.tar").write_bytes(data)
    (shard,) = list_shards(SourceSpec(uri=str(tmp_path / f"{name}.tar")))
    (part,) = read_parts(shard, SourceSpec(uri=str(tmp_path)))
    rows = part.records.to_pylist()
    assert part.fault == kind and part.last
    assert [r["key"] for r in rows[:-1]] == [f"k{i}" for i in range(kept)]
    assert all(r["status"] == "record" for r in rows[:-1])
    err = rows[-1]
    assert (err["status"], err["error_stage"], err["error_type"]) == ("error", "read", kind)
    assert shard.uri in err["error_message"] and "rewrite" in err["error_message"]  # names the shard and the fix
    if kind == "TruncatedShard":
        assert "after member 'k1.jpg'" in err["error_message"] and "offset" in err["error_message"]


def test_a_shard_gone_after_listing_is_its_own_error_not_the_jobs(tmp_path):
    (tmp_path / "a.tar").write_bytes(tar_bytes([("k.jpg", image_bytes(8, 8))]))
    (shard,) = list_shards(SourceSpec(uri=str(tmp_path)))
    (tmp_path / "a.tar").unlink()
    (part,) = read_parts(shard, SourceSpec(uri=str(tmp_path)))
    assert part.fault == "ShardGone" and part.records.column("error_type").to_pylist() == ["ShardGone"]
    from pipeline.ledger import ShardEntry
    from pipeline.sources import _fault_kind

    assert _fault_kind(PermissionError("denied")) == "ShardAccessDenied"
    # faults that were not in the bytes are retried by the next incremental run; bad bytes wait for a new ETag
    assert ShardEntry("u", "e", 0, "m", "r", "committed", fault="ShardGone").retry_anyway
    assert not ShardEntry("u", "e", 0, "m", "r", "committed", fault="TruncatedShard").retry_anyway


def test_predict_part_rows_errors_and_counts(digits):
    from pipeline.sources import RECORD_SCHEMA

    jpegs = digit_jpegs("test")[:5]
    rows = [{"key": f"k{i}", "image": d, "label": y, "status": "record"} for i, (d, y) in enumerate(jpegs)]
    rows += [{"key": "bad", "image": b"no image", "label": 3, "status": "record"},
             {"key": "unsafe", "image": b"", "status": "error", "error_stage": "read", "error_type": "UnsafeMember",
              "error_message": "link"},
             {"key": "notes", "image": b"", "status": "skipped", "error_stage": "read", "error_type": "NoImageMember"}]
    base = {"source_uri": "s3://b/s.tar", "source_etag": "e", "member": "m", "label": None, "error_stage": None,
            "error_type": None, "error_message": None}
    records = pa.Table.from_pylist([base | r for r in rows], schema=RECORD_SCHEMA)
    engine = TorchEngine(digits, "fp32", "cpu", 1)
    outputs = OutputsSpec(top_k=3)
    tables, counts = predict_part(records, engine, digits.preprocess, digits.labels, outputs, call_size=2)
    ok, err = tables["ok"], tables["errors"]
    assert ok.schema == output_schema(digits.config.dim, outputs)
    assert ok.column("key").to_pylist() == [f"k{i}" for i in range(5)]
    assert err.column("key").to_pylist() == ["bad", "unsafe"]
    assert err.column("error_type").to_pylist() == ["UnsupportedFormat", "UnsafeMember"]
    assert err.column("error_stage").to_pylist() == ["decode", "read"] and err.column("label").to_pylist() == [3, None]
    assert counts["records"] == 7 == counts["ok"] + sum(counts["errors"].values())
    assert counts["skipped"] == {"NoImageMember": 1}
    assert counts["labeled"] == 5 and counts["correct"] == sum(
        r["topk_ids"][0] == r["label"] for r in ok.to_pylist())
    # the same rows as the engine on the decoded images, in order
    x = np.stack([decode_image(d, digits.preprocess) for d, _ in jpegs])
    emb, logits = engine.run(x)
    got = np.array(ok.column("embedding").to_pylist(), np.float32)
    assert np.abs(got - emb).max() < 1e-5
    assert [r[0] for r in ok.column("topk_ids").to_pylist()] == logits.argmax(1).tolist()
    assert ok.column("topk_labels").to_pylist()[0][0] == digits.labels[int(logits[0].argmax())]


def test_top_k_is_the_softmax_top_k_per_row():
    logits = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    out = top_k(logits, 4, [f"c{j}" for j in range(10)], has_head=True)  # two classes without a name
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i, (ids, scores, names) in enumerate(zip(*(out[c].to_pylist() for c in ("topk_ids", "topk_scores",
                                                                                    "topk_labels")), strict=True)):
        assert ids == list(np.argsort(-p[i], kind="stable")[:4])
        assert np.allclose(scores, p[i][ids], atol=1e-6)
        assert names == [f"c{j}" if j < 10 else str(j) for j in ids]
    none = top_k(logits, 4, [], has_head=False)
    assert none["topk_ids"].to_pylist() == [[]] * 6


def test_the_part_writer_stages_files_whose_checksums_match_and_never_overwrites(tmp_path):
    import hashlib

    writer = PartWriter(str(tmp_path / "out"), "run1", {"model_id": "m1"}, row_group_rows=100)
    ok = pa.table({"key": ["a", "b"], "x": [1, 2]})
    errors = pa.table({"key": ["c"], "error_type": ["CorruptImage"]})
    files = writer.write("s3://b/shard-0.tar", 3, {"ok": ok, "errors": errors})
    assert [(f["kind"], f["rows"]) for f in files] == [("ok", 2), ("errors", 1)]
    for f in files:
        path = tmp_path / "out" / "_pending" / "run1" / f["path"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
        assert pq.read_schema(path).metadata[b"vitpipe.model_id"] == b"m1"
    assert files[1]["path"].startswith("errors/part-") and "-0003-" in files[0]["path"]
    again = writer.write("s3://b/shard-0.tar", 3, {"ok": ok, "errors": errors.slice(0, 0)})
    assert len(again) == 1 and again[0]["path"] != files[0]["path"]  # a retried part writes a new file


def test_the_driver_finishes_a_shard_when_all_its_parts_reported_and_drops_a_retried_part(tmp_path):
    out = OutputSpec(uri=str(tmp_path / "out"), mode="full")
    sink = ParquetSink(out, "run1", "model1")
    shard = Shard("file:///in/a.tar", "etag1", 10)
    sink.begin([shard])

    def result(part: int, last: bool, records: int, fault: str | None = None) -> dict:
        counts = {"records": records, "ok": records, "errors": {}, "skipped": {}, "labeled": 0, "correct": 0}
        files = [{"path": f"part-x-{part}.parquet", "kind": "ok", "rows": records, "bytes": 1, "sha256": "0"}]
        return {"shard": shard.uri, "part": part, "last": last, "fault": fault, "files": json.dumps(files),
                "counts": json.dumps(counts), "check": None, "node": "n1", "finished_at": 0.0}

    try:
        sink.add(result(1, True, 3, fault="TruncatedShard"))  # parts may report out of order
        assert not sink.done
        sink.add(result(0, False, 16))
        sink.add(result(0, False, 16))  # Ray retried part 0 after it had reported: kept once
        (entry,) = sink.done
        assert (entry.records, entry.ok, entry.fault) == (19, 19, "TruncatedShard")
        assert [f["path"] for f in entry.files] == ["part-x-0.parquet", "part-x-1.parquet"]
        assert sink.counts.records == 19 and sink.counts.duplicates_dropped == 16
        assert sink.counts.bad_shards == {"TruncatedShard": 1} and sink.nodes == {"n1": 2}
        on_disk = json.loads(next((tmp_path / "out" / "_ledger").glob("*.json")).read_text())
        assert on_disk["state"] == "pending" and on_disk["fault"] == "TruncatedShard"
    finally:
        sink.close()


def _part_result(shard: Shard, path: str, records: int = 4) -> dict:
    """One part's record, as a model actor sends it: the shard's only part, in one file."""
    counts = {"records": records, "ok": records, "errors": {}, "skipped": {}, "labeled": 0, "correct": 0}
    files = [{"path": path, "kind": "ok", "rows": records, "bytes": 4, "sha256": "0"}]
    return {"shard": shard.uri, "part": 0, "last": True, "fault": None, "files": json.dumps(files),
            "counts": json.dumps(counts), "check": None, "node": "n1", "finished_at": 0.0}


def _run_through(out: OutputSpec, run_id: str, shards: list[Shard], store, proxy) -> tuple:
    """A run's bookkeeping on the output, no Ray: begin, a staged file and a record per shard to do,
    commit. Returns (the shard plan, the manifest, the most requests under way at the store in
    each of begin, recording the finished shards, commit)."""
    sink = ParquetSink(out, run_id, "model1")
    most = {}
    try:
        proxy.most_in_flight = 0
        plan = sink.begin(shards)
        most["begin"] = proxy.most_in_flight
        paths = [f"part-{run_id}-{i:02d}.parquet" for i in range(len(plan.todo))]
        store.pipe({f"{out.uri.removeprefix('s3://')}/_pending/{run_id}/{p}": b"rows" for p in paths})
        proxy.most_in_flight = 0
        for shard, path in zip(plan.todo, paths, strict=True):
            sink.add(_part_result(shard, path))
        sink.ledger.flush()
        most["record"] = proxy.most_in_flight
        proxy.most_in_flight = 0
        manifest = sink.commit({"run_id": run_id})
        most["commit"] = proxy.most_in_flight
        return plan, manifest, most
    except BaseException as e:
        sink.abort(e)
        raise


def test_the_output_bookkeeping_on_s3_keeps_many_requests_under_way(slow_store):
    """The driver's own reads and writes of an output on an object store: the ledger read at the
    start (a GET per shard), the commit's moves (a copy and a delete per file; s3fs's HEAD before
    each copy left out) and its ledger writes, the entries of shards no longer listed removed. One request after another, a nightly
    run over 10,000 shards at 20 ms a request waited minutes before its first row and after its
    last. Through a proxy that holds each request 50 ms: several under way at once, and the output
    is what one at a time made of it."""
    store, proxy = slow_store
    store.mkdir("vitpipe-commit")
    out = OutputSpec(uri="s3://vitpipe-commit/out", mode="incremental")
    shards = [Shard(f"s3://in/{i:02d}.tar", f"etag{i}", 10) for i in range(12)]

    proxy.log.clear()
    plan, manifest, most = _run_through(out, "run1", shards, store, proxy)
    assert len(plan.todo) == 12 and manifest["totals"] == {"shards": 12, "records": 48, "ok": 48, "errors": 0,
                                                            "skipped": 0}
    assert not [r for r in proxy.log if r.startswith("HEAD ") and r.endswith(".parquet")]  # the ledger knows the sizes
    assert most["record"] >= 4  # each finished shard's entry: the driver waited for each before
    assert most["commit"] >= 4  # the moves and the entries: one request at a time before
    store.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in store.glob("vitpipe-commit/out/part-*")) == [
        f"part-run1-{i:02d}.parquet" for i in range(12)]
    assert not [p for p in store.find("vitpipe-commit/out/_pending") if p.endswith(".parquet")]  # all moved
    ledger = [json.loads(store.cat_file(p)) for p in store.glob("vitpipe-commit/out/_ledger/*.json")]
    assert sorted(e["uri"] for e in ledger) == [s.uri for s in shards] and {e["state"] for e in ledger} == {"committed"}

    store.rm_file(f"vitpipe-commit/out/_ledger/{SNAPSHOT}")  # each entry read (a store whose ETags are not MD5s)
    plan, _, most = _run_through(out, "run2", shards, store, proxy)  # nothing changed: every shard kept
    assert (len(plan.todo), len(plan.kept)) == (0, 12)
    assert most["begin"] >= 4  # the ledger's GETs: one at a time before

    plan, manifest, _ = _run_through(out.model_copy(update={"mode": "full"}), "run3", shards[:5], store, proxy)
    assert len(plan.todo) == 5 and manifest["totals"]["shards"] == 5
    store.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in store.glob("vitpipe-commit/out/part-*")) == [
        f"part-run3-{i:02d}.parquet" for i in range(5)]
    assert sorted(json.loads(store.cat_file(p))["uri"] for p in store.glob("vitpipe-commit/out/_ledger/*.json")) == [
        s.uri for s in shards[:5]]


def test_a_run_reads_its_ledger_from_the_snapshot_and_only_what_changed_since_one_by_one(slow_store, capfd):
    """Each commit leaves every ledger entry in one object (ledger.SNAPSHOT): the next run's start
    reads that instead of a GET per shard (~2.5 CPU-ms each with s3fs: 25 CPU-s before a nightly
    run's first row over 10,000 shards). It is a cache: the listing says which entries exist, and
    an entry that changed since (a run that died left it pending) or whose snapshot is unreadable
    is read from the store, so the shards planned are those of reading every entry."""
    store, proxy = slow_store
    store.mkdir("vitpipe-snap")
    root, out = "vitpipe-snap/out", OutputSpec(uri="s3://vitpipe-snap/out", mode="incremental")
    shards = [Shard(f"s3://in/{i:02d}.tar", f"etag{i}", 10) for i in range(12)]
    _run_through(out, "run1", shards, store, proxy)

    def ledger_gets() -> list[str]:
        return sorted(r.rsplit("/", 1)[1] for r in proxy.log if r.startswith("GET ") and "/_ledger/" in r)

    proxy.log.clear()
    plan, _, _ = _run_through(out, "run2", shards, store, proxy)
    assert (len(plan.todo), len(plan.kept)) == (0, 12)
    assert ledger_gets() == [SNAPSHOT]  # one object, not 12 entries

    # Since run2's commit: shard 3 was rewritten (a new ETag) and a run that died finished it (its
    # entry pending, its file staged); shard 5's entry was removed. The snapshot still holds both.
    dead = ShardEntry(shards[3].uri, "etag3b", 10, "model1", "dead", "pending", records=4, ok=4,
                      files=[{"path": "part-dead-03.parquet", "kind": "ok", "rows": 4, "bytes": 4, "sha256": "0"}])
    store.pipe({f"{root}/_pending/dead/part-dead-03.parquet": b"rows",
                f"{root}/_ledger/{dead.key}.json": json.dumps(dataclasses.asdict(dead)).encode()})
    store.rm_file(f"{root}/_ledger/{shard_key(shards[5].uri)}.json")
    now = [*shards[:3], Shard(shards[3].uri, "etag3b", 10), *shards[4:]]
    proxy.log.clear()
    plan, manifest, _ = _run_through(out, "run3", now, store, proxy)
    assert ledger_gets() == sorted([SNAPSHOT, f"{dead.key}.json"])  # the changed entry read; the gone one not trusted
    assert [e.run_id for e in plan.adopted] == ["dead"] and [s.uri for s in plan.todo] == [shards[5].uri]
    assert len(plan.kept) == 10 and manifest["totals"]["shards"] == 12

    ledger = Ledger(store, root)
    store.invalidate_cache()
    read = ledger.entries()
    assert ledger.from_snapshot == 12 and {e.state for e in read.values()} == {"committed"}
    assert read[dead.key].run_id == "dead" and read[dead.key].etag == "etag3b"
    store.pipe_file(f"{root}/_ledger/{SNAPSHOT}", b"not gzip")  # unreadable: every entry read instead
    again = Ledger(store, root)
    assert again.entries() == read and again.from_snapshot == 0
    assert "snapshot" in capfd.readouterr().err


def test_a_ledger_entry_the_store_refuses_is_raised_not_lost(s3):
    """The driver does not wait for each finished shard's entry (Ledger.put_soon), so a write the
    store refuses (here: a bucket these credentials may not write) must come back as an error at
    flush, which commit and abort call first: never a run that commits shards it did not record."""
    ledger = Ledger(s3, "vitpipe-no-such-bucket/out", in_flight=4)
    entry = ShardEntry("s3://in/a.tar", "etag", 1, "model1", "run1", "pending")
    ledger.put_soon(entry)  # returns before the store answers
    with pytest.raises(OSError):
        ledger.flush()
    ledger.flush()  # reported once; nothing left under way


def test_full_speed_is_when_the_rate_reaches_the_steady_rate():
    from pipeline.report import full_speed_at

    # 10 s of start-up, a slow ramp (10 images/s for 10 s), then 100 images/s for 30 s
    timeline = [(10.0 + t, 10 * t) for t in range(1, 11)] + [(20.0 + t, 100 + 100 * t) for t in range(1, 31)]
    at = full_speed_at(timeline, t0=0.0)
    assert 20.0 < at < 28.0, at
    steady = [(5.0 + t, 50 * t) for t in range(1, 41)]
    assert full_speed_at(steady, t0=0.0) < 11.0
    assert full_speed_at(steady[:3], t0=0.0) is None  # too short to tell


# --- the GPU decoder's device-independent half: it runs here on CPU tensors ---------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_tensors_matches_pillow(orientation):
    from pipeline.decode_gpu import orient

    a = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)  # not symmetric
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_which_records_the_gpu_takes():
    from pipeline.decode_gpu import gpu_header

    assert gpu_header(image_bytes(64, 48)) is not None  # baseline RGB JPEG
    assert gpu_header(image_bytes(64, 48, mode="L")) is not None  # grayscale JPEG
    assert gpu_header(exif_rotated_jpeg()).orientation == 6
    assert gpu_header(image_bytes(64, 48, progressive=True)) is None  # progressive: the CPU path
    assert gpu_header(image_bytes(64, 48, mode="CMYK")) is None
    assert gpu_header(image_bytes(64, 48, "PNG")) is None
    assert gpu_header(image_bytes(64, 48), max_pixels=100) is None  # over the pixel limit: the CPU names it
    assert gpu_header(b"\xff\xd8\xff garbage") is None and gpu_header(b"") is None


def photo(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth at the scale of a few pixels, like the benchmark's (and real photos)."""
    small = np.random.default_rng(seed).integers(0, 255, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("pre", [Preprocess(image_size=224, resize="crop", crop_pct=0.875),
                                 Preprocess(image_size=96, resize="squash")])
def test_the_gpu_resize_matches_the_cpu_path_to_embedding_cosine_0999(pre):
    """The resize and crop the GPU path runs after nvJPEG, here on CPU tensors of the same decoded
    pixels: within a few levels of Pillow's, and a ViT cannot tell them apart (cosine >= 0.999)."""
    from pipeline.decode_gpu import orient, resize_and_crop

    jpegs = [photo(w, h, seed=i) for i, (w, h) in
             enumerate([(640, 480), (300, 500), (1024, 768), (250, 250), (180, 120), (800, 300)])]
    jpegs.append(exif_rotated_jpeg())
    cpu, gpu = [], []
    for data in jpegs:
        cpu.append(decode_image(data, pre))
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what nvJPEG gives: full size, unrotated
        o = int(Image.open(io.BytesIO(data)).getexif().get(0x0112, 1))
        gpu.append(resize_and_crop(orient(torch.from_numpy(full).permute(2, 0, 1), o), pre).numpy())
    cpu, gpu = np.stack(cpu), np.stack(gpu)  # (N, S, S, 3)
    assert gpu.shape == cpu.shape and gpu.dtype == np.uint8
    assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 3.0
    ckpt = load_checkpoint(None, arch="vit_ti_16", image_size=pre.image_size, num_classes=10)
    engine = TorchEngine(ckpt, "fp32", "cpu", 2)
    a, _ = engine.run(cpu)
    b, _ = engine.run(gpu)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999, cos


def test_a_cut_jpeg_is_left_to_the_cpu_path():
    from pipeline.decode_gpu import gpu_header

    whole = image_bytes(64, 48)
    assert gpu_header(whole) is not None and gpu_header(whole[:-100]) is None
