"""Listing and reading shards without Ray: provenance, labels, unsafe members, every format."""

from __future__ import annotations

import io
from types import SimpleNamespace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceSpec
from pipeline.labels import plan_labels
from pipeline.sources import SourceError, list_shards, read_parts
from pipeline.storage import fetch_in_order

from helpers import bad_input_members, image_bytes, tar_bytes


def _records(source: SourceSpec) -> list[dict]:
    """Every record of every shard, checking that each shard's parts are numbered and end with the last."""
    out = []
    for s in list_shards(source):
        parts = list(read_parts(s, source))
        assert [p.index for p in parts] == list(range(len(parts))) and all(p.shard == s for p in parts)
        assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
        out += [r for p in parts for r in p.records.to_pylist()]
    return out


def test_webdataset_labels_provenance_and_chunks(tmp_path):
    members = []
    for i in range(10):
        members += [(f"s{i:03d}.jpg", image_bytes(20, 20, seed=i)), (f"s{i:03d}.cls", str(i % 3).encode())]
    members += [("meta/j001.png", image_bytes(8, 8, "PNG")), ("meta/j001.json", b'{"label": 7}')]
    (tmp_path / "a.tar").write_bytes(tar_bytes(members))
    (tmp_path / "ignored.txt").write_text("not a shard")
    source = SourceSpec(uri=str(tmp_path), format="webdataset", records_per_part=4)
    shards = list_shards(source)
    assert [s.uri.rsplit("/", 1)[1] for s in shards] == ["a.tar"]
    assert shards[0].etag and shards[0].size > 0
    parts = list(read_parts(shards[0], source))
    assert [p.records.num_rows for p in parts] == [4, 4, 3] and [p.last for p in parts] == [False, False, True]
    recs = [r for p in parts for r in p.records.to_pylist()]
    assert [r["key"] for r in recs] == [f"s{i:03d}" for i in range(10)] + ["meta/j001"]
    assert [r["label"] for r in recs] == [i % 3 for i in range(10)] + [7]
    assert all(r["status"] == "record" and r["source_uri"] == shards[0].uri for r in recs)
    assert recs[-1]["member"] == "meta/j001.png"


def test_unsafe_duplicate_and_non_image_members(tmp_path):
    members, errors, ok = bad_input_members()
    (tmp_path / "bad.tar").write_bytes(tar_bytes(members))
    recs = _records(SourceSpec(uri=str(tmp_path / "bad.tar")))
    by_status = {}
    for r in recs:
        by_status.setdefault(r["status"], []).append(r)
    read_errors = {r["key"]: r["error_type"] for r in by_status["error"]}
    assert read_errors == {"../escape.jpg": "UnsafeMember", "/abs.jpg": "UnsafeMember",
                           "link.jpg": "UnsafeMember", "dup": "DuplicateKey"}
    assert "/etc/passwd" in next(r for r in by_status["error"] if r["key"] == "link.jpg")["error_message"]
    assert sorted(r["key"] for r in by_status["skipped"]) == ["fake", "readme"]
    # Every image member that is not unsafe or a duplicate is a record to decode, exactly once.
    assert sorted(r["key"] for r in by_status["record"]) == sorted(
        k for k in ok | {e for e, t in errors.items() if t not in ("UnsafeMember", "DuplicateKey")})


