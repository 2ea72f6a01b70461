"""Contact sheets: images in a grid of equal cells, a label strip under each.

One painter for every sheet the project writes: the data preview
(data_pipelines.jobs.preview), `qwenimg-sample`'s grid.png and the evaluation's
per-suite grids. Callers size each cell's image and choose its label lines; the
painter only places them. Labels quote prompts and rendered text, Chinese included,
so `label_font` looks for a CJK face.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]


@dataclass
class Cell:
    image: Image.Image
    """Pasted at the cell's top-left corner as it is (no larger than the cell)."""
    lines: Sequence[str] = ()
    """Label lines, top to bottom, in the strip under the image."""
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None
    """The labels' font (label_font, or a face that covers the text); needed when `lines` is set."""
    strip: RGB | None = None
    """Fill of the label strip (a class colour); None leaves the sheet's background."""


def paint_sheet(cells: Sequence[Cell], *, columns: int, cell_size: tuple[int, int], label_height: int,
                pad: int = 0, text_offset: tuple[int, int] = (4, 2), line_height: int = 0,
                text_fill: RGB = (0, 0, 0), background: RGB = (255, 255, 255)) -> Image.Image:
    """`cells` left to right, top to bottom, `columns` to a row; each takes `cell_size`
    (width, height) plus a `label_height` strip below, `pad` pixels apart and from the
    edges. Label line n is drawn at `text_offset` from the strip's corner, n x `line_height` lower."""
    if not cells:
        raise ValueError("no images for a contact sheet")
    cell_w, cell_h = cell_size
    rows = math.ceil(len(cells) / columns)
    sheet = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + label_height + pad) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, cell in enumerate(cells):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + label_height + pad)
        sheet.paste(cell.image, (x, y))
        if cell.strip is not None:
            draw.rectangle([x, y + cell_h, x + cell_w - 1, y + cell_h + label_height - 1], fill=cell.strip)
        for n, line in enumerate(cell.lines):
            draw.text((x + text_offset[0], y + cell_h + text_offset[1] + n * line_height), line, fill=text_fill,
                      font=cell.font)
    return sheet


@functools.cache
def label_font_file() -> tuple[str, int] | None:
    """(file, face index) of a regular Noto Sans CJK SC face (else any CJK face) from fontconfig, or None."""
    if shutil.which("fc-list") is None:
        return None
    out = subprocess.run(["fc-list", ":lang=zh", "-f", "%{file}\t%{index}\t%{style}\t%{family}\n"],
                         capture_output=True, text=True, check=False).stdout
    faces = [line.split("\t") for line in out.splitlines() if line.count("\t") == 3]
    if not faces:
        return None

    def rank(face):
        file, _, style, family = face
        return ("Noto Sans CJK SC" not in family, "Sans CJK" not in family, "Regular" not in style, file)

    file, index, _, _ = min(faces, key=rank)
    return file, int(index)


@functools.cache
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font for labels at `size` pixels: a CJK face where fontconfig has one (a Noto
    CJK face also covers Latin, kana and hangul), else Pillow's default, which is Latin
    only (CJK labels show as boxes)."""
    found = label_font_file()
    if found is not None:
        try:
            return ImageFont.truetype(found[0], size, index=found[1])
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy wrapping by characters (CJK has no spaces), breaking at a space where one
    is in the line; past `max_lines` the last line ends in an ellipsis."""
    lines, line = [], ""
    for ch in " ".join(text.split()):
        if font.getlength(line + ch) <= width or not line:
            line += ch
            continue
        cut = line.rfind(" ")
        if ch != " " and cut > 0:
            lines.append(line[:cut])
            line = line[cut + 1:] + ch
        else:
            lines.append(line)
            line = "" if ch == " " else ch
    lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines
