"""Colour helpers: WCAG contrast and text colours that stay legible on a background."""

from __future__ import annotations

import colorsys
import random

import numpy as np

RGB = tuple[int, int, int]


def relative_luminance(rgb: RGB) -> float:
    """WCAG 2.x relative luminance of an sRGB colour (0 black .. 1 white)."""

    def channel(c: float) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: RGB, b: RGB) -> float:
    """WCAG contrast ratio, 1 (same) .. 21 (black on white)."""
    la, lb = relative_luminance(a), relative_luminance(b)
    hi, lo = max(la, lb), min(la, lb)
    return (hi + 0.05) / (lo + 0.05)


def random_color(rng: random.Random, *, saturation: tuple[float, float] = (0.2, 0.9), value: tuple[float, float] = (0.1, 1.0)) -> RGB:
    h = rng.random()
    s = rng.uniform(*saturation)
    v = rng.uniform(*value)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def region_extremes(pixels_hw3: np.ndarray) -> list[RGB]:
    """Colours a text colour must contrast with: the darkest, the lightest and the mean."""
    flat = pixels_hw3.reshape(-1, 3)
    lum = flat @ np.array([54, 183, 19], dtype=np.uint32)  # Rec. 709 weights x 256, integer maths
    dark, light = flat[int(lum.argmin())], flat[int(lum.argmax())]
    mean = flat.mean(axis=0)
    return [tuple(int(c) for c in dark), tuple(int(c) for c in light), tuple(int(round(c)) for c in mean)]  # type: ignore[misc]


def pick_text_color(rng: random.Random, background: list[RGB], min_contrast: float, tries: int = 12) -> RGB | None:
    """A random colour with at least `min_contrast` against every background colour.

    Returns None when no colour (black and white included) reaches it: the caller puts
    a plate behind the text.
    """
    bg_lum = [relative_luminance(bg) for bg in background]

    def worst(colour: RGB) -> float:
        lum = relative_luminance(colour)
        return min((max(lum, b) + 0.05) / (min(lum, b) + 0.05) for b in bg_lum)

    for _ in range(tries):
        colour = random_color(rng)
        if worst(colour) >= min_contrast:
            return colour
    best = max([(0, 0, 0), (255, 255, 255)], key=worst)
    if worst(best) >= min_contrast:
        return best
    return None