def test_image_folder_groups_into_shards(tmp_path):
    for i in range(7):
        sub = tmp_path / ("cats" if i % 2 else "dogs")
        sub.mkdir(exist_ok=True)
        (sub / f"{i}.png").write_bytes(image_bytes(10, 10, "PNG", seed=i))
    (tmp_path / "notes.md").write_text("skip me")
    source = SourceSpec(uri=str(tmp_path), format="images", images_per_shard=3)
    shards = list_shards(source)
    assert [len(s.files) for s in shards] == [3, 3, 1]
    recs = _records(source)
    assert sorted(r["key"] for r in recs) == sorted(f"{'cats' if i % 2 else 'dogs'}/{i}" for i in range(7))
    assert all(r["source_uri"].endswith(r["member"]) for r in recs)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_image_folder_is_labelled_by_folder_and_fetched_in_order(where, tmp_path, request, monkeypatch):
    """Folder names become labels, on local disk and on S3 alike. On S3 (through a loopback proxy
    that holds each request 50 ms, as a remote store would) a read actor has several GETs under way
    at once, and never more than source.requests_in_flight; the records still come in listing order,
    and a file gone after the listing is one error row; each file is one request. Neither the driver's label plan nor a read
    actor looks up the filesystem per file (~35 us each: half a minute per million files)."""
    files = {f"{'cats' if i % 3 else 'dogs'}/{i:02d}.png": image_bytes(6, 6, "PNG", seed=i) for i in range(11)}
    gone = "cats/04.png"
    proxy = None
    if where == "s3":
        store, proxy = request.getfixturevalue("slow_store")
        store.mkdir("vitpipe-folders")
        store.pipe({f"vitpipe-folders/imgs/{k}": v for k, v in files.items()})
        uri = "s3://vitpipe-folders/imgs"
    else:
        for k, v in files.items():
            (tmp_path / k).parent.mkdir(exist_ok=True)
            (tmp_path / k).write_bytes(v)
        uri = str(tmp_path)
    source = SourceSpec(uri=uri, format="images", images_per_shard=6, label_from="folder", requests_in_flight=4)
    shards = list_shards(source)
    if proxy:
        proxy.gone.add(f"/vitpipe-folders/imgs/{gone}")
    else:
        (tmp_path / gone).unlink()
    model = SimpleNamespace(labels=["dogs", "cats"], config=SimpleNamespace(num_classes=2))
    lookups = []
    real = fsspec.core.url_to_fs
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda *a, **k: lookups.append(a[0]) or real(*a, **k))
    labels = plan_labels(source, shards, model)
    assert len(lookups) == 1  # the source's root, not its 11 files
    requests = proxy.requests if proxy else 0
    if proxy:  # a read actor's filesystem has not listed the folder: no sizes cached from the listing
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    recs = [r for s in shards for p in read_parts(s, source, labels.to_index) for r in p.records.to_pylist()]
    assert len(lookups) == 1 + 2 * len(shards) < 1 + len(files)  # per shard: its filesystem and the root's
    assert [r["member"] for r in recs] == sorted(files)  # listing order, whatever order the GETs finished in
    assert {r["member"]: r["label"] for r in recs} == {k: 1 if k.startswith("cats") else 0 for k in files}
    assert [r["image"] for r in recs if r["status"] == "record"] == [files[k] for k in sorted(files) if k != gone]
    assert {r["member"]: r["error_type"] for r in recs if r["status"] == "error"} == {gone: "ReadError"}
    root = fsspec.core.strip_protocol(uri)
    assert all(fsspec.core.strip_protocol(r["source_uri"]) == f"{root}/{r['member']}" for r in recs)
    if proxy:
        assert 2 <= proxy.most_in_flight <= 4
        assert proxy.requests - requests == len(files)  # one GET a file: no HEAD before it (s3fs asks one)


def test_a_retry_of_an_image_folder_fetches_only_its_keys(slow_store, tmp_path):
    """`vitpipe errors --retry-spec` keeps an image folder's URI and names the keys to read again
    (source.only_keys): the readers fetch those files only, not every file of their shards."""
    store, proxy = slow_store
    files = {f"c{i % 2}/{i:02d}.png": image_bytes(6, 6, "PNG", seed=i) for i in range(10)}
    store.mkdir("vitpipe-retry-folder")
    store.pipe({f"vitpipe-retry-folder/imgs/{k}": v for k, v in files.items()})
    (tmp_path / "keys.txt").write_text("c1/03\nc0/08\n")
    source = SourceSpec(uri="s3://vitpipe-retry-folder/imgs", format="images", images_per_shard=4,
                        only_keys=str(tmp_path / "keys.txt"))
    shards = list_shards(source)
    before = proxy.requests
    recs = [r for s in shards for p in read_parts(s, source) for r in p.records.to_pylist()]
    assert [(r["key"], r["image"]) for r in recs] == [("c0/08", files["c0/08.png"]), ("c1/03", files["c1/03.png"])]
    assert proxy.requests - before == 2  # not 10: every file of the three shards


