"""Glyphs, dark on white, for the learnable tiny world: what its VAE is fitted on and
what its transformer learns to draw.

A glyph is drawn with the project's CJK face (`core.contact_sheet.label_font_file`, a
Noto Sans CJK face where fontconfig has one; it covers Latin and digits too). The VAE
is fitted on single glyphs (`render_glyph`); the glyph world's data and evaluation
draw whole images with `draw_glyph_lines`: no text (a grey shape), one line, or two
lines stacked, on a small square canvas, each line's ink box recorded.

The world's vocabulary is fixed here, so the data job, the evaluation suites and the
tests agree on it: `HELD_IN` characters appear in the training data, `HELD_OUT`
characters never do (the VAE was fitted on both: the held-out suite measures the
transformer, not the decoder). Prompts and instructions come from the templates
below, the same strings in training and evaluation: the glyph world's text encoder is
random, so only prompts of the trained form mean anything to it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from data_pipelines.core.contact_sheet import label_font_file
from data_pipelines.text import charsets

DIGITS_LATIN = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # I and O left out: OCR confuses them with 1 and 0

# The glyph world (all in glyph_vocabulary(200), which the VAE is fitted on).
HELD_IN = "八白百安半办包爱2357ABEK"
"""Characters the glyph data draws: 8 frequent GB 2312 level-1 characters, 4 digits, 4 capitals."""
HELD_OUT = "巴板帮报46HR"
"""Characters the glyph data never draws: the held-out suite's (near 0 is the honest expectation)."""
CANVAS = 64
"""Side of the glyph world's images: 16x16 latents through the 4x glyph VAE, 64 image tokens."""

SHAPES = ("circle", "square", "bar")
NO_TEXT_PROMPT = "a grey {shape}"
ONE_LINE_PROMPT = "the character “{text}”"
TWO_LINE_PROMPT = "two lines: “{top}” over “{bottom}”"
EDIT_INSTRUCTION = "replace “{old}” with “{new}”"
SHAPE_EDIT_INSTRUCTION = "replace the {old} with a {new}"
RECONSTRUCT_INSTRUCTION = ""


def glyph_vocabulary(chinese: int = 200) -> str:
    """The first `chinese` GB 2312 level-1 characters in the codec's (pinyin) order, a
    fixed set every CJK face covers, then digits and Latin capitals."""
    return charsets.gb2312_level1()[:chinese] + DIGITS_LATIN


def _font_file() -> tuple[str, int]:
    found = label_font_file()
    if found is None:
        raise ValueError("no CJK font found (fc-list :lang=zh is empty): install fonts-noto-cjk (`make setup` does)")
    return found


def render_glyph(ch: str, size: int, rng: random.Random | None = None) -> Image.Image:
    """`ch` drawn on a `size`² white RGB canvas; `rng` jitters scale and position (None: centred, 70%)."""
    path, index = _font_file()
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.66, 0.74) if rng is not None else 0.7
    font = ImageFont.truetype(path, max(4, int(size * scale)), index=index)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    dx, dy = (rng.uniform(-size / 16, size / 16), rng.uniform(-size / 16, size / 16)) if rng is not None else (0, 0)
    draw.text(((size - (right - left)) / 2 - left + dx, (size - (bottom - top)) / 2 - top + dy), ch, font=font,
              fill="black")
    return image


@dataclass
class GlyphImage:
    image: Image.Image
    lines: list[str]
    boxes: list[tuple[float, float, float, float]]
    """Each line's ink box (x0, y0, x1, y1) in pixels."""


def draw_glyph_lines(lines: Sequence[str], size: int = CANVAS, rng: random.Random | None = None,
                     jitter: float = 1.0) -> GlyphImage:
    """`lines` (one or two strings) black on a white `size`² canvas, centred one under
    another. One line of one character fills about 70% of the canvas; two lines share the
    height (each about 41%). `rng` varies size (±4% and ±2% of the canvas) and place (up
    to size/32 per line) times `jitter` (None or jitter 0: the centred reference look)."""
    if not 1 <= len(lines) <= 2 or not all(lines):
        raise ValueError(f"lines = {list(lines)!r}: give one or two non-empty lines")
    if rng is None:
        jitter = 0.0
    path, index = _font_file()
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    longest = max(len(line) for line in lines)
    spread = 0.04 if len(lines) == 1 else 0.02
    scale = (0.7 if len(lines) == 1 else 0.41) + (rng.uniform(-spread, spread) * jitter if jitter else 0.0)
    em = max(4, int(size * scale / max(1, 0.8 * longest) if longest > 1 else size * scale))
    font = ImageFont.truetype(path, em, index=index)
    pitch = size / len(lines)
    offset = jitter * size / (32 * len(lines))
    boxes = []
    for k, line in enumerate(lines):
        left, top, right, bottom = draw.textbbox((0, 0), line, font=font)
        dx, dy = (rng.uniform(-offset, offset), rng.uniform(-offset, offset)) if offset else (0, 0)
        x = (size - (right - left)) / 2 - left + dx
        y = pitch * k + (pitch - (bottom - top)) / 2 - top + dy
        draw.text((x, y), line, font=font, fill="black")
        x0, y0, x1, y1 = draw.textbbox((x, y), line, font=font)
        boxes.append((max(0.0, x0), max(0.0, y0), min(float(size), x1), min(float(size), y1)))
    return GlyphImage(image, list(lines), boxes)


def draw_shape(shape: str, size: int = CANVAS, rng: random.Random | None = None) -> Image.Image:
    """A grey circle, square or bar on white: the glyph world's text-free images."""
    if shape not in SHAPES:
        raise ValueError(f"shape = {shape!r}; use one of {SHAPES}")
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    half = size * (rng.uniform(0.2, 0.35) if rng is not None else 0.3)
    cx = size / 2 + (rng.uniform(-size / 10, size / 10) if rng is not None else 0)
    cy = size / 2 + (rng.uniform(-size / 10, size / 10) if rng is not None else 0)
    grey = rng.randint(90, 170) if rng is not None else 128
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=(grey, grey, grey))
    elif shape == "square":
        draw.rectangle(box, fill=(grey, grey, grey))
    else:
        draw.rectangle([cx - half, cy - half / 4, cx + half, cy + half / 4], fill=(grey, grey, grey))
    return image


def glyph_prompt(lines: Sequence[str]) -> str:
    """The caption of an image showing `lines` (one or two)."""
    if len(lines) == 1:
        return ONE_LINE_PROMPT.format(text=lines[0])
    top, bottom = lines
    return TWO_LINE_PROMPT.format(top=top, bottom=bottom)
