"""Image sizes the model accepts: sides in multiples of 16 pixels, one token per 16x16.

The VAE downsamples 8x and the transformer packs 2x2 latent patches into one token,
so an HxW image becomes (H/16)(W/16) tokens and both sides must be multiples of 16
(diffusers' QwenImagePipeline floors them to that multiple). Every check of a
resolution or bucket, in the data jobs and the trainer, goes through this module.
"""

from __future__ import annotations

PIXELS_PER_TOKEN = 16
"""Side of the square of pixels one image token covers (VAE 8x times the 2x2 latent patch)."""
WHY = "8x VAE downsampling times the 2x2 latent patch"
"""The reason an error about a side length gives."""


def is_valid_side(side: int) -> bool:
    """A positive multiple of PIXELS_PER_TOKEN."""
    return side > 0 and side % PIXELS_PER_TOKEN == 0


def floor_side(side: int) -> int:
    """The largest multiple of PIXELS_PER_TOKEN not above `side` (0 below it)."""
    return side // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN


def round_side(side: int) -> int:
    """The nearest positive multiple of PIXELS_PER_TOKEN: what to suggest for a wrong side."""
    return max(PIXELS_PER_TOKEN, int(round(side / PIXELS_PER_TOKEN)) * PIXELS_PER_TOKEN)


def parse_bucket(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height); the sides are not checked (see check_size)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket {text!r} is not WIDTHxHEIGHT (e.g. 640x384)") from None
    return w, h


def bucket_name(size: tuple[int, int]) -> str:
    """(width, height) -> "WxH", the inverse of parse_bucket."""
    return f"{size[0]}x{size[1]}"


def check_size(width: int, height: int, where: str = "", *, suggest: bool = False) -> None:
    """A ValueError unless both sides are positive multiples of PIXELS_PER_TOKEN;
    `suggest` appends the nearest valid size."""
    if is_valid_side(width) and is_valid_side(height):
        return
    message = (f"{where}resolution {width}x{height} is not a positive multiple of {PIXELS_PER_TOKEN} ({WHY})")
    if suggest:
        message += f"; try {round_side(width)}x{round_side(height)}"
    raise ValueError(message)


def image_tokens(height: int, width: int) -> int:
    """Packed latent tokens of an HxW image: (H/16)(W/16)."""
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