def test_a_reader_that_stops_early_starts_no_more_gets(slow_store):
    """fetch_in_order keeps its window under way and no more: a reader that stops after the first
    file (a fault, the job ending) leaves at most the window's GETs started, not the shard's."""
    store, proxy = slow_store
    store.mkdir("vitpipe-early")
    store.pipe({f"vitpipe-early/{i:02d}.png": bytes([i]) * 10 for i in range(12)})
    fs, _ = fsspec.core.url_to_fs("s3://vitpipe-early")
    before = proxy.requests
    fetched = fetch_in_order(fs, [f"vitpipe-early/{i:02d}.png" for i in range(12)], 4)
    assert next(fetched) == bytes([0]) * 10
    fetched.close()
    assert proxy.requests - before <= 5  # the 4 of the window, and the one started as the first was handed on


def test_parquet_rows_whose_images_are_paths_are_fetched_in_flight(slow_store):
    """Parquet from Hugging Face `datasets` may hold an image as a path beside the file (bytes null)
    instead of its bytes: on an object store those files are fetched several at a time, as an image
    folder's are, and each row still gets its own image, in row order; inline bytes stay as they
    are, a URI is read where it points, and a file that is not there, or on no filesystem fsspec
    knows, is that row's ReadError: the rest of the shard goes on."""
    store, proxy = slow_store
    store.mkdir("vitpipe-hf")
    files = {f"imgs/{i}.png": image_bytes(6, 6, "PNG", seed=i) for i in range(8)}
    store.pipe({f"vitpipe-hf/data/{k}": v for k, v in files.items()})
    inline = image_bytes(6, 6, "PNG", seed=99)
    cells = [{"bytes": None, "path": k} for k in files] + [
        {"bytes": inline, "path": None},
        {"bytes": None, "path": "s3://vitpipe-hf/data/imgs/7.png"},
        {"bytes": None, "path": "imgs/missing.png"},
        {"bytes": None, "path": "nosuch://vitpipe-hf/data/imgs/0.png"}]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(cells, image)}), buf)
    store.pipe("vitpipe-hf/data/train-00000.parquet", buf.getvalue())
    source = SourceSpec(uri="s3://vitpipe-hf/data/train-00000.parquet", format="parquet", image_column="image",
                        requests_in_flight=4)
    recs = _records(source)
    assert [r["image"] for r in recs[:10]] == [*files.values(), inline, files["imgs/7.png"]]
    assert [r["key"] for r in recs] == [f"train-00000/{i}" for i in range(12)]
    assert [(r["status"], r["error_type"], r["member"]) for r in recs[10:]] == [
        ("error", "ReadError", "imgs/missing.png"), ("error", "ReadError", "nosuch://vitpipe-hf/data/imgs/0.png")]
    assert "nosuch" in recs[-1]["error_message"] and "no filesystem" in recs[-1]["error_message"]
    assert 2 <= proxy.most_in_flight <= 4  # one at a time before: a shard of them on a remote store mostly waited


