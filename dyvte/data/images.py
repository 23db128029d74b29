"""Images as a person sees them: the one rule every image that enters dyvte goes through (docs/guide.md, "Your data").

:func:`to_rgb` turns any PIL image into the 8-bit RGB image an image viewer shows:

1. **EXIF orientation** is applied (``PIL.ImageOps.exif_transpose``; a camera's rotated JPEG stands upright), and
   the tag is dropped, so applying the rule twice changes nothing (``datasets`` applies it when it decodes).
2. **Transparency** (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a palette or an ``L`` / ``RGB`` image with a
   transparent colour) is composited over white, the background viewers show, instead of being dropped (dropping
   alpha shows what the transparent pixels happen to hold, often black: ink drawn only in alpha disappears).
3. **High bit depth** is scaled to 8 bits by its range, never clipped: ``I;16`` (16-bit PNG / TIFF) is divided by
   257 (65535 -> 255); ``I`` and ``F`` by the smallest of 0..1 (``F`` only), 0..255 and 0..65535 that holds every
   value (an ``I`` image read from a 16-bit file is on 0..65535), else by the image's own min..max.
4. Every other mode (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) is converted by PIL's ``convert("RGB")``.

:func:`small_images` finds degenerate images (a side under :data:`MIN_SIDE` pixels, or under 1/8 of the side the
processor resizes to when it states one); callers log one warning per batch or dataset naming the records.

Where images enter: :func:`dyvte.data.records.open_image` (records files, paths, bytes, PIL images from users or
decoded by ``datasets``: every record's image passes through it in ``build_inputs``) and
:class:`dyvte.data.video.FramesVideoProcessor` (PIL video frames).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BACKGROUND", "MIN_SIDE", "input_side", "small_images", "to_rgb", "warn_small"]

logger = logging.getLogger(__name__)

#: what transparent pixels are composited over (a viewer's background)
BACKGROUND = (255, 255, 255)
#: images with a side under this many pixels are degenerate (the model sees an upsampled blur)
MIN_SIDE = 8
#: an image whose side is under the processor's input side divided by this is far too small for it
SMALL_FACTOR = 8
#: EXIF orientation tag (0x0112)
ORIENTATION = 0x0112
#: modes with an alpha channel (premultiplied ``RGBa`` / ``La`` included)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: 16-bit integer modes: always 0..65535
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image, as a person sees it (the module's rule: EXIF orientation, transparency over
    white, high bit depth scaled by its range).

    Args:
        image: a loaded PIL image (any mode).

    Returns:
        An ``RGB`` image: ``image`` itself when it is already RGB, upright and opaque, else a new image (the input is
        never changed).
    """
    orientation = image.getexif().get(ORIENTATION, 1)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _eight_bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """An ``L`` image from a single-channel ``I;16*`` / ``I`` / ``F`` image, scaled by its range (no clipping)."""
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode in SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        tops = ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0)
        top = next((top for top in tops if low >= 0.0 and high <= top), None)
        if top is not None:
            low, high = 0.0, top
        elif high == low:  # a constant image outside 0..65535: mid grey
            low, high = low - 1.0, high + 1.0
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))  # (H, W) uint8: mode L


def input_side(processor: Any) -> int | None:
    """The side the processor's image processor resizes to, when it states one as ``height`` / ``width`` (CLIP,
    SigLIP); ``None`` otherwise (e.g. Qwen2-VL's ``size`` holds pixel counts, not sides)."""
    image_processor = getattr(processor, "image_processor", None)
    for key in ("crop_size", "size"):
        size = getattr(image_processor, key, None)
        size = size if isinstance(size, dict) else getattr(size, "__dict__", None)
        if isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
            return min(size["height"], size["width"])
    return None


def small_images(images: Sequence[Image.Image], processor: Any = None) -> tuple[int, list[int]]:
    """The smallest side an image may have, and the positions of ``images`` below it.

    The limit is :data:`MIN_SIDE`, or the processor's input side (:func:`input_side`) divided by
    :data:`SMALL_FACTOR` when that is larger.
    """
    side = input_side(processor) if processor is not None else None
    limit = max(MIN_SIDE, (side or 0) // SMALL_FACTOR)
    return limit, [i for i, image in enumerate(images) if min(image.size) < limit]


def warn_small(sizes: Sequence[tuple[int, int]], names: Sequence[str], limit: int, source: str) -> None:
    """One warning naming the records whose images are under ``limit`` pixels a side (the first five, and a count).

    Args:
        sizes: ``(width, height)`` of each small image.
        names: the record of each (e.g. ``"record 3"``).
        limit: the smallest side that is not degenerate.
        source: what holds them (a batch, a records file), for the message.
    """
    if not names:
        return
    shown = ", ".join(f"{name} ({w}x{h})" for name, (w, h) in list(zip(names, sizes, strict=True))[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    logger.warning(
        "%s: %d degenerate image(s), under %d px a side: %s%s; the model sees them upsampled, so their answers say "
        "little about the images",
        source,
        len(names),
        limit,
        shown,
        more,
    )
