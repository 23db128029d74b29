"""dyvte.data.video: ``FramesVideoProcessor`` (video frames through the image processor, no torchvision) and
``attach_frames_video_processor``; the withdrawal invariants on its video rows are ``tests/engine/test_video.py``'s.

- GLM-4V's temporal patches hold frame ``g * t + i`` in slot ``i`` of group ``g``, and a still image's patches are the
  image processor's own;
- bad input (no video placeholder, videos of different lengths, a video that is not frames, fps <= 0) is refused.
"""

from __future__ import annotations

import pytest
import torch

from dyvte.data.video import FramesVideoProcessor, attach_frames_video_processor

from ..tiny_models import make_row_images, make_tiny
from ..video_inputs import FRAME


def test_temporal_patches_hold_each_frame_in_its_slot() -> None:
    """GLM-4V layout: slot i of temporal group g is frame g * t + i; a still frame is the image processor's patch."""
    _, processor = make_tiny("glm4v")
    image_processor = processor.image_processor
    frames = make_row_images([FRAME] * 3, row_id=5)  # 3 frames: padded to 4 by repeating the last one
    out = FramesVideoProcessor(image_processor, fps=2.0)([frames])
    step = image_processor.temporal_patch_size
    still = [image_processor(images=[f], return_tensors="pt")["pixel_values"] for f in frames]  # (N, C*t*p*p) each
    num = still[0].shape[0]
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]] and out["pixel_values_videos"].shape == (2 * num, 96)
    video = out["pixel_values_videos"].view(2, num, 3, step, -1)  # (G, N, C, t, p*p)
    for group in range(2):
        for slot in range(step):
            frame = still[min(group * step + slot, 2)].view(num, 3, step, -1)[:, :, 0]
            assert torch.equal(video[group, :, :, slot], frame)
    assert out["video_metadata"][0].timestamps == [0.0, 0.5, 1.0, 1.5]


def test_video_helper_refuses_bad_input() -> None:
    _, processor = make_tiny("llava")
    with pytest.raises(ValueError, match="no video placeholder"):
        attach_frames_video_processor(processor)
    frames = FramesVideoProcessor(processor.image_processor)
    with pytest.raises(ValueError, match="same frame count"):
        frames([make_row_images([FRAME] * 2), make_row_images([FRAME] * 3)])
    with pytest.raises(ValueError, match="sequence of frames"):
        frames([[1, 2]])
    with pytest.raises(ValueError, match="fps"):
        FramesVideoProcessor(processor.image_processor, fps=0)