def test_parquet_source_with_key_and_label_columns():
    fs = fsspec.filesystem("memory")
    table = pa.table({"img": [image_bytes(10, 10, seed=i) for i in range(5)], "y": [0, 1, None, 3, 4],
                      "id": [f"r{i}" for i in range(5)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe("/pq/data/one.parquet", buf.getvalue())
    source = SourceSpec(uri="memory://pq/data", format="parquet", image_column="img", label_column="y", key_column="id")
    recs = _records(source)
    assert [r["key"] for r in recs] == [f"r{i}" for i in range(5)]
    assert [r["label"] for r in recs] == [0, 1, None, 3, 4]
    bad = SourceSpec(uri="memory://pq/data", format="parquet", image_column="pixels")
    with pytest.raises(SourceError, match="column 'pixels' not found"):  # at listing, before any work
        list_shards(bad)


def test_empty_or_missing_source_fails_before_any_work(tmp_path):
    with pytest.raises(SourceError, match="nothing there"):
        list_shards(SourceSpec(uri=str(tmp_path / "nope")))
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(SourceError, match=r"no \.tar files"):
        list_shards(SourceSpec(uri=str(tmp_path), format="webdataset"))


def test_glob_lists_matching_shards_only(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "b-000.tar"):
        (tmp_path / name).write_bytes(tar_bytes([("k.jpg", image_bytes(8, 8))]))
    shards = list_shards(SourceSpec(uri=f"{tmp_path}/a-*.tar"))
    assert [s.uri.rsplit("/", 1)[1] for s in shards] == ["a-000.tar", "a-001.tar"]


@pytest.mark.parametrize("value", ["2026-12-02T16:16:53.000Z", "2026-12-02T16:16:53Z", "2026-12-02T16:16:53.123456Z",
                                   "2026-12-02T16:16:53.123456789Z", "Wed, 02 Dec 2026 16:16:53 GMT",
                                   "Wed, 02 Dec 2026 16:16:53 -0500", "2026-12-02T16:16:53+02:00", 1764692213,
                                   "1764692213.5"])
def test_s3_timestamps_read_as_botocore_reads_them(value):
    """The standard-library parse that replaces dateutil's gives botocore's own datetimes: same
    instant, same offset (an aware datetime, never a naive one), for the forms S3 sends and those it
    hands back to botocore."""
    from botocore.utils import parse_timestamp

    from pipeline.storage import s3_timestamp

    ours, theirs = s3_timestamp(value), parse_timestamp(value)
    assert ours == theirs
    assert ours.utcoffset() == theirs.utcoffset()


def test_listing_and_reading_a_bucket_parse_no_timestamp_with_dateutil(s3, monkeypatch):
    """botocore parses every listed object's LastModified, and each GET's Last-Modified header,
    with dateutil's general parser: half of the CPU of listing a bucket with s3fs. Listing and
    fetching (what the driver and a read actor do) leave it unused, and what they find is the same."""
    import dateutil.parser
    from botocore import parsers, utils

    files = {f"vitpipe-stamps/photos/{i:03d}.png": image_bytes(4, 4, "PNG", seed=i) for i in range(30)}
    s3.mkdir("vitpipe-stamps")
    s3.pipe(files)
    monkeypatch.setattr(parsers, "DEFAULT_TIMESTAMP_PARSER", utils.parse_timestamp)  # as a fresh process has it
    calls = []
    real_parse = dateutil.parser.parse
    monkeypatch.setattr(dateutil.parser, "parse", lambda *a, **k: calls.append(a[0]) or real_parse(*a, **k))

    s3.invalidate_cache()
    infos = s3.find("vitpipe-stamps/photos", detail=True)  # botocore's way, for comparison
    assert len(calls) == len(files)
    source = SourceSpec(uri="s3://vitpipe-stamps/photos", format="images", images_per_shard=8)
    shards = list_shards(source)
    s3.invalidate_cache()
    again = s3.find("vitpipe-stamps/photos", detail=True)
    got = list(fetch_in_order(s3, sorted(files), in_flight=4))
    assert len(calls) == len(files)  # none since
    assert got == [files[p] for p in sorted(files)]
    assert {p: i["LastModified"] for p, i in again.items()} == {p: i["LastModified"] for p, i in infos.items()}
    assert [f for s in shards for f in s.files] == [f"s3://{p}" for p in sorted(files)]


def test_a_folder_tree_on_s3_is_listed_a_folder_at_a_time_at_once(slow_store):
    """An object store lists 1,000 keys per request, one after another: a million loose images on S3
    took minutes to list before the first row. The driver lists the source folder's sub-folders (an
    image folder's classes) at once, at most source.requests_in_flight LISTs under way, and finds
    exactly what one recursive listing finds: files at the top, in each folder, and deeper down."""
    from pipeline.storage import find_files

    store, proxy = slow_store
    store.mkdir("vitpipe-tree")
    files = {f"vitpipe-tree/imgs/{c}/{i}.png": image_bytes(4, 4, "PNG", seed=i) for c in "abcdefgh" for i in range(3)}
    files |= {"vitpipe-tree/imgs/top.png": image_bytes(4, 4, "PNG", seed=50),
              "vitpipe-tree/imgs/a/deep/er.png": image_bytes(4, 4, "PNG", seed=51)}
    store.pipe(files)
    fs, path = fsspec.core.url_to_fs("s3://vitpipe-tree/imgs")  # through the proxy, 50 ms a request
    listed = find_files(fs, path, in_flight=3)
    fs.invalidate_cache()
    assert listed == fs.find(path, detail=True)
    assert sorted(listed) == sorted(files)
    assert 2 <= proxy.most_in_flight <= 3  # one LIST after another before

    shards = list_shards(SourceSpec(uri="s3://vitpipe-tree/imgs", format="images", images_per_shard=100))
    assert [f for s in shards for f in s.files] == [f"s3://{p}" for p in sorted(files)]
