"""Backgrounds and picture regions: solid, gradient, procedural texture, photo.

Everything is built from Pillow's C primitives (linear/radial gradients, resize of a
small noise field, palette lookups) so a 512² background costs well under a millisecond or
two: the renderer's budget is half the speed of a bare Pillow draw (benchmarks/).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipelines.text.color import RGB, random_color

log = logging.getLogger(__name__)

BACKGROUND_KINDS = ("solid", "gradient", "texture", "photo")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _solid(size: tuple[int, int], colour: RGB) -> Image.Image:
    return Image.new("RGB", size, colour)


def colourize(mask: Image.Image, a: RGB, b: RGB) -> Image.Image:
    """An "L" mask mapped linearly from colour `b` (0) to colour `a` (255).

    The mask becomes a palette image whose palette is the colour ramp, converted to
    RGB in C: ~5x faster at 512² than compositing two solid images through the mask.
    The mask is consumed (turned into the palette image).
    """
    ramp = np.arange(256, dtype=np.float32)[:, None] / 255
    lut = np.rint(np.asarray(b, np.float32) + (np.asarray(a, np.float32) - np.asarray(b, np.float32)) * ramp)
    mask.putpalette(lut.astype(np.uint8).tobytes(), "RGB")
    return mask.convert("RGB")


def _linear_mask(size: tuple[int, int], angle: float) -> Image.Image:
    """0..255 ramp along direction `angle` (radians) across the whole canvas."""
    w, h = size
    x = np.arange(w, dtype=np.float32) * np.float32(math.cos(angle))
    y = np.arange(h, dtype=np.float32) * np.float32(math.sin(angle))
    t = y[:, None] + x[None, :]
    t -= t.min()
    t *= 255.0 / max(float(t.max()), 1e-6)
    return Image.fromarray(t.astype(np.uint8), "L")


def gradient(rng: random.Random, size: tuple[int, int], a: RGB, b: RGB) -> Image.Image:
    """Linear (any angle) or radial blend of two colours."""
    if rng.random() < 0.25:
        mask = Image.radial_gradient("L").resize(size, Image.Resampling.BILINEAR)
    else:
        mask = _linear_mask(size, rng.uniform(0, 2 * math.pi))
    return colourize(mask, a, b)


def texture(rng: random.Random, size: tuple[int, int], base: RGB) -> Image.Image:
    """Low-contrast procedural texture around `base`: noise, stripes, dots or grain."""
    kind = rng.choice(("noise", "stripes", "dots", "grain"))
    w, h = size
    shade = tuple(max(0, min(255, c + rng.choice((-1, 1)) * rng.randint(18, 45))) for c in base)
    if kind in ("noise", "grain"):
        cells = rng.randint(4, 16) if kind == "noise" else rng.randint(64, 128)
        nrng = np.random.default_rng(rng.getrandbits(32))
        field = nrng.integers(0, 256, size=(cells, cells), dtype=np.uint8)
        # Bicubic keeps coarse noise free of bilinear's diamond artefacts; fine grain
        # does not show them, and bilinear is a third cheaper.
        resample = Image.Resampling.BICUBIC if kind == "noise" else Image.Resampling.BILINEAR
        mask = Image.fromarray(field, "L").resize(size, resample)
        return colourize(mask, shade, base)  # type: ignore[arg-type]
    img = _solid(size, base)
    draw = ImageDraw.Draw(img)
    step = rng.randint(12, 40)
    if kind == "stripes":
        width = max(1, step // rng.randint(2, 6))
        for x in range(-h, w + h, step):
            draw.line([(x, 0), (x + h, h)], fill=shade, width=width)
    else:
        r = max(1, step // rng.randint(4, 8))
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    return img


class PhotoPool:
    """Photos from a folder, used as backgrounds and picture regions."""

    def __init__(self, folder: str | None):
        self.paths: list[Path] = []
        self.skipped: dict[str, str] = {}
        if folder:
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise ValueError(f"render.photo_dir {str(root)!r} does not exist")
            self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
            if not self.paths:
                raise ValueError(f"render.photo_dir {str(root)!r} holds no images ({', '.join(PHOTO_SUFFIXES)})")

    def __bool__(self) -> bool:
        return bool(self.paths)

    def sample(self, rng: random.Random, size: tuple[int, int]) -> Image.Image | None:
        """A random photo, cropped to the aspect ratio and resized; None if unreadable."""
        for _ in range(4):
            path = rng.choice(self.paths)
            if str(path) in self.skipped:
                continue
            try:
                with Image.open(path) as im:
                    im.draft("RGB", (size[0] * 2, size[1] * 2))  # reduced JPEG decoding
                    photo = im.convert("RGB")
            except Exception as exc:  # unreadable photo: skipped and counted, never fatal
                self.skipped[str(path)] = f"{type(exc).__name__}: {exc}"
                log.warning("skipping unreadable photo %s: %s", path, exc)
                continue
            tw, th = size
            scale = max(tw / photo.width, th / photo.height)
            cw, ch = tw / scale, th / scale
            x0 = rng.uniform(0, photo.width - cw)
            y0 = rng.uniform(0, photo.height - ch)
            return photo.resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        return None


def background(rng: random.Random, size: tuple[int, int], kind: str, photos: PhotoPool) -> tuple[Image.Image, str]:
    """A background image of `kind`; returns (image, kind actually used)."""
    if kind == "photo":
        photo = photos.sample(rng, size) if photos else None
        if photo is not None:
            return photo, "photo"
        kind = "gradient"
    if kind == "solid":
        return _solid(size, random_color(rng, saturation=(0.0, 0.8), value=(0.05, 1.0))), "solid"
    if kind == "gradient":
        a = random_color(rng, saturation=(0.0, 0.8), value=(0.2, 1.0))
        b = random_color(rng, saturation=(0.0, 0.8), value=(0.2, 1.0))
        return gradient(rng, size, a, b), "gradient"
    if kind == "texture":
        return texture(rng, size, random_color(rng, saturation=(0.0, 0.6), value=(0.2, 0.95))), "texture"
    raise ValueError(f"unknown background kind {kind!r}; use one of {BACKGROUND_KINDS}")


def picture(rng: random.Random, size: tuple[int, int], photos: PhotoPool) -> Image.Image:
    """Content for a picture region: a photo if configured, else a procedural scene."""
    if photos and rng.random() < 0.7:
        photo = photos.sample(rng, size)
        if photo is not None:
            return photo
    w, h = size
    sky = gradient(rng, size, random_color(rng, value=(0.6, 1.0)), random_color(rng, value=(0.3, 0.9)))
    draw = ImageDraw.Draw(sky)
    for _ in range(rng.randint(2, 6)):
        colour = random_color(rng)
        x0, y0 = rng.uniform(-0.2, 0.9) * w, rng.uniform(0.1, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.15, 0.6) * w, y0 + rng.uniform(0.15, 0.6) * h
        shape = rng.choice(("ellipse", "rectangle", "polygon"))
        if shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=colour)
    return sky.filter(ImageFilter.BoxBlur(radius=rng.choice((0, 0, 1))))
