"""Video inputs without torchvision: frames through the image processor (docs/design.md §6).

transformers' video processors need torchvision, which must not be installed next to the CPU torch (docs/design.md
§6), so processors with a video slot cannot turn videos into model inputs. :class:`FramesVideoProcessor` stands in
for the video processor: it runs every frame through the processor's own *image* processor and stacks the frames in
the layout the model's ``get_video_features`` reads. The processor then expands its video placeholder with its own
``replace_video_token`` (transformers' code, not dyvte's), so the prompt and the features always agree::

    processor = attach_frames_video_processor(processor)         # processor.video_processor = FramesVideoProcessor
    inputs = processor(text=["<video> what happens?"], videos=[frames], return_tensors="pt", padding=True)

Two layouts, chosen from what the image processor returns (no family is named here):

* **stacked frames** (Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision): ``pixel_values_videos`` ``(V, F, C, H, W)``,
  each frame processed as an image. An any-resolution image processor (LLaVA-NeXT, OneVision) returns several views
  per image; a frame keeps the first one, the whole frame resized to the tower's input. Every video of one call needs
  the same frame count (the model takes one tensor).
* **temporal patches** (GLM-4V; image processors that return ``image_grid_thw``): the image processor repeats a
  still image ``temporal_patch_size`` times inside each flattened patch ``(C, t, p, p)``; for a video, slot ``t`` of
  temporal group ``g`` holds frame ``g * temporal_patch_size + t`` instead. Output: ``pixel_values_videos``
  ``(sum of patches, C * t * p * p)``, ``video_grid_thw`` ``(V, 3)`` = (groups, h, w), and ``video_metadata`` (frame
  timestamps from ``fps``; GLM-4V writes them into the prompt). A frame count that is not a multiple of the temporal
  patch size is padded by repeating the last frame.

Differences from the official video processors: frames are resized as the image processor resizes images (LLaVA-NeXT-
Video's video processor centre-crops instead; pass ``image_processor=`` to choose another), and no frames are sampled:
pass the frames you want.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from dyvte.data.images import to_rgb

__all__ = ["FramesVideoProcessor", "attach_frames_video_processor"]

logger = logging.getLogger(__name__)

_PIXEL_KEYS = ("pixel_values", "pixel_values_images")  # what image processors call their output (Video-LLaVA: both)


class FramesVideoProcessor:
    """A video processor made of an image processor: frames go through it one by one (see the module docstring).

    Attributes:
        image_processor: the image processor frames go through.
        fps: frames per second of the frames passed (for timestamps in ``video_metadata``).
        merge_size, temporal_patch_size, patch_size: the image processor's, when it has them (processors read
            ``video_processor.merge_size`` to count placeholders).
    """

    def __init__(self, image_processor: Any, fps: float = 1.0) -> None:
        if image_processor is None:
            raise ValueError("FramesVideoProcessor needs an image processor (the processor has none)")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.image_processor = image_processor
        self.fps = float(fps)
        for name in ("merge_size", "temporal_patch_size", "patch_size"):
            if hasattr(image_processor, name):
                setattr(self, name, getattr(image_processor, name))

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        """Process ``videos`` (a video, or a list of videos; a video is a sequence of frames: PIL images or
        ``(H, W, C)`` arrays, or one ``(F, H, W, C)`` array). Other keyword arguments are ignored.

        PIL frames are first made the RGB image a person sees (:func:`dyvte.data.images.to_rgb`: EXIF orientation,
        transparency over white, 16-bit scaled), as every image dyvte reads; arrays are passed as they are."""
        clips = [
            [to_rgb(frame) if isinstance(frame, Image.Image) else frame for frame in clip] for clip in _as_clips(videos)
        ]
        if not clips:
            raise ValueError("no video to process")
        probe = self.image_processor(images=[clips[0][0]], return_tensors="pt")
        if "image_grid_thw" in probe:
            return self._temporal_patches(clips)
        return self._stacked(clips)

    def _frames(self, frames: Sequence[Any]) -> BatchFeature:
        return self.image_processor(images=list(frames), return_tensors="pt")

    def _stacked(self, clips: list[list[Any]]) -> BatchFeature:
        out = []
        for clip in clips:
            processed = self._frames(clip)
            pixels = next((processed[k] for k in _PIXEL_KEYS if k in processed), None)
            if pixels is None:
                raise ValueError(f"the image processor returned none of {_PIXEL_KEYS}: {sorted(processed)}")
            if pixels.dim() == 5:  # any-resolution: (F, views, C, H, W); the first view is the whole frame
                pixels = pixels[:, 0]
            out.append(pixels)  # (F, C, H, W)
        shapes = {tuple(p.shape) for p in out}
        if len(shapes) != 1:
            raise ValueError(
                f"videos of one call must have the same frame count and processed size, got {sorted(shapes)}: the "
                "model takes pixel_values_videos as one (videos, frames, C, H, W) tensor"
            )
        return BatchFeature({"pixel_values_videos": torch.stack(out)})  # (V, F, C, H, W)

    def _temporal_patches(self, clips: list[list[Any]]) -> BatchFeature:
        from transformers.video_utils import VideoMetadata

        step = int(getattr(self.image_processor, "temporal_patch_size", 1))
        pixels, grids, metadata = [], [], []
        for clip in clips:
            frames = list(clip) + [clip[-1]] * (-len(clip) % step)  # pad by repeating the last frame
            processed = self._frames(frames)
            grid = processed["image_grid_thw"]  # (F, 3): (1, h, w) each
            if len({tuple(g.tolist()) for g in grid}) != 1:
                raise ValueError("the frames of one video must be processed to the same size")
            per_frame = processed["pixel_values"].view(len(frames), -1, *self._patch_shape(processed, step))
            # (F, N, C, t, p*p): a still image repeats itself in t; a video puts frame g*t + i in slot i of group g
            groups = per_frame[:, :, :, 0].unflatten(0, (len(frames) // step, step))  # (G, t, N, C, p*p)
            groups = groups.permute(0, 2, 3, 1, 4)  # (G, N, C, t, p*p)
            pixels.append(groups.flatten(2).flatten(0, 1))  # (G * N, C * t * p * p)
            grids.append([len(frames) // step, int(grid[0, 1]), int(grid[0, 2])])
            metadata.append(
                VideoMetadata(total_num_frames=len(frames), fps=self.fps, frames_indices=list(range(len(frames))))
            )
        out = BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)})
        out["video_metadata"] = metadata
        return out

    @staticmethod
    def _patch_shape(processed: BatchFeature, step: int) -> tuple[int, int, int]:
        """``(C, t, p*p)`` of one flattened patch ``C * t * p * p`` (channels: 3)."""
        width = processed["pixel_values"].shape[-1]
        channels = 3
        if width % (channels * step):
            raise ValueError(f"a patch of {width} values is not (3 channels x {step} frames x p x p)")
        return channels, step, width // (channels * step)


def _as_clips(videos: Any) -> list[list[Any]]:
    """Normalise ``videos`` to a list of videos, each a list of frames."""
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
        return [list(videos)]
    if isinstance(videos, (list, tuple)) and videos and _is_frame(videos[0]):
        return [list(videos)]
    if isinstance(videos, (list, tuple)):
        clips = []
        for video in videos:
            if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:
                clips.append(list(video))
            elif isinstance(video, (list, tuple)) and video and all(_is_frame(f) for f in video):
                clips.append(list(video))
            else:
                raise ValueError(
                    "a video must be a non-empty sequence of frames (PIL images or (H, W, C) arrays) or one "
                    f"(F, H, W, C) array, got {type(video).__name__}"
                )
        return clips
    raise ValueError(f"videos must be a video or a list of videos, got {type(videos).__name__}")


def _is_frame(x: Any) -> bool:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 3
    return hasattr(x, "size") and hasattr(x, "mode")  # a PIL image


def attach_frames_video_processor(processor: Any, image_processor: Any = None, fps: float = 1.0) -> Any:
    """Give ``processor`` a :class:`FramesVideoProcessor` as its ``video_processor``; returns the processor.

    Args:
        processor: a transformers processor with a video placeholder (``processor(videos=...)`` then works).
        image_processor: the image processor frames go through (default: the processor's own).
        fps: frames per second of the frames you will pass (timestamps in GLM-4V's prompt).

    Raises:
        ValueError: the processor has no video placeholder token.
    """
    if getattr(processor, "video_token", None) is None:
        raise ValueError(f"{type(processor).__name__} has no video placeholder (video_token): it takes no video")
    processor.video_processor = FramesVideoProcessor(image_processor or processor.image_processor, fps=fps)
    return processor
