"""The synthetic text renderer: one seed in, one image + caption + metadata out.

A sample is composed in four steps, each a plain function of a `random.Random`:
1. canvas: size bucket, background (solid / gradient / texture / photo);
2. layout: a format (single line, title, paragraph, list, composition, vertical,
   wrap-around, or no text) becomes blocks of positioned lines; text is measured
   with the chosen face, broken by `linebreak.break_lines`, shrunk until it fits;
3. colour: per block, a text colour whose WCAG contrast against the darkest, the
   lightest and the mean colour under the block reaches `min_contrast` (else a
   plate goes behind the block);
4. drawing and metadata: the box of the pixels each line's drawing changed (its
   ink) becomes its polygon; a vertical column's polygon is its stack of cells.

Vertical text is set one glyph per cell, columns right to left; CJK punctuation is
replaced by its vertical presentation form (U+FE10-FE19, U+FE30-FE4F) when the face
has it, else shifted to the upper right of its cell as vertical typesetting does.
The metadata keeps the original characters (what OCR and captions compare to).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from data_pipelines.text.color import RGB, pick_text_color, region_extremes
from data_pipelines.text.fonts import FontFace, FontRegistry, face_tables, snap_size
from data_pipelines.core.schema import (
    Direction,
    LineMeta,
    SampleMeta,
    Source,
    classify_text,
    sample_languages,
)
from data_pipelines.sources import background as bgmod
from data_pipelines.text.captions import CaptionBlock, caption
from data_pipelines.text.linebreak import break_lines, units
from data_pipelines.text.corpus import CJK_LANGUAGES, VERTICAL_LANGUAGES, TextSampler

_STAT_REDUCE = 4  # background statistics are read from a 4x-subsampled copy
_WIDTH_CACHE_LIMIT = 20_000  # measured units kept per (face, size) before the cache restarts

FORMATS = ("none", "single_line", "title", "paragraph", "list", "composition", "vertical", "wrap")

VERTICAL_FORMS = {
    "，": "︐", "、": "︑", "。": "︒", "：": "︓", "；": "︔", "！": "︕", "？": "︖",
    "「": "﹁", "」": "﹂", "『": "﹃", "』": "﹄", "（": "︵", "）": "︶", "【": "︻", "】": "︼",
    "《": "︽", "》": "︾", "〈": "︿", "〉": "﹀", "…": "︙", "—": "︱", "～": "≀",
}
# Punctuation that sits in the upper-right quadrant of its cell when no vertical form exists.
_CORNER_PUNCT = frozenset("，、。．")


@dataclass
class RenderConfig:
    """How samples look; the `render:` section of configs/data_gen/synthetic.yaml."""

    sizes: Sequence[str] = ("512x512",)
    """Canvas sizes as "WxH" or "WxH:weight" (weight 1 when omitted), e.g. ["512x512", "768x512:0.5"]."""
    formats: Mapping[str, float] = field(
        default_factory=lambda: {
            "none": 0.1, "single_line": 0.3, "title": 0.1, "paragraph": 0.1,
            "list": 0.1, "composition": 0.1, "vertical": 0.1, "wrap": 0.1,
        }
    )
    """Layout formats (see FORMATS) with sampling weights (configs/data_gen/synthetic.yaml)."""
    backgrounds: Mapping[str, float] = field(default_factory=lambda: {"solid": 0.3, "gradient": 0.35, "texture": 0.35, "photo": 0.0})
    """Background kinds with weights; `photo` needs `photo_dir`."""
    photo_dir: str | None = None
    """Folder of photos for backgrounds and picture regions."""
    min_contrast: float = 4.5
    """Minimum WCAG contrast ratio of text against its local background (4.5 = WCAG AA)."""
    margin: float = 0.06
    """Canvas margin as a fraction of the shorter side."""
    min_font_px: int = 14
    """Smallest font size drawn; smaller text is not legible at training resolution."""
    bold_fraction: float = 0.3
    """Probability that a block prefers a bold face."""
    caption_zh_fraction: float = 0.5
    """Probability of a Chinese caption (else English)."""

    def __post_init__(self) -> None:
        if isinstance(self.sizes, str):
            self.sizes = [self.sizes]
        parsed = [_parse_size(s) for s in self.sizes]
        self.size_list = [size for size, _ in parsed]
        self.size_weights = _weights("render.sizes", {str(s): w for s, (_, w) in zip(self.sizes, parsed)})
        for name in self.formats:
            if name not in FORMATS:
                raise ValueError(f"render.formats: unknown format {name!r}; use {FORMATS}")
        self.format_weights = _weights("render.formats", self.formats)
        for name in self.backgrounds:
            if name not in bgmod.BACKGROUND_KINDS:
                raise ValueError(f"render.backgrounds: unknown kind {name!r}; use {bgmod.BACKGROUND_KINDS}")
        self.background_weights = _weights("render.backgrounds", self.backgrounds)
        if self.backgrounds.get("photo", 0) > 0 and not self.photo_dir:
            raise ValueError("render.backgrounds.photo > 0 needs render.photo_dir (a folder of photos)")
        if not 1.0 <= self.min_contrast <= 21.0:
            raise ValueError(f"render.min_contrast = {self.min_contrast} must lie in [1, 21] (WCAG ratio)")
        if not 0 <= self.margin < 0.4:
            raise ValueError(f"render.margin = {self.margin} must lie in [0, 0.4)")
        for name in ("bold_fraction", "caption_zh_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"render.{name} = {getattr(self, name)} must lie in [0, 1]")


def _parse_size(text: str) -> tuple[tuple[int, int], float]:
    """ "768x512:0.5" -> ((768, 512), 0.5)."""
    dims, _, weight = str(text).partition(":")
    try:
        w, h = (int(v) for v in dims.lower().split("x"))
        wt = float(weight) if weight else 1.0
    except ValueError:
        raise ValueError(f"render.sizes: {text!r} is not WIDTHxHEIGHT or WIDTHxHEIGHT:WEIGHT (e.g. 512x512)") from None
    if w < 64 or h < 64:
        raise ValueError(f"render.sizes: {text!r} is smaller than 64x64")
    return (w, h), wt


def _weights(name: str, mapping: Mapping[str, float]) -> list[float]:
    values = [float(v) for v in mapping.values()]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"{name}: weights must be >= 0 with a positive sum, got {dict(mapping)}")
    return values


@dataclass
class Line:
    """A positioned line (horizontal) or column (vertical), before drawing."""

    text: str
    x: float  # horizontal: left edge; vertical: column centre
    y: float  # horizontal: top of the line box; vertical: centre of the first cell
    pitch: float = 0.0  # vertical: distance between cell centres
    width: float = 0.0  # horizontal: advance width in pixels (from the face's advance table)


@dataclass
class Block:
    role: str
    text: str  # the rendered text of the block (lines rejoined as in the source)
    language: str
    face: FontFace
    size: int
    direction: str
    lines: list[Line]
    bullet: bool = False  # draw a bullet mark left of the first line
    colour: RGB | None = None  # chosen against what lies beneath (Scene composition)
    plate: RGB | None = None  # a plate of this colour goes behind each line, when set
    # How a horizontal block was laid out, so that an edit can lay it out again.
    source: str = ""
    boxes: list[tuple[float, float, float]] = field(default_factory=list)
    align: str = "left"
    prefix: str = ""
    indent: float = 0.0
    line_spacing: float = 1.35


@dataclass
class Shape:
    """A filled primitive drawn under the text: a design's cards, buttons, bars, rules."""

    kind: str  # rect | rounded | ellipse
    box: tuple[float, float, float, float]
    fill: RGB | None
    outline: RGB | None = None
    width: int = 1
    radius: float = 0.0


