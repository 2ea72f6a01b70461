"""Stored image bytes -> the pixels the model sees, one decoder for every consumer.

The trainer's loader (qwenimg_train.data.loader) and the precompute job both decode
through `decode_image` at the bucket `nearest_bucket` picks, so precomputed latents
are those the online encoder would compute from the same sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, image_reason, open_image

if TYPE_CHECKING:  # pragma: no cover
    import torch


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) of `sizes` whose aspect ratio is nearest the image's (in log ratio)."""
    ratio = np.log(width / height)
    return min(sizes, key=lambda s: abs(np.log(s[0] / s[1]) - ratio))


def to_unit_range(images_bchw: "torch.Tensor") -> "torch.Tensor":
    """uint8 images -> float in [-1, 1] (the VAE's input range), on whatever device they are."""
    return images_bchw.float().div_(127.5).sub_(1.0)


def decode_image(data: bytes, size: tuple[int, int], reduced: bool, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 array [H, W, 3], covering `size` and centre-cropped.

    Raises `BadSample` with its reason (empty, oversized, truncated, undecodable): the
    header is checked against `max_pixels` before a pixel is decoded (decompression
    bombs), and truncated files stay errors (data_pipelines.core.untrusted)."""
    try:
        return _decode(open_image(data, max_pixels), size, reduced)
    except (BadSample, MemoryError):
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        raise BadSample(image_reason(exc), f"{type(exc).__name__}: {exc}"[:200]) from None


def _decode(opened: Image.Image, size: tuple[int, int], reduced: bool) -> np.ndarray:
    tw, th = size
    with opened as im:
        if reduced and im.format == "JPEG":
            # DCT-domain downscaling: decodes at 1/2, 1/4 or 1/8 size when that still
            # covers the target (about 3.2x faster than a full decode and resize at 256²).
            scale = max(tw / im.width, th / im.height)
            im.draft("RGB", (int(im.width * scale + 0.5), int(im.height * scale + 0.5)))
        # convert() copies even an RGB image; load() decodes in place.
        if im.mode == "RGB":
            im.load()
        else:
            im = im.convert("RGB")
        if im.size != (tw, th):
            scale = max(tw / im.width, th / im.height)
            cw, ch = tw / scale, th / scale
            x0, y0 = (im.width - cw) / 2, (im.height - ch) / 2
            im = im.resize((tw, th), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        return rgb_array(im)


def rgb_array(im: Image.Image) -> np.ndarray:
    """A loaded RGB image -> read-only uint8 array [H, W, 3], the pixels of `np.asarray(im)`.

    Pillow stores RGB as 4 bytes a pixel; `np.asarray` packs it through `tobytes`, in
    64 KiB pieces joined at the end: a second copy of every pixel. One call of the same
    raw encoder with room for the whole image packs it once (about 30% faster at 512²).
    `Image._getencoder` is Pillow's internal accessor that `tobytes` itself uses; if it
    ever packs less than the whole image in one call, `tobytes` is the fallback."""
    assert im.mode == "RGB", im.mode
    width, height = im.size
    encoder = Image._getencoder("RGB", "raw", "RGB")
    try:
        encoder.setimage(im.im, (0, 0, width, height))
        _, status, data = encoder.encode(width * height * 3)
    finally:
        encoder.cleanup()
    if status != 1 or len(data) != width * height * 3:  # not all of it in one call: Pillow's own way
        data = im.tobytes()
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
