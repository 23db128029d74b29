"""The test helper ``tests/video_inputs.py``: its Qwen-layout videos are the video processor's layout, and its
image-and-text rows the processor's own inputs (withdrawal on its rows: ``tests/engine/test_video_qwen.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .families import with_video
from .tiny_models import make_batch, make_image, make_tiny
from .video_inputs import make_video_batch, video_pixels


def test_video_pixels_are_the_video_processor_layout():
    """Frames through the image processor = the video processor's patch permutation of the normalised frames; a video
    of ``temporal_patch_size`` copies of one image is that image's pixel rows."""
    _, processor = make_tiny("qwen2_vl", num_layers=1)
    ip = processor.image_processor
    rng = np.random.default_rng(0)
    frames = [make_image(32, 48, rng) for _ in range(4)]  # 32x48 is a multiple of patch * merge: not resized
    values, grid = video_pixels(ip, frames)
    temporal, patch, merge = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    raw = (np.stack([np.asarray(f, dtype=np.float32) for f in frames]) / 255 - 0.5) / 0.5  # (F, H, W, C)
    raw = raw.transpose(0, 3, 1, 2)  # (F, C, H, W)
    steps, height, width = len(frames) // temporal, 32 // patch, 48 // patch
    video = raw.reshape(steps, temporal, 3, height // merge, merge, patch, width // merge, merge, patch)
    video = video.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # the video processor's permute (batch axis dropped)
    assert grid == [steps, height, width]
    np.testing.assert_allclose(values, video.reshape(steps * height * width, -1), atol=1e-6)
    still, _ = video_pixels(ip, frames[:1] * temporal)
    np.testing.assert_array_equal(still, ip(images=frames[:1], return_tensors="np")["pixel_values"])
    padded, padded_grid = video_pixels(ip, frames[:3])  # 3 frames: the last one is repeated
    assert padded_grid == grid and np.array_equal(padded, video_pixels(ip, [*frames[:3], frames[2]])[0])
    with pytest.raises(ValueError, match="same size"):
        video_pixels(ip, [frames[0], make_image(48, 48, rng)])


@pytest.mark.parametrize("family", with_video("grid"))
def test_image_rows_equal_the_processor(family):
    """On image and text rows, :func:`make_video_batch` gives the processor's own inputs."""
    _, processor = make_tiny(family, num_layers=1)
    rows = [[(32, 32)], [(48, 32), (32, 32)], []]
    ours = make_video_batch(processor, family, [[("image", size) for size in row] for row in rows])
    theirs = make_batch(processor, family, rows)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), (family, key)