@dataclass
class Scene:
    """Everything a sample is drawn from. `compose` makes one from a seed; edits change
    a copy and draw it again, so source and target differ only where the edit says."""

    seed: int
    key: str
    source: str  # schema Source value: synthetic | design
    fmt: str
    size: tuple[int, int]
    background_kind: str
    background: Image.Image  # the bare background
    blocks: list[Block]
    shapes: list[Shape] = field(default_factory=list)
    picture: dict | None = None  # {"box", "shape", "side"}
    picture_image: Image.Image | None = None
    caption_zh: bool = False


@dataclass
class RenderedSample:
    image: Image.Image
    caption: str
    meta: SampleMeta


def rejoin(source: str, lines: list[str]) -> str:
    """The span of `source` that `lines` render, with the spaces the breaks removed."""
    pos = 0
    for line in lines:
        idx = source.find(line, pos)
        assert idx >= 0, (source, line)
        pos = idx + len(line)
    return source[:pos].strip()


class SyntheticRenderer:
    def __init__(self, *, fonts: FontRegistry, text: TextSampler, config: RenderConfig):
        self.fonts = fonts
        self.text = text
        self.config = config
        self.photos = bgmod.PhotoPool(config.photo_dir)
        self._width_cache: dict[tuple[str, int, int], dict[str, float]] = {}

    # --- measuring -------------------------------------------------------------

    def _measure(self, face: FontFace, size: int) -> Callable[[str], float]:
        """Width of a unit in pixels, from the face's advance table (see fonts.face_tables)."""
        key = (face.path, face.index, size)
        cache = self._width_cache.get(key)
        if cache is None or len(cache) > _WIDTH_CACHE_LIMIT:
            cache = self._width_cache[key] = {}  # bounded: a long job must not grow without end
        tables = face_tables(face.path, face.index)
        scale = size / tables.units_per_em

        def measure(unit: str) -> float:
            w = cache.get(unit)
            if w is None:
                w = cache[unit] = float(sum(int(tables.advance(ord(ch)) * scale + 0.5) for ch in unit))
            return w

        return measure

    # --- blocks ----------------------------------------------------------------

    def _face(self, rng: random.Random, text: str, language: str) -> FontFace:
        return self.fonts.choose(text, language, rng, bold=rng.random() < self.config.bold_fraction)

    def _horizontal_block(
        self,
        rng: random.Random,
        *,
        role: str,
        source: str,
        language: str,
        size: int,
        boxes: list[tuple[float, float, float]],
        align: str,
        prefix: str = "",
        indent: float = 0.0,
        line_spacing: float = 1.35,
        face: FontFace | None = None,
    ) -> Block | None:
        """Flow `source` into `boxes` (x0, x1, top) one line per box; None if nothing fits."""
        face = face or self._face(rng, prefix + source, language)
        measure = self._measure(face, size)
        first_extra = measure(prefix) if prefix else 0.0
        widths = [x1 - x0 - indent - (first_extra if i == 0 else 0) for i, (x0, x1, _) in enumerate(boxes)]
        # 2% slack: the sum of unit widths can differ from the whole line's by kerning.
        lines = break_lines(source, lambda i: (widths[i] if i < len(widths) else 0) * 0.98, measure, max_lines=len(boxes))
        if not lines:
            return None
        lines_text = [prefix + lines[0], *lines[1:]] if prefix else lines
        placed = []
        for i, text in enumerate(lines_text):
            x0, x1, top = boxes[i]
            width = sum(measure(unit) for unit in units(text))
            left = x0 + indent + (0 if i == 0 or not prefix else first_extra)
            if left + width > x1:
                return None  # beyond the slack above (rare): the caller retries smaller
            if align == "center":
                left = left + (x1 - left - width) / 2
            elif align == "right":
                left = x1 - width
            placed.append(Line(text, left, top, width=width))
        text = prefix + rejoin(source, lines)
        return Block(
            role, text, language, face, size, Direction.HORIZONTAL.value, placed,
            source=source, boxes=list(boxes), align=align, prefix=prefix, indent=indent, line_spacing=line_spacing,
        )

    def _vertical_block(
        self, rng: random.Random, *, source: str, language: str, size: int, right: float, left: float, top: float, bottom: float
    ) -> Block | None:
        face = self._face(rng, source, language)
        pitch = size * rng.uniform(1.02, 1.15)
        col_pitch = size * rng.uniform(1.3, 1.8)
        rows = int((bottom - top) // pitch)
        cols = int((right - left - size) // col_pitch) + 1
        if rows < 2 or cols < 1:
            return None
        text = source.replace(" ", "")
        columns = break_lines(text, lambda i: rows, lambda u: len(u), max_lines=cols)
        if not columns:
            return None
        placed = []
        for j, col in enumerate(columns):
            cx = right - size / 2 - j * col_pitch
            placed.append(Line(col, cx, top + pitch / 2, pitch))
        return Block("body", "".join(columns), language, face, size, Direction.VERTICAL.value, placed)

    # --- formats ----------------------------------------------------------------

    def _content_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        m = self.config.margin * min(w, h)
        return m, m, w - m, h - m

    def _size(self, rng: random.Random, h: int, w: int, lo: float, hi: float) -> int:
        # Snapped to the font-size ladder: few (face, size) combinations, so font
        # objects and glyph measurements are found in the caches (fonts.SIZE_LADDER).
        return max(self.config.min_font_px, snap_size(min(w, h) * rng.uniform(lo, hi)))

    def _stack(self, rng, specs, box, align) -> list[Block] | None:
        """Lay out specs (role, text, language, size, max_lines, options) top to bottom."""
        left, top, right, bottom = box
        blocks: list[Block] = []
        y = top
        for role, source, language, size, max_lines, opts in specs:
            lh = size * opts.get("line_spacing", 1.35)
            avail = int((bottom - y) // lh)
            n = min(max_lines, avail)
            if n < 1:
                break
            boxes = [(left, right, y + i * lh) for i in range(n)]
            block = self._horizontal_block(
                rng, role=role, source=source, language=language, size=size, boxes=boxes, align=align,
                prefix=opts.get("prefix", ""), indent=opts.get("indent", 0.0), line_spacing=opts.get("line_spacing", 1.35),
            )
            if block is None:
                break
            block.bullet = opts.get("bullet", False)
            blocks.append(block)
            y += len(block.lines) * lh + size * opts.get("gap", 0.6)
        if not blocks:
            return None
        # Shift the whole stack vertically within the box (top / middle / bottom).
        used = y - top
        slack = max(0.0, bottom - top - used)
        shift = rng.choice((0.0, slack / 2, slack, rng.uniform(0, slack)))
        for block in blocks:
            for line in block.lines:
                line.y += shift
            block.boxes = [(x0, x1, top + shift) for x0, x1, top in block.boxes]
        return blocks

    def _layout(self, rng: random.Random, fmt: str, w: int, h: int) -> tuple[list[Block], dict]:
        """Blocks for a format; retried at smaller sizes when nothing fits."""
        info: dict = {}
        if fmt == "none":
            return [], info
        box = self._content_box(w, h)
        left, top, right, bottom = box
        # Lists stay left-aligned (bullets and numbers line up); titles go anywhere.
        align = rng.choice(("left", "center", "right")) if fmt in ("single_line", "title", "composition") else "left" if fmt == "list" else rng.choice(("left", "left", "center"))
        lang = self.text.language(rng)
        scale = 1.0
        for _ in range(5):
            if fmt == "single_line":
                text, tag = self.text.short(rng, lang, max_chars=rng.choice((4, 8, 12, 16)))
                specs = [("title", text, tag, self._size(rng, h, w, 0.06 * scale, 0.14 * scale), 1, {})]
            elif fmt == "title":
                text, tag = self.text.paragraph(rng, lang, rng.randint(6, 16)) if rng.random() < 0.5 else self.text.short(rng, lang, 16)
                specs = [("title", text, tag, self._size(rng, h, w, 0.07 * scale, 0.12 * scale), 2, {"line_spacing": 1.25})]
            elif fmt == "paragraph":
                text, tag = self.text.paragraph(rng, lang, rng.randint(20, 140))
                specs = [("body", text, tag, self._size(rng, h, w, 0.035 * scale, 0.06 * scale), 12, {})]
            elif fmt == "list":
                specs = self._list_specs(rng, lang, h, w, scale)
            elif fmt == "composition":
                specs = self._composition_specs(rng, lang, h, w, scale)
            elif fmt == "vertical":
                vlang = lang if lang in VERTICAL_LANGUAGES else self.text.language(rng, allowed=VERTICAL_LANGUAGES)
                text, tag = self.text.paragraph(rng, vlang, rng.randint(4, 60))
                size = self._size(rng, h, w, 0.045 * scale, 0.09 * scale)
                block = self._vertical_block(rng, source=text, language=tag, size=size, right=right, left=left, top=top, bottom=bottom)
                if block:
                    return [block], info
                scale *= 0.8
                continue
            elif fmt == "wrap":
                blocks = self._wrap_layout(rng, lang, w, h, box, scale, info)
                if blocks:
                    return blocks, info
                scale *= 0.8
                continue
            else:
                raise ValueError(f"unknown format {fmt!r}")
            blocks = self._stack(rng, specs, box, align)
            if blocks:
                return blocks, info
            scale *= 0.8
        return [], info

    def _list_specs(self, rng, lang, h, w, scale):
        size = self._size(rng, h, w, 0.035 * scale, 0.055 * scale)
        numbered = rng.random() < 0.5
        specs = []
        if rng.random() < 0.6:
            text, tag = self.text.short(rng, lang, 12)
            specs.append(("title", text, tag, snap_size(size * 1.6), 1, {"gap": 0.8}))
        for i in range(rng.randint(2, 6)):
            text, tag = self.text.paragraph(rng, lang, rng.randint(4, 30)) if rng.random() < 0.4 else self.text.short(rng, lang, 14)
            cjk = tag in CJK_LANGUAGES
            if numbered:
                prefix = f"{i + 1}、" if (cjk and rng.random() < 0.5) else f"{i + 1}. "
                opts = {"prefix": prefix, "gap": 0.35}
            else:
                opts = {"bullet": True, "indent": size * 1.0, "gap": 0.35}
            specs.append(("list_item", text, tag, size, 2, opts))
        return specs

    def _composition_specs(self, rng, lang, h, w, scale):
        title, ttag = self.text.short(rng, lang, 12)
        sub_lang = "en" if (lang in CJK_LANGUAGES and rng.random() < 0.3) else lang
        subtitle, stag = self.text.paragraph(rng, sub_lang, rng.randint(6, 20))
        body, btag = self.text.paragraph(rng, lang, rng.randint(20, 90))
        return [
            ("title", title, ttag, self._size(rng, h, w, 0.08 * scale, 0.13 * scale), 2, {"gap": 0.5, "line_spacing": 1.2}),
            ("subtitle", subtitle, stag, self._size(rng, h, w, 0.045 * scale, 0.065 * scale), 2, {"gap": 0.9}),
            ("body", body, btag, self._size(rng, h, w, 0.032 * scale, 0.045 * scale), 10, {}),
        ]

    def _wrap_layout(self, rng, lang, w, h, box, scale, info) -> list[Block] | None:
        """Paragraph text flowing around a picture region (rectangle or ellipse) on one side."""
        left, top, right, bottom = box
        side = rng.choice(("left", "right"))
        shape = rng.choice(("rectangle", "ellipse"))
        pw = (right - left) * rng.uniform(0.35, 0.5)
        ph = (bottom - top) * rng.uniform(0.3, 0.55)
        py = top + (bottom - top - ph) * rng.uniform(0.0, 0.6)
        px = left if side == "left" else right - pw
        region = (px, py, px + pw, py + ph)
        size = self._size(rng, h, w, 0.035 * scale, 0.05 * scale)
        lh = size * 1.35
        pad = size * 0.5
        boxes = []
        y = top
        while y + lh <= bottom:
            x0, x1 = left, right
            blocked = _shape_extent(shape, region, y, y + lh)
            if blocked is not None:
                bx0, bx1 = blocked
                if side == "left":
                    x0 = max(x0, bx1 + pad)
                else:
                    x1 = min(x1, bx0 - pad)
            if x1 - x0 >= size * 3:
                boxes.append((x0, x1, y))
            y += lh
        if not boxes:
            return None
        # Enough text to fill most of the flow area, so it visibly wraps the picture.
        capacity = sum(x1 - x0 for x0, x1, _ in boxes) / size
        text, tag = self.text.paragraph(rng, lang, max(20, int(capacity * rng.uniform(0.6, 0.95))))
        block = self._horizontal_block(rng, role="body", source=text, language=tag, size=size, boxes=boxes, align="left", line_spacing=1.35)
        if block is None:
            return None
        info["picture"] = {"box": [round(v, 1) for v in region], "shape": shape, "side": side}
        return [block]

    # --- drawing -----------------------------------------------------------------

    def render(self, seed: int, key: str, *, draw_text: bool = True) -> RenderedSample:
        """The sample of `seed`. With `draw_text=False` the same sample without its glyphs
        (identical background, shapes, picture and plates; identical metadata): the
        text-removed twin that ink checks need."""
        # The scene is discarded afterwards: draw onto its background, no copy.
        return self.draw(self.compose(seed, key), draw_text=draw_text, in_place=True)

    def compose(self, seed: int, key: str) -> Scene:
        """Background, layout, picture and colours of the sample of `seed`."""
        rng = random.Random(seed)
        cfg = self.config
        w, h = rng.choices(cfg.size_list, cfg.size_weights)[0]
        fmt = rng.choices(list(cfg.formats), cfg.format_weights)[0]
        kind = rng.choices(list(cfg.backgrounds), cfg.background_weights)[0]
        background, kind = bgmod.background(rng, (w, h), kind, self.photos)
        blocks, info = self._layout(rng, fmt, w, h)
        if fmt != "none" and not blocks:
            fmt = "none"  # nothing fitted even at the smallest size: a text-free sample, said so in its metadata
        picture = info.get("picture")
        if picture is None and fmt == "none" and rng.random() < 0.5:
            pw, ph = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.3, 0.7))
            px, py = rng.randint(0, w - pw), rng.randint(0, h - ph)
            picture = {"box": [px, py, px + pw, py + ph], "shape": rng.choice(("rectangle", "ellipse")), "side": None}
        scene = Scene(
            seed=seed, key=key, source=Source.SYNTHETIC.value, fmt=fmt, size=(w, h), background_kind=kind,
            background=background, blocks=blocks, picture=picture,
            picture_image=self.picture_image(rng, picture) if picture else None,
        )
        self.choose_colours(rng, scene)
        scene.caption_zh = rng.random() < cfg.caption_zh_fraction
        return scene

    def picture_image(self, rng: random.Random, picture: dict) -> Image.Image:
        x0, y0, x1, y1 = (int(round(v)) for v in picture["box"])
        return bgmod.picture(rng, (max(1, x1 - x0), max(1, y1 - y0)), self.photos)

    def base_image(self, scene: Scene, *, with_picture: bool = True, in_place: bool = False) -> Image.Image:
        """Background, picture and shapes (in that order: a design's badge sits on its
        picture): everything beneath the text. `in_place` draws on the scene's own
        background (only for a scene that is not drawn again)."""
        image = scene.background if in_place else scene.background.copy()
        if with_picture and scene.picture is not None and scene.picture_image is not None:
            x0, y0 = (int(round(v)) for v in scene.picture["box"][:2])
            pic = scene.picture_image
            if scene.picture["shape"] == "ellipse":
                mask = Image.new("L", pic.size, 0)
                ImageDraw.Draw(mask).ellipse([0, 0, pic.size[0] - 1, pic.size[1] - 1], fill=255)
                image.paste(pic, (x0, y0), mask)
            else:
                image.paste(pic, (x0, y0))
        if scene.shapes:
            draw = ImageDraw.Draw(image)
            for shape in scene.shapes:
                _draw_shape(draw, shape)
        return image

    def choose_colours(self, rng: random.Random, scene: Scene, blocks: list[Block] | None = None) -> None:
        """A text colour (and, when needed, a plate) for each block without one.

        A 4x nearest-neighbour subsample of what lies beneath (background and shapes;
        the picture never overlaps text) answers every question: a tenth of a box
        reduction's cost, and it keeps a texture's true extremes, which the contrast
        check needs.
        """
        w, h = scene.size
        # Synthetic scenes keep text off the picture, so the bare background will do;
        # designs put labels on shapes that may sit on the picture.
        beneath = self.base_image(scene) if scene.shapes else scene.background
        small = np.asarray(beneath.resize((max(1, w // _STAT_REDUCE), max(1, h // _STAT_REDUCE)), Image.Resampling.NEAREST))
        for block in scene.blocks if blocks is None else blocks:
            if block.colour is None:
                block.colour, block.plate = self._block_colour(rng, small, block)

    def draw(self, scene: Scene, *, draw_text: bool = True, in_place: bool = False) -> RenderedSample:
        """The image, caption and metadata of a scene (`in_place`: see base_image)."""
        w, h = scene.size
        stats = np.asarray(scene.background.resize((16, 16), Image.Resampling.NEAREST))
        image = self.base_image(scene, in_place=in_place)
        draw = ImageDraw.Draw(image)
        for block in scene.blocks:  # plates first: no plate covers another block's glyphs
            if block.plate is not None:
                font = self.fonts.font(block.face, block.size)
                pad = block.size * 0.3
                for line in block.lines:
                    lx0, ly0, lx1, ly1 = self._line_box(font, block, line)
                    draw.rounded_rectangle([lx0 - pad, ly0 - pad, lx1 + pad, ly1 + pad], radius=pad, fill=block.plate)
        # The text-free twin: glyphs go onto a scratch copy, so its metadata is
        # exactly that of the sample with text.
        target = image if draw_text else image.copy()
        lines_meta: list[LineMeta] = []
        caption_blocks: list[CaptionBlock] = []
        for block in scene.blocks:
            assert block.colour is not None, "compose() or choose_colours() picks every block's colour"
            lines_meta += self._draw_block(target, block, block.colour)
            caption_blocks.append(CaptionBlock(block.role, block.text, block.colour))

        bg_color = tuple(int(c) for c in stats.reshape(-1, 3).mean(axis=0))
        cap = caption(
            zh=scene.caption_zh, fmt=scene.fmt, background_kind=scene.background_kind,
            background_color=bg_color, blocks=caption_blocks,  # type: ignore[arg-type]
            vertical=any(b.direction == Direction.VERTICAL.value for b in scene.blocks),
            picture_side=(scene.picture or {}).get("side") if scene.fmt == "wrap" else None,
        )
        fmt = scene.fmt
        layout = "none" if not scene.blocks else ("vertical" if fmt == "vertical" else "wrap" if fmt == "wrap" else "horizontal")
        meta = SampleMeta(
            key=scene.key,
            source=scene.source,
            width=w,
            height=h,
            text_class=classify_text(lines_meta).value,
            languages=sample_languages(lines_meta),
            lines=lines_meta,
            layout=layout,
            format=fmt,
            background=scene.background_kind,
            seed=scene.seed,
            extra={"picture": scene.picture} if scene.picture else {},
        )
        return RenderedSample(image, cap, meta)

    def _block_region(self, block: Block) -> tuple[int, int, int, int]:
        font = self.fonts.font(block.face, block.size)
        boxes = [self._line_box(font, block, line) for line in block.lines]
        return (
            int(min(b[0] for b in boxes)), int(min(b[1] for b in boxes)),
            int(max(b[2] for b in boxes)) + 1, int(max(b[3] for b in boxes)) + 1,
        )

    def _line_box(self, font, block: Block, line: Line) -> tuple[float, float, float, float]:
        """The line's layout box: advance width by ascent + descent (horizontal), or its
        column of cells (vertical). Ink lies inside it, give or take overhangs."""
        if block.direction == Direction.HORIZONTAL.value:
            ascent, descent = font.getmetrics()
            return (line.x, line.y, line.x + line.width, line.y + ascent + descent)
        n = len(line.text)
        half = block.size / 2
        return (line.x - half, line.y - line.pitch / 2, line.x + half, line.y + (n - 0.5) * line.pitch)

    def _block_colour(self, rng: random.Random, small: np.ndarray, block: Block) -> tuple[RGB, RGB | None]:
        """(text colour, plate colour or None) for a block over the subsampled background."""
        x0, y0, x1, y1 = self._block_region(block)
        k = _STAT_REDUCE
        region = small[max(0, y0 // k) : max(1, -(-y1 // k)), max(0, x0 // k) : max(1, -(-x1 // k))]
        colours = region_extremes(region if region.size else small)
        colour = pick_text_color(rng, colours, self.config.min_contrast)
        if colour is not None:
            return colour, None
        # The background varies too much under the block: plates of its mean colour
        # behind each line (not the block's bounding box, which may hold a picture).
        plate = colours[2]
        colour = pick_text_color(rng, [plate], self.config.min_contrast)
        assert colour is not None  # black or white always reaches 4.5 against one colour
        return colour, plate

    def _draw_block(self, image: Image.Image, block: Block, colour: RGB) -> list[LineMeta]:
        draw = ImageDraw.Draw(image)
        w, h = image.size
        font = self.fonts.font(block.face, block.size)
        metas = []
        for i, line in enumerate(block.lines):
            if block.direction == Direction.HORIZONTAL.value:
                box = self._draw_line(image, draw, font, block, line, colour)
                if block.bullet and i == 0:
                    r = block.size * 0.16
                    cy = (box[1] + box[3]) / 2
                    cx = line.x - block.size * 0.6
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                box = self._draw_column(draw, font, block, line, colour)
            pad = 2
            x0, y0 = max(0.0, box[0] - pad), max(0.0, box[1] - pad)
            x1, y1 = min(float(w), box[2] + pad), min(float(h), box[3] + pad)
            polygon = [[round(x0, 1), round(y0, 1)], [round(x1, 1), round(y0, 1)], [round(x1, 1), round(y1, 1)], [round(x0, 1), round(y1, 1)]]
            metas.append(
                LineMeta(
                    text=line.text, language=block.language, polygon=polygon, direction=block.direction,
                    font=block.face.name, font_size=block.size, role=block.role,
                )
            )
        return metas

    def _draw_line(self, image, draw, font, block: Block, line: Line, colour: RGB) -> tuple[float, float, float, float]:
        """Draw a horizontal line; return its ink box: the pixels the drawing changed.

        Reading the box off the pixels costs two small crops instead of a second
        FreeType layout pass (`getbbox` cost as much as drawing), and it is the ink by
        definition: pixels that differ from what lay beneath.
        """
        x0, y0, x1, y1 = self._line_box(font, block, line)
        m = block.size // 2 + 2  # room for overhangs (accents, italics) beyond the layout box
        region = (max(0, int(x0) - m), max(0, int(y0) - m), min(image.width, int(x1) + m), min(image.height, int(y1) + m))
        before = image.crop(region)
        draw.text((line.x, line.y), line.text, font=font, fill=colour, anchor="la")
        changed = ImageChops.difference(image.crop(region), before).getbbox()
        if changed is None:  # nothing visible changed (cannot happen at the minimum contrast)
            return _offset(font.getbbox(line.text, anchor="la"), line.x, line.y)
        return (
            float(region[0] + changed[0]), float(region[1] + changed[1]),
            float(region[0] + changed[2]), float(region[1] + changed[3]),
        )

    def _draw_column(self, draw, font, block: Block, line: Line, colour: RGB) -> tuple[float, float, float, float]:
        for k, ch in enumerate(line.text):
            cx, cy = line.x, line.y + k * line.pitch
            glyph = VERTICAL_FORMS.get(ch)
            if glyph is not None and self.fonts.covers(block.face, glyph):
                ch_draw = glyph
            else:
                ch_draw = ch
                if ch in _CORNER_PUNCT:
                    cx, cy = cx + block.size * 0.3, cy - block.size * 0.3
            draw.text((cx, cy), ch_draw, font=font, fill=colour, anchor="mm")
        # The polygon is the column of glyph cells (one em wide, `pitch` >= 1 em tall
        # each, glyphs centred): CJK glyphs keep their ink inside the em box, so the
        # cells enclose it, and readers can cut the column back into its n cells.
        half = block.size / 2
        return (line.x - half, line.y - line.pitch / 2, line.x + half, line.y + (len(line.text) - 0.5) * line.pitch)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    box = [shape.box[0], shape.box[1], shape.box[2], shape.box[3]]
    if shape.kind == "rect":
        draw.rectangle(box, fill=shape.fill, outline=shape.outline, width=shape.width)
    elif shape.kind == "rounded":
        draw.rounded_rectangle(box, radius=shape.radius, fill=shape.fill, outline=shape.outline, width=shape.width)
    elif shape.kind == "ellipse":
        draw.ellipse(box, fill=shape.fill, outline=shape.outline, width=shape.width)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def _offset(box, dx: float, dy: float) -> tuple[float, float, float, float]:
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def _shape_extent(shape: str, region, y0: float, y1: float) -> tuple[float, float] | None:
    """Horizontal extent of a rectangle/ellipse within the band [y0, y1], or None."""
    rx0, ry0, rx1, ry1 = region
    if y1 <= ry0 or y0 >= ry1:
        return None
    if shape == "rectangle":
        return rx0, rx1
    cx, cy = (rx0 + rx1) / 2, (ry0 + ry1) / 2
    a, b = (rx1 - rx0) / 2, (ry1 - ry0) / 2
    # Widest chord of the ellipse inside the band: at the band point closest to the centre.
    yc = min(max(cy, y0), y1)
    t = 1 - ((yc - cy) / b) ** 2
    if t <= 0:
        return None
    half = a * t**0.5
    return cx - half, cx + half

