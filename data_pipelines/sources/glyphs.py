"""Single glyphs, dark on white, for the learnable tiny world: what its VAE is fitted on.

A glyph is drawn with the project's CJK face (`core.contact_sheet.label_font_file`, a
Noto Sans CJK face where fontconfig has one; it covers Latin and digits too), centred
at 60-80% of the canvas with a few pixels of jitter, so a small model sees each
character in slightly different places and sizes.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

from data_pipelines.core.contact_sheet import label_font_file
from data_pipelines.text import charsets

DIGITS_LATIN = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # I and O left out: OCR confuses them with 1 and 0


def glyph_vocabulary(chinese: int = 200) -> str:
    """The first `chinese` GB 2312 level-1 characters in the codec's (pinyin) order, a
    fixed set every CJK face covers, then digits and Latin capitals."""
    return charsets.gb2312_level1()[:chinese] + DIGITS_LATIN


def render_glyph(ch: str, size: int, rng: random.Random | None = None) -> Image.Image:
    """`ch` drawn on a `size`² white RGB canvas; `rng` jitters scale and position (None: centred, 70%)."""
    found = label_font_file()
    if found is None:
        raise ValueError("no CJK font found (fc-list :lang=zh is empty): install fonts-noto-cjk (`make setup` does)")
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.6, 0.8) if rng is not None else 0.7
    font = ImageFont.truetype(found[0], max(4, int(size * scale)), index=found[1])
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    dx, dy = (rng.uniform(-size / 16, size / 16), rng.uniform(-size / 16, size / 16)) if rng is not None else (0, 0)
    draw.text(((size - (right - left)) / 2 - left + dx, (size - (bottom - top)) / 2 - top + dy), ch, font=font,
              fill="black")
    return image
