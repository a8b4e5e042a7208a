"""Decode: every odd input becomes RGB uint8 at model size, or a DecodeError with a useful message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_image
from pipeline.model.checkpoints import Preprocess

from helpers import bomb_png, exif_rotated_jpeg, image_bytes

PRE = Preprocess(image_size=32, resize="crop", crop_pct=0.875)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"),
                                      ("PNG", "LA"), ("PNG", "I;16"), ("GIF", "P"), ("WEBP", "RGB"),
                                      ("BMP", "RGB"), ("TIFF", "RGB")])
def test_modes_and_formats_become_rgb_uint8(fmt, mode):
    out = decode_image(image_bytes(90, 50, fmt, mode=mode), PRE)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_alpha_is_composited_on_white():

    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert decode_image(buf.getvalue(), PRE).min() == 255


def test_sixteen_bit_keeps_its_range():

    img = Image.fromarray(np.full((40, 40), 65535, np.uint16))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert decode_image(buf.getvalue(), PRE).min() == 255  # white stays white, not clipped garbage


def test_exif_orientation_is_applied():
    # Stored 60 wide x 20 tall, red left / blue right; orientation 6 means shown rotated 90 CW:
    # red ends up on top, blue at the bottom.
    out = decode_image(exif_rotated_jpeg(), Preprocess(image_size=32, resize="squash"))
    top, bottom = out[2].mean(0), out[-3].mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_center_crop_keeps_the_middle():
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, 32:96] = 255  # a white middle band, black sides

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out = decode_image(buf.getvalue(), Preprocess(image_size=32, resize="crop", crop_pct=1.0))
    assert out.mean() > 250  # the crop took only the white band


def test_large_jpeg_uses_draft_and_matches_full_decode():
    data = image_bytes(2400, 1800, "JPEG", seed=3, quality=90)
    out = decode_image(data, PRE)
    assert out.shape == (32, 32, 3)


@pytest.mark.parametrize("data,kind,words", [
    (b"", "EmptyFile", "empty"),
    (b"just some text\n", "UnsupportedFormat", "allowed format"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "UnsupportedFormat", "allowed format"),
    (image_bytes(400, 300, "JPEG", seed=1)[:600], "CorruptImage", "could not be decoded"),
    (bomb_png(), "DecompressionBomb", "pixels"),
])
def test_bad_inputs_raise_decode_errors(data, kind, words):
    with pytest.raises(DecodeError) as e:
        decode_image(data, PRE)
    assert e.value.kind == kind
    assert words in str(e.value)


def test_pixel_limit_is_configurable():
    data = image_bytes(200, 200, "PNG")
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_image(data, PRE, max_pixels=100 * 100)


def _records(rows: list[dict]):
    """A part's records (RECORD_SCHEMA) from a few fields per row."""
    import pyarrow as pa

    from pipeline.sources import RECORD_SCHEMA

    base = {"source_uri": "s3://b/s.tar", "source_etag": "e", "label": None, "error_stage": None,
            "error_type": None, "error_message": None, "status": "record"}
    return pa.Table.from_pylist([base | {"member": r["key"]} | r for r in rows], schema=RECORD_SCHEMA)


def test_parallel_decode_gives_the_same_pixels_and_errors_as_serial():
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.decode import decode_records

    blobs = [image_bytes(300 + 37 * i, 200 + 11 * i, seed=i) for i in range(12)]
    blobs[3], blobs[7] = b"not an image", b""
    table = _records([{"key": f"k{i}", "image": b} for i, b in enumerate(blobs)]
                     + [{"key": "unsafe", "image": b"", "status": "error", "error_type": "UnsafeMember"}])
    serial_px, serial = decode_records(table, PRE)
    with ThreadPoolExecutor(3) as pool:
        px, cols = decode_records(table, PRE, pool)
    assert np.array_equal(px, serial_px) and cols == serial
    assert cols["status"].count("ok") == 10 and cols["status"][-1] == "error"
    assert (cols["error_type"][3], cols["error_type"][7], cols["error_type"][-1]) == \
        ("UnsupportedFormat", "EmptyFile", "UnsafeMember")
    assert px[0].any() and not px[3].any()


def test_resize_and_crop_matches_resize_then_crop():
    """The one-resample crop (Pillow's box) against the two-step definition it replaces."""
    from pipeline.decode import _resize_target, resize_and_crop

    img = Image.open(io.BytesIO(image_bytes(640, 480, seed=9))).convert("RGB")
    pre = Preprocess(image_size=224, resize="crop", crop_pct=0.875)
    tw, th = _resize_target(*img.size, pre)
    two_step = img.resize((tw, th), Image.BICUBIC, reducing_gap=None)
    left, top = (tw - 224) // 2, (th - 224) // 2
    two_step = np.asarray(two_step.crop((left, top, left + 224, top + 224)), dtype=np.int16)
    one = np.asarray(resize_and_crop(img, pre), dtype=np.int16)
    assert one.shape == (224, 224, 3)
    assert np.abs(one - two_step).mean() < 1.0  # resampling at box edges differs by a level or two


def test_the_decode_stage_hands_the_model_the_same_pixels_and_errors():
    """GPU clusters decoding on CPUs do it in Decoder actors; the model actor then reads `pixels`
    without a copy. Records, their order, the error columns and the pixels must equal decoding in
    the model actor, and the part travels on with its shard, number and last flag."""
    from pipeline.decode import Decoder, decode_records
    from pipeline.sources import Part, Shard, part_row, parts_of

    records = _records([{"key": "a", "image": image_bytes(90, 50, seed=1)},
                        {"key": "bad", "image": b"not an image at all"},
                        {"key": "unsafe", "image": b"", "status": "error", "error_stage": "read",
                         "error_type": "UnsafeMember", "error_message": "unsafe"},
                        {"key": "b", "image": image_bytes(40, 70, "PNG", seed=2)}])
    fused_pixels, fused_cols = decode_records(records, PRE)
    part = Part(Shard("s3://b/s.tar", "e", 0), 3, True, records)
    staged = list(parts_of(Decoder(PRE.to_dict())(part_row(part))))
    assert len(staged) == 1 and (staged[0].shard.uri, staged[0].index, staged[0].last) == ("s3://b/s.tar", 3, True)
    out = staged[0].records
    assert "image" not in out.column_names and out.column("key").to_pylist() == ["a", "bad", "unsafe", "b"]
    pixels, cols = decode_records(out, PRE)
    assert cols == fused_cols
    assert cols["status"] == ["ok", "error", "error", "ok"]
    assert cols["error_type"][1] == "UnsupportedFormat" and cols["error_type"][2] == "UnsafeMember"
    assert pixels.shape == (4, 32, 32, 3) and np.array_equal(pixels, fused_pixels)
    assert pixels[0].std() > 0 and not pixels[1].any()  # real pixels for ok rows, zeros for the others
