"""Images as a person sees them (dyvte.data.images): transparency over white, 16-bit scaled by its range, EXIF
orientation applied, degenerate images warned about, on every path an image enters dyvte (a path, bytes, a
``{"bytes", "path"}`` mapping, a caller's PIL image, a records file decoded by ``datasets``, video frames).

Each kind of image is written in ``tmp_path`` and its normalized pixels are compared with the RGB image a viewer
shows. That the demo model answers such files as it answers the plain ones is ``tests/eval/test_harness.py``'s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dyvte.data.images import MIN_SIDE, input_side, to_rgb
from dyvte.data.records import build_inputs, open_image
from dyvte.data.sources import load_records
from dyvte.data.video import FramesVideoProcessor
from dyvte.demo import load_demo_processor

from .test_records import FakeProcessor

#: EXIF orientation tag
ORIENTATION = 0x0112


def scene(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """``(H, W)`` uint8 grey levels, every level present (a clipped or shifted conversion cannot pass unnoticed)."""
    values = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    values.flat[:256] = np.arange(256, dtype=np.uint8)
    return values


def rgb(grey: np.ndarray) -> np.ndarray:
    """The ``(H, W, 3)`` RGB pixels of a grey image."""
    return np.repeat(grey[..., None], 3, axis=-1)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_transparency_is_composited_over_white(tmp_path):
    grey = scene()
    ink = 255 - grey  # ink drawn only in alpha: black, as opaque as the scene is dark
    Image.fromarray(np.dstack([np.zeros_like(grey)] * 3 + [ink])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([np.zeros_like(grey), ink]), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(rgb(grey)).save(tmp_path / "opaque.png")
    opaque = pixels(open_image(str(tmp_path / "opaque.png"), "record 0"))
    assert np.array_equal(opaque, rgb(grey))
    for name in ("rgba.png", "la.png"):
        assert np.array_equal(pixels(open_image(str(tmp_path / name), "record 0")), opaque), name
        assert np.asarray(Image.open(tmp_path / name).convert("RGB")).max() == 0  # what dropping alpha showed

    # a palette image with a transparent background colour, and a grey image with a transparent grey (tRNS)
    index = (grey > 127).astype(np.uint8)  # 0: background, 1: ink
    palette = Image.fromarray(index, mode="P")
    palette.putpalette([10, 200, 30, 200, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    expected = np.where(index[..., None] == 1, np.array([200, 0, 0], np.uint8), np.uint8(255))
    assert np.array_equal(pixels(open_image(str(tmp_path / "palette.png"), "record 0")), expected)
    Image.fromarray(grey).save(tmp_path / "keyed.png", transparency=0)
    expected = rgb(np.where(grey == 0, np.uint8(255), grey))
    assert np.array_equal(pixels(open_image(str(tmp_path / "keyed.png"), "record 0")), expected)
    premultiplied = Image.fromarray(np.dstack([np.zeros_like(grey)] * 3 + [ink])).convert("RGBa")
    assert np.array_equal(pixels(to_rgb(premultiplied)), opaque)


def test_high_bit_depth_is_scaled_by_its_range_not_clipped(tmp_path):
    grey = scene()
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 16-bit greyscale PNG
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    assert np.array_equal(pixels(open_image(str(tmp_path / "sixteen.png"), "record 0")), rgb(grey))
    assert set(np.unique(np.asarray(Image.open(tmp_path / "sixteen.png").convert("RGB")))) <= {0, 255}  # the bug
    big_endian = Image.frombytes("I;16B", grey.shape[::-1], (grey.astype(">u2") * 257).tobytes())  # (16-bit TIFF)
    assert np.array_equal(pixels(to_rgb(big_endian)), rgb(grey))

    # I and F: the smallest of 0..1 (F), 0..255, 0..65535 that holds every value, else the image's min..max
    cases = {
        "I on 0..65535": Image.fromarray(grey.astype(np.int32) * 257),
        "I on 0..255": Image.fromarray(grey.astype(np.int32)),
        "F on 0..1": Image.fromarray(grey.astype(np.float32) / 255),
        "F on 0..255": Image.fromarray(grey.astype(np.float32)),
        "F on -1..1": Image.fromarray(grey.astype(np.float32) / 127.5 - 1),
    }
    for name, image in cases.items():
        assert np.array_equal(pixels(to_rgb(image)), rgb(grey)), name


def _oriented(upright: Image.Image, path: Path, orientation: int = 6, **save: object) -> None:
    """Save ``upright`` stored as a camera does (rotated) with the EXIF tag that rotates it back for display."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 displays it rotated 270 degrees back
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, exif=exif.tobytes(), **save)


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    upright = Image.fromarray(rgb(scene()))  # 40 x 24: a rotation shows in the size
    _oriented(upright, tmp_path / "rotated.png")
    _oriented(upright, tmp_path / "rotated.jpg", quality=95)
    assert Image.open(tmp_path / "rotated.png").size == (24, 40)
    for name in ("rotated.png", "rotated.jpg"):
        path = tmp_path / name
        data = path.read_bytes()
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": name, "question": "q", "answer": "a"}) + "\n")
        decoded = load_records(str(tmp_path / f"{name}.jsonl"))[0]["image"]  # datasets decodes it
        opened = Image.open(path)
        seen = {
            "path": open_image(str(path), "record 0"),
            "Path": open_image(path, "record 0"),
            "bytes": open_image(data, "record 0"),
            "bytes mapping": open_image({"bytes": data, "path": None}, "record 0"),
            "path mapping": open_image({"bytes": None, "path": str(path)}, "record 0"),
            "caller's PIL image": open_image(opened, "record 0"),
            "records file": open_image(decoded, "record 0"),
            "build_inputs": build_inputs(FakeProcessor(), [{"image": opened, "question": "q"}])["images"][0][0],
        }
        first = pixels(seen["path"])
        assert first.shape == (24, 40, 3), name
        for where, image in seen.items():
            assert np.array_equal(pixels(image), first), f"{name} via {where}"
        error = np.abs(first.astype(int) - np.asarray(upright).astype(int)).mean()
        assert error == 0 if name.endswith(".png") else error < 12, (name, error)
        assert opened.size == (24, 40) and opened.getexif()[ORIENTATION] == 6  # the caller's image is left as it was
        assert pixels(to_rgb(to_rgb(opened))).shape == (24, 40, 3)  # applying the rule twice rotates once


