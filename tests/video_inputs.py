"""Video inputs without torchvision (test-support module, not a test file), the two ways of the families table.

transformers' video processors need torchvision, which must never be installed here (docs/design.md §6), so every
tiny processor is built with ``video_processor=None``:

- families with ``video="frames"`` (``tests/families.py``: Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision, GLM-4V)
  take videos through ``dyvte.data.video.FramesVideoProcessor`` (frames through the image processor):
  :func:`encode_frames` builds their batches mixing image, video and text-only rows (:data:`FRAMES_ROWS`);
- families with ``video="grid"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) cannot take ``videos=`` at all;
  :func:`make_video_batch` builds the same model inputs another way:

- **pixels**: every frame goes through the family's *image* processor (``Qwen2VLImageProcessorPil``: resize,
  rescale, normalise, patchify). An image's patch rows hold its one frame repeated ``temporal_patch_size`` times;
  :func:`video_pixels` keeps one copy per frame and stacks consecutive frames along that temporal axis, which is
  exactly the video processor's layout (``(t, h/m, w/m, m, m)`` rows of ``(C, temporal, p, p)`` values;
  ``tests/test_video_inputs.py`` checks it against that permutation applied to the raw frames). A frame count that is
  not a multiple of ``temporal_patch_size`` is padded with copies of the last frame, as the video processor does.
- **prompt**: the processor refuses ``<|video_pad|>`` tokens without ``videos=``, so the prompt is expanded here as
  the processor would, one placeholder per ``merge_size**2`` patches: an image's ``<|image_pad|>`` by its grid; a
  video (Qwen2-VL / Qwen2.5-VL) as one ``<|vision_start|>`` … ``<|vision_end|>`` run, (Qwen3-VL) as one run per
  temporal patch, each after its ``<{seconds:.1f} seconds>`` timestamp (at :data:`FPS`). The tokenizer pads on the
  left and the processor's own ``create_mm_token_type_ids`` gives ``mm_token_type_ids`` (1 image, 2 video), which the
  models' 3-D rope index reads. On image-only rows this is exactly the processor's output (tested).
- **extras**: ``pixel_values_videos`` and ``video_grid_thw`` (``(t, h, w)`` in patches); Qwen2.5-VL also gets
  ``second_per_grid_ts`` (``temporal_patch_size / FPS`` per video), as its processor returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from .families import family as entry
from .tiny_models import WORDS, make_image, make_prompt, make_row_images

FPS = 2.0  # frames per second the tiny videos are taken at (Qwen3-VL's timestamps, Qwen2.5-VL's second_per_grid_ts)

Item = tuple[str, tuple[int, ...]]  # ("image", (h, w)) or ("video", (frames, h, w))


def video_pixels(image_processor: Any, frames: Sequence[Image.Image]) -> tuple[np.ndarray, list[int]]:
    """``pixel_values_videos`` rows ``(t * h * w, C * temporal * p * p)`` and ``[t, h, w]`` of one video.

    Args:
        image_processor: the family's Qwen2-VL-style image processor (``patch_size``, ``merge_size``,
            ``temporal_patch_size``).
        frames: the video's frames, all of one size.
    """
    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    frames = list(frames)
    if len({frame.size for frame in frames}) != 1:
        raise ValueError("every frame of a video must have the same size")
    frames += [frames[-1]] * (-len(frames) % temporal)  # the video processor pads with the last frame
    out = image_processor(images=frames, return_tensors="np")
    grids = out["image_grid_thw"]  # (F, 3): [1, h, w] per frame
    _, height, width = (int(x) for x in grids[0])
    count, steps = len(frames), len(frames) // temporal
    rows = out["pixel_values"].reshape(count, height * width, -1, temporal, patch, patch)[:, :, :, 0]  # (F, S, C, p, p)
    rows = rows.reshape(steps, temporal, height * width, -1, patch, patch).transpose(0, 2, 3, 1, 4, 5)
    return np.ascontiguousarray(rows.reshape(steps * height * width, -1)), [steps, height, width]


def video_prompt(family: str, processor: Any, grid: Sequence[int]) -> str:
    """The expanded placeholder text of one video with grid ``[t, h, w]`` (see the module docstring)."""
    tokenizer = processor.tokenizer
    start, end, pad = "<|vision_start|>", "<|vision_end|>", tokenizer.video_token
    steps, height, width = grid
    per_step = height * width // processor.image_processor.merge_size**2
    if family.startswith("qwen3_vl"):  # Qwen3-VL and Qwen3-VL-MoE
        temporal = processor.image_processor.temporal_patch_size
        seconds = [(i * temporal + (temporal - 1) / 2) / FPS for i in range(steps)]  # mean time of each step's frames
        return "".join(f"<{s:.1f} seconds>{start}{pad * per_step}{end}" for s in seconds)
    return start + pad * (steps * per_step) + end


def make_video_batch(
    processor: Any,
    family: str,
    rows: Sequence[Sequence[Item]],
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
) -> BatchFeature:
    """Left-padded batch of rows mixing images, videos and text.

    Args:
        processor: the processor of :func:`tests.tiny_models.make_tiny` for ``family`` (one of
            ``tests.families.with_video("grid")``).
        rows: per row, its visual items in prompt order: ``("image", (h, w))`` or ``("video", (frames, h, w))``;
            ``[]`` is a text-only row.
        row_ids: index each row's content is drawn from (default ``range(len(rows))``): a row's words, pixels and
            frames depend only on ``(seed, row_id)``, so a row alone equals that row of the batch; words and images
            are those of :func:`tests.tiny_models.make_batch`.
    """
    ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    merge = image_processor.merge_size**2
    texts, images, videos, grids = [], [], [], []
    for row, row_id in zip(rows, ids, strict=True):
        pixels = np.random.default_rng([seed + 7919, row_id])  # tiny_models.make_row_images' generator
        parts = []
        for kind, size in row:
            if kind == "image":
                image = make_image(*size, pixels)
                images.append(image)
                grid = image_processor(images=[image], return_tensors="np")["image_grid_thw"][0]
                placeholder = entry(family).prompt_image
                parts.append(placeholder.replace(tokenizer.image_token, "\0" * (grid.prod() // merge)))
            elif kind == "video":
                count, height, width = size
                frames = [make_image(height, width, pixels) for _ in range(count)]
                values, grid = video_pixels(image_processor, frames)
                videos.append(values)
                grids.append(grid)
                parts.append(video_prompt(family, processor, grid))
            else:
                raise ValueError(f"unknown item kind {kind!r}; expected 'image' or 'video'")
        words = make_prompt(family, [], row_id, seed)  # the words make_batch gives this row
        texts.append(" ".join([*parts, words]).replace("\0", tokenizer.image_token))
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    batch["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(batch["input_ids"].tolist()))
    if images:
        batch.update(image_processor(images=images, return_tensors="pt"))
    if videos:
        batch["pixel_values_videos"] = torch.from_numpy(np.concatenate(videos))
        batch["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if family == "qwen2_5_vl":
            temporal = image_processor.temporal_patch_size
            batch["second_per_grid_ts"] = torch.full((len(videos),), temporal / FPS)
    return BatchFeature(dict(batch))


# -------------------------------------------------------------------------- Qwen-layout batches of the tests
# a 4-frame video / an image then a 3-frame video (padded to 4) of another size / text only / a 2-frame video
GRID_ROWS: list[list[Item]] = [
    [("video", (4, 32, 32))],
    [("image", (32, 32)), ("video", (3, 48, 32))],
    [],
    [("video", (2, 32, 48))],
]


def encode_grid(processor: Any, family: str, only: int | None = None) -> dict:
    """The left-padded batch of :data:`GRID_ROWS` (or row ``only`` alone), by :func:`make_video_batch`."""
    if only is None:
        return dict(make_video_batch(processor, family, GRID_ROWS))
    return dict(make_video_batch(processor, family, [GRID_ROWS[only]], row_ids=[only]))


# -------------------------------------------------------------- videos through FramesVideoProcessor
#: Per row: (image sizes, number of video frames); 0 frames = no video. Rows 1 and 4: the same video length.
FRAMES_ROWS: list[tuple[list[tuple[int, int]], int]] = [([(32, 32)], 0), ([], 4), ([], 0), ([(48, 32)], 4), ([], 4)]
#: GLM-4V's (and GLM-4V-MoE's) own model cannot take images and videos in one call: its video frames are image
#: placeholders, and it scatters the image features into every one of them (transformers 5.19-5.24: "Image features
#: and image tokens do not match"). Its batch mixes videos of different lengths (temporal patches are concatenated)
#: and text.
GLM_ROWS: list[tuple[list[tuple[int, int]], int]] = [([], 2), ([], 4), ([], 0), ([], 6), ([], 4)]


def frames_rows_of(family: str) -> list[tuple[list[tuple[int, int]], int]]:
    """The rows :func:`encode_frames` gives ``family``: :data:`GLM_ROWS` for GLM-4V(-MoE), :data:`FRAMES_ROWS` else."""
    return GLM_ROWS if family.startswith("glm4v") else FRAMES_ROWS


FRAME = (32, 32)  # the size of every video frame of FRAMES_ROWS / GLM_ROWS


def video_placeholder(processor: Any, family: str) -> str:
    """What a prompt carries once per video (GLM-4V wraps its placeholder in video start/end tokens)."""
    if family.startswith("glm4v"):
        return "<|begin_of_video|><|video|><|end_of_video|>"
    return processor.video_token


def encode_frames(processor: Any, family: str, only: int | None = None) -> dict:
    """The left-padded batch of ``frames_rows_of(family)`` (or row ``only`` alone) through a processor with
    ``FramesVideoProcessor`` attached; a row's content depends on its index only."""
    rows = frames_rows_of(family)
    ids = range(len(rows)) if only is None else [only]
    texts, images, videos = [], [], []
    for i in ids:
        sizes, frames = rows[i]
        words = " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(2 + 3 * i))
        parts = [entry(family).prompt_image for _ in sizes] + [video_placeholder(processor, family)] * bool(frames)
        texts.append(" ".join([*parts, words]))
        images.append(make_row_images(sizes, row_id=i))
        if frames:
            videos.append(make_row_images([FRAME] * frames, row_id=100 + i))
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if any(images):
        kwargs["images"] = images if only is None else images[0]
    if videos:
        kwargs["videos"] = videos
    processor.tokenizer.padding_side = "left"
    return dict(processor(**kwargs))