def test_rgb_images_pass_through_unchanged():
    image = Image.fromarray(rgb(scene()))
    assert to_rgb(image) is image  # no copy of an RGB, upright, opaque image
    grey = Image.fromarray(scene())
    assert to_rgb(grey).mode == "RGB" and grey.mode == "L"


def test_degenerate_images_warn_once_per_batch_and_dataset_naming_the_records(tmp_path, caplog):
    good = {"image": Image.new("RGB", (MIN_SIDE, MIN_SIDE)), "question": "q", "answer": "a"}
    dot = {"image": Image.new("RGB", (1, 1)), "question": "q", "answer": "a"}
    with caplog.at_level(logging.WARNING, logger="dyvte.data.images"):
        build_inputs(FakeProcessor(), [good, dot, dot | {"image": Image.new("L", (40, 3))}], offset=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "records 4..6: 2 degenerate image(s), under 8 px a side: record 5 (1x1), record 6 (40x3)" in warnings[0]

    caplog.clear()
    processor = FakeProcessor()
    processor.image_processor = SimpleNamespace(size={"height": 336, "width": 336})  # LLaVA-1.5's input side
    assert input_side(processor) == 336
    with caplog.at_level(logging.WARNING, logger="dyvte.data.images"):
        build_inputs(
            processor, [good | {"image": Image.new("RGB", (41, 60))}, good | {"image": Image.new("RGB", (42, 42))}]
        )
    assert "under 42 px a side: record 0 (41x60)" in caplog.text and "record 1" not in caplog.text
    assert input_side(SimpleNamespace(image_processor=SimpleNamespace(size={"shortest_edge": 3136}))) is None

    caplog.clear()
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs/0.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "imgs/1.png")
    rows = [{"image": f"imgs/{i % 2}.png", "question": "q", "answer": "a"} for i in range(4)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="dyvte.data.images"):
        ds = load_records(str(path))
    assert len(ds) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 degenerate image(s)" in warnings[0], warnings
    assert "record 1 (line 2) (2x2), record 3 (line 4) (2x2)" in warnings[0]


@pytest.mark.parametrize("kind", ["RGBA", "I;16"])
def test_video_frames_follow_the_same_rule(kind):
    grey = scene(48, 48)
    opaque = [Image.fromarray(rgb(np.roll(grey, k, axis=1))) for k in range(3)]
    if kind == "RGBA":
        frames = [Image.fromarray(np.dstack([np.zeros_like(grey)] * 3 + [255 - np.asarray(f)[..., 0]])) for f in opaque]
    else:
        frames = [Image.fromarray(np.asarray(f)[..., 0].astype(np.uint16) * 257) for f in opaque]
    video = FramesVideoProcessor(load_demo_processor().image_processor)
    got = video([frames])["pixel_values_videos"]
    assert got.shape[:2] == (1, 3)
    assert np.array_equal(got.numpy(), video([opaque])["pixel_values_videos"].numpy())
