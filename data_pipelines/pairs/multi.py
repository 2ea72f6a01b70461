"""Multi-image edits: instructions that name two or three source pictures by number.

Qwen-Image-Edit-2509/2511 take up to three source images, announced in the prompt as
"Picture 1", "Picture 2", "Picture 3" ("图1", "图2", "图3"). Each edit here starts,
like every edit (data_pipelines.pairs.edit), from one composed `Scene`: that scene is
Picture 1, and the target is Picture 1 with one change, drawn from a changed copy of
the scene, so the two differ only inside the recorded region. Pictures 2 and 3 are
further scenes of the same pixel size (`Edit.sources`), drawn by the same renderer:

    title_from_picture  2  a block's text (the title when there is one) replaced by
                           the text shown in Picture 2: that string alone, in any
                           face and colour, on a solid, gradient or textured
                           background; the target keeps the block's place, face and
                           colour (the `replace_text` machinery)
    logo_onto_poster    2  the logo of Picture 2 (a mark of two shapes, a badge: a
                           shape with a short text, or a wordmark: the text alone)
                           drawn large on a plain background, placed small at a named
                           spot of Picture 1 (a corner, top or bottom centre) clear
                           of its text; the target's logo is the same shapes, colours
                           and face at the smaller size
    style_from_picture  2  a block re-rendered in the colour, the font (family,
                           style or weight), or both, of the text in Picture 2
                        3  colour from the text in Picture 2, font from the text in
                           Picture 3
                           (the reference pictures show other text than the block's,
                           in its language, so only the style can be copied)

Each op takes (maker, scene, rng, zh) like `EditMaker`'s own ops and returns an `Edit`
(or None when the scene does not allow it); `EditMaker` binds them into its `ops`.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from data_pipelines.core.schema import Direction
from data_pipelines.pairs.common import _ROLE_NAMES, MULTI_SOURCE_EDIT_TYPES, Edit, _copy_scene, _overlaps, _union
from data_pipelines.sources import background as bgmod
from data_pipelines.sources.render import Block, Scene, Shape
from data_pipelines.text.captions import quote
from data_pipelines.text.color import RGB, contrast_ratio, pick_text_color, random_color, region_extremes
from data_pipelines.text.fonts import _REGION_SUFFIX, FontFace, snap_size
from data_pipelines.text.linebreak import units

# The ops below take the `EditMaker` (data_pipelines.pairs.edit) that binds them; edit.py
# imports this module, so it is not imported here (no cycle) and typed loosely.
Maker = Any

_STAT_REDUCE = 4  # background statistics from a 4x nearest-neighbour subsample, as the renderer does

# Where a logo goes: (en, zh) for the instruction.
_SPOTS = {
    "top-left": ("in the top-left corner", "左上角"),
    "top-right": ("in the top-right corner", "右上角"),
    "bottom-left": ("in the bottom-left corner", "左下角"),
    "bottom-right": ("in the bottom-right corner", "右下角"),
    "top": ("at the top center", "顶部中间"),
    "bottom": ("at the bottom center", "底部中间"),
}
LOGO_VARIANTS = ("mark", "badge", "wordmark")


def _role(block: Block) -> tuple[str, str]:
    return _ROLE_NAMES.get(block.role, ("text", "文字"))


def _has_text_source(maker: Maker, language: str) -> bool:
    sources = maker.renderer.text.sources
    return all(sources.get(lang) for lang in language.split("+"))


def _candidates(scene: Scene, rng: random.Random, *, max_lines: int, prefer: str = "", tries: int = 3) -> list[int]:
    """Up to `tries` blocks an op may change (what `Maker._pick` picks from), in a
    seeded order, blocks of role `prefer` first: the op takes the first that works."""
    found = [
        i for i, b in enumerate(scene.blocks)
        if b.direction == Direction.HORIZONTAL.value and len(b.lines) <= max_lines and b.boxes
    ]
    rng.shuffle(found)
    return sorted(found, key=lambda i: scene.blocks[i].role != prefer)[:tries] if prefer else found[:tries]


# --- pictures 2 and 3 ----------------------------------------------------------------


def _background_for(maker: Maker, rng: random.Random, size: tuple[int, int], colour: RGB | None,
                    kinds=("solid", "gradient", "texture")) -> tuple[Image.Image, str]:
    """A background; with `colour`, one on which that colour keeps `min_contrast`
    everywhere (after 12 tries, plain white or black, whichever contrasts more: one of
    them always reaches sqrt(21) > 4.5)."""
    r = maker.renderer
    w, h = size
    for _ in range(12):
        image, kind = bgmod.background(rng, size, rng.choice(kinds), r.photos)
        if colour is None:
            return image, kind
        small = np.asarray(image.resize((max(1, w // _STAT_REDUCE), max(1, h // _STAT_REDUCE)), Image.Resampling.NEAREST))
        if all(contrast_ratio(colour, c) >= r.config.min_contrast for c in region_extremes(small)):
            return image, kind
    plain = max([(255, 255, 255), (0, 0, 0)], key=lambda c: contrast_ratio(colour, c))  # type: ignore[arg-type]
    return bgmod._solid(size, plain), "solid"  # type: ignore[arg-type]


def text_picture(maker: Maker, scene: Scene, rng: random.Random, text: str, language: str, *,
                 face: FontFace | None = None, colour: RGB | None = None) -> Scene | None:
    """A picture of Picture 1's size that shows `text` alone, on one line, large: in
    `face` (else a random face covering it) and `colour` (else one chosen against the
    background, as the renderer chooses). None when it fits on no line."""
    r = maker.renderer
    w, h = scene.size
    image, kind = _background_for(maker, rng, (w, h), colour)
    left, top, right, bottom = r._content_box(w, h)
    face = face or r._face(rng, text, language)
    align = rng.choice(("center", "center", "left"))
    size = r._size(rng, h, w, 0.08, 0.16)
    while size >= r.config.min_font_px:
        y = rng.uniform(top, max(top, bottom - size * 1.5))
        block = r._horizontal_block(rng, role="title", source=text, language=language, size=size,
                                    boxes=[(left, right, y)], align=align, face=face)
        if block is not None and block.text == text:
            break
        smaller = snap_size(size * 0.85)
        size = smaller if smaller < size else size - 2
    else:
        return None
    picture = Scene(seed=scene.seed, key=scene.key, source=scene.source, fmt="single_line", size=(w, h),
                    background_kind=kind, background=image, blocks=[block], caption_zh=scene.caption_zh)
    if colour is not None:
        block.colour = colour
    else:
        r.choose_colours(rng, picture)
    return picture


# --- title_from_picture ------------------------------------------------------------------


def title_from_picture(maker: Maker, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
    for i in _candidates(scene, rng, max_lines=2, prefer="title"):
        edit = _title_from_picture(maker, scene, rng, zh, i)
        if edit is not None:
            return edit
    return None


def _title_from_picture(maker: Maker, scene: Scene, rng: random.Random, zh: bool, i: int) -> Edit | None:
    old = scene.blocks[i]
    if not _has_text_source(maker, old.language):
        return None
    found = maker.replacement(scene, rng, i, relaxed=True)
    if found is None:
        return None
    target, new, shown = found
    picture = text_picture(maker, scene, rng, shown, old.language)
    if picture is None:
        return None
    role_en, role_zh = _role(old)
    unique = sum(b.role == old.role for b in scene.blocks) == 1
    if zh:
        what = f"图1的{role_zh}" if unique else f"图1中的{role_zh}{quote(old.text)}"
        instruction = f"把{what}换成图2中的文字" if rng.random() < 0.5 else f"将{what}改为图2所示的文字"
    else:
        what = f"the {role_en} of Picture 1" if unique else f"the {role_en} {quote(old.text)} in Picture 1"
        instruction = (f"Replace {what} with the text shown in Picture 2" if rng.random() < 0.5
                       else f"Change {what} to the text in Picture 2")
    region = _union(maker.region(old), maker.region(new))
    return Edit("title_from_picture", target, instruction, maker._clip(scene, region),
                {"old": old.text, "new": new.text, "picture_text": shown}, sources=[picture])


# --- logo_onto_poster --------------------------------------------------------------------


@dataclass
class Logo:
    """A logo's look, drawn into any box: `parts` lays it out at that box's size."""

    variant: str  # mark | badge | wordmark
    outer: str  # shape kind: ellipse | rounded | rect (mark and badge)
    inner: str  # the mark's inner shape kind
    fill: RGB  # the shape (mark, badge) or the text (wordmark)
    accent: RGB  # the mark's inner shape, the badge's text
    text: str = ""
    language: str = ""
    face: FontFace | None = None
    aspect: float = 1.0  # width / height
    inset: float = 0.25  # the mark's inner shape, inset by this fraction of the height

    def describe(self) -> dict:
        return {"variant": self.variant, "shape": self.outer if self.variant != "wordmark" else "",
                "text": self.text, "fill": list(self.fill), "accent": list(self.accent),
                "font": self.face.name if self.face else ""}


def _logo_text(maker: Maker, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    sampler = maker.renderer.text
    languages = [b.language for b in scene.blocks if "+" not in b.language and _has_text_source(maker, b.language)]
    language = languages[0] if languages else next((lang for lang in ("en", *sampler.sources) if sampler.sources.get(lang)), None)
    if language is None:
        return None
    for _ in range(8):
        text, tag = sampler.short(rng, language, max_chars=6)
        limit = 8 if tag == "en" else 4
        if 1 <= len(text) <= limit:
            return (text.upper() if tag == "en" and rng.random() < 0.5 else text), tag
    return None


def _text_width(maker: Maker, face: FontFace, size: int, text: str) -> float:
    measure = maker.renderer._measure(face, size)
    return sum(measure(u) for u in units(text))


def make_logo(maker: Maker, scene: Scene, rng: random.Random) -> Logo | None:
    r = maker.renderer
    variant = rng.choice(LOGO_VARIANTS)
    fill = random_color(rng, saturation=(0.4, 1.0), value=(0.3, 0.95))
    if variant == "mark":
        accent = pick_text_color(rng, [fill], 2.0) or (255, 255, 255)
        outer = rng.choice(("ellipse", "rounded", "rect"))
        aspect = 1.0 if outer == "ellipse" or rng.random() < 0.6 else rng.uniform(1.2, 1.6)
        return Logo("mark", outer, rng.choice(("ellipse", "rounded", "rect")), fill, accent, aspect=aspect,
                    inset=rng.uniform(0.2, 0.32))
    found = _logo_text(maker, scene, rng)
    if found is None:
        return None
    text, language = found
    face = r.fonts.choose(text, language, rng, bold=rng.random() < 0.6)
    # Proportions at a nominal 100 px height, with 8% slack for the size ladder's rounding.
    if variant == "badge":
        accent = pick_text_color(rng, [fill], r.config.min_contrast) or (255, 255, 255)
        aspect = max(1.0, (_text_width(maker, face, 42, text) * 1.08 + 50) / 100)
        outer = rng.choice(("ellipse", "rounded", "rect")) if aspect <= 1.25 else rng.choice(("rounded", "rect"))
        return Logo("badge", outer, "", fill, accent, text, language, face, aspect=aspect)
    aspect = max(1.0, (_text_width(maker, face, 70, text) * 1.08 + 6) / 100)
    return Logo("wordmark", "", "", fill, fill, text, language, face, aspect=aspect)


def logo_parts(maker: Maker, logo: Logo, box, rng: random.Random) -> tuple[list[Shape], list[Block]] | None:
    """The logo's shapes and text block drawn into `box` (x0, y0, x1, y1); None when its
    text fits at no legible size."""
    r = maker.renderer
    x0, y0, x1, y1 = box
    bh = y1 - y0
    shapes: list[Shape] = []
    if logo.variant in ("mark", "badge"):
        shapes.append(Shape(logo.outer, tuple(box), logo.fill, radius=bh * 0.3))  # type: ignore[arg-type]
    if logo.variant == "mark":
        d = bh * logo.inset
        shapes.append(Shape(logo.inner, (x0 + d, y0 + d, x1 - d, y1 - d), logo.accent, radius=(bh - 2 * d) * 0.3))
        return shapes, []
    pad = bh * 0.2 if logo.variant == "badge" else 0.0
    size = snap_size(bh * (0.42 if logo.variant == "badge" else 0.7))
    cy = (y0 + y1) / 2
    while size >= r.config.min_font_px:
        block = r._horizontal_block(rng, role="label", source=logo.text, language=logo.language, size=size,
                                    boxes=[(x0 + pad, x1 - pad, cy - size * 0.62)], align="center", face=logo.face)
        if block is not None and block.text == logo.text:
            block.colour = logo.accent if logo.variant == "badge" else logo.fill
            return shapes, [block]
        smaller = snap_size(size * 0.85)
        size = smaller if smaller < size else size - 2
    return None


def _extent(maker: Maker, box, blocks: list[Block]) -> tuple[float, float, float, float]:
    """Every pixel the logo may change: its box (+2 px for the shapes' outlines) and its text."""
    region = (box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2)
    for block in blocks:
        region = _union(region, maker.region(block))
    return region


def _spot_box(spot: str, w: int, h: int, lw: float, lh: float, m: float) -> tuple[float, float, float, float]:
    x = {"top-left": m, "bottom-left": m, "top-right": w - m - lw, "bottom-right": w - m - lw}.get(spot, (w - lw) / 2)
    y = m if spot in ("top-left", "top-right", "top") else h - m - lh
    x, y = round(x), round(y)
    return (x, y, x + round(lw), y + round(lh))


def logo_onto_poster(maker: Maker, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
    r = maker.renderer
    w, h = scene.size
    logo = make_logo(maker, scene, rng)
    if logo is None:
        return None
    m = 0.04 * min(w, h)
    height = min(w, h) * rng.uniform(0.1, 0.17)
    placed = None
    for _ in range(3):  # smaller when no spot is free
        lh = min(height, (w - 2 * m) / logo.aspect)
        lw = lh * logo.aspect
        for spot in rng.sample(list(_SPOTS), len(_SPOTS)):
            box = _spot_box(spot, w, h, lw, lh, m)
            parts = logo_parts(maker, logo, box, rng)
            if parts is None:
                continue
            region = _extent(maker, box, parts[1])
            if region[0] < 0 or region[1] < 0 or region[2] > w or region[3] > h:
                continue
            if any(_overlaps(region, maker.region(b)) for b in scene.blocks):
                continue
            placed = spot, box, parts, region
            break
        if placed is not None:
            break
        height *= 0.75
        if height < min(w, h) * 0.06:
            break
    if placed is None:
        return None
    spot, box, (shapes, blocks), region = placed
    if logo.variant == "wordmark":
        # The text must read on what lies beneath it in Picture 1.
        beneath = r.base_image(scene).crop(tuple(int(v) for v in box))
        small = np.asarray(beneath.resize((max(1, beneath.width // _STAT_REDUCE), max(1, beneath.height // _STAT_REDUCE)),
                                          Image.Resampling.NEAREST))
        extremes = region_extremes(small)
        if min(contrast_ratio(logo.fill, c) for c in extremes) < r.config.min_contrast:
            colour = pick_text_color(rng, extremes, r.config.min_contrast)
            if colour is None:
                return None
            logo.fill = logo.accent = colour
            for block in blocks:
                block.colour = colour
    target = _copy_scene(scene)
    target.shapes = target.shapes + shapes
    target.blocks = target.blocks + blocks
    picture = logo_picture(maker, scene, rng, logo)
    if picture is None:
        return None
    at_en, at_zh = _SPOTS[spot]
    if zh:
        instruction = (f"把图2中的标志放到图1的{at_zh}" if rng.random() < 0.5 else f"将图2的标志添加到图1的{at_zh}")
    else:
        instruction = (f"Place the logo from Picture 2 {at_en} of Picture 1" if rng.random() < 0.5
                       else f"Add the logo shown in Picture 2 to Picture 1, {at_en}")
    details = {"spot": spot, "box": [round(v, 1) for v in box], **logo.describe()}
    return Edit("logo_onto_poster", target, instruction, maker._clip(scene, region), details, sources=[picture])


def logo_picture(maker: Maker, scene: Scene, rng: random.Random, logo: Logo) -> Scene | None:
    """Picture 2 of `logo_onto_poster`: the logo, large, on a plain background."""
    w, h = scene.size
    if logo.variant == "wordmark":
        ground = _plain_colour(rng, logo.fill, maker.renderer.config.min_contrast)
    else:
        ground = _plain_colour(rng, logo.fill, 1.6)
    for _ in range(3):
        lh = min(min(w, h) * rng.uniform(0.28, 0.45), w * 0.85 / logo.aspect)
        lw = lh * logo.aspect
        x = round((w - lw) / 2 + rng.uniform(-0.1, 0.1) * (w - lw))
        y = round((h - lh) / 2 + rng.uniform(-0.1, 0.1) * (h - lh))
        parts = logo_parts(maker, logo, (x, y, x + round(lw), y + round(lh)), rng)
        if parts is not None:
            shapes, blocks = parts
            return Scene(seed=scene.seed, key=scene.key, source=scene.source, fmt="single_line" if blocks else "none",
                         size=(w, h), background_kind="solid", background=bgmod._solid((w, h), ground),
                         blocks=blocks, shapes=shapes, caption_zh=scene.caption_zh)
    return None


def _plain_colour(rng: random.Random, against: RGB, min_contrast: float) -> RGB:
    """A plain background colour for a logo: mostly near-white, else pale or dark,
    contrasting `against` by `min_contrast` (white or black, whichever contrasts more,
    when none drawn does)."""
    for _ in range(10):
        pick = rng.random()
        if pick < 0.5:
            colour: RGB = (rng.randint(236, 255),) * 3  # type: ignore[assignment]
        elif pick < 0.8:
            colour = random_color(rng, saturation=(0.05, 0.25), value=(0.85, 1.0))
        else:
            colour = random_color(rng, saturation=(0.0, 0.4), value=(0.08, 0.25))
        if contrast_ratio(colour, against) >= min_contrast:
            return colour
    return max([(255, 255, 255), (0, 0, 0)], key=lambda c: contrast_ratio(c, against))  # type: ignore[arg-type,return-value]


# --- style_from_picture ------------------------------------------------------------------


def _look(face: FontFace) -> tuple[str, str, int]:
    """What a reader sees of a face: regional twins of one CJK family look the same."""
    return (_REGION_SUFFIX.sub("", face.family), face.style.lower(), face.weight)


def other_faces(maker: Maker, block: Block) -> list[FontFace]:
    """One face per look other than the block's that covers its text (the language's
    region faces first, as the renderer prefers)."""
    fonts = maker.renderer.fonts
    text = block.prefix + block.source
    mine = _look(block.face)
    for group in fonts.preference_groups(block.language):
        looks: dict[tuple[str, str, int], FontFace] = {}
        for face in group:
            if _look(face) != mine and fonts.covers(face, text):
                looks.setdefault(_look(face), face)
        if looks:
            return [looks[k] for k in sorted(looks)]
    return []


def _reference_text(maker: Maker, rng: random.Random, block: Block, face: FontFace | None) -> tuple[str, str] | None:
    """Other text in the block's language (what a style reference shows)."""
    sampler = maker.renderer.text
    for _ in range(8):
        text, tag = sampler.mixed(rng) if "+" in block.language else sampler.short(rng, block.language, max_chars=10)
        if text == block.source or text in block.text:
            continue
        if face is not None and not maker.renderer.fonts.covers(face, text):
            continue
        return text, tag
    return None


def style_from_picture(maker: Maker, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
    for i in _candidates(scene, rng, max_lines=2):
        edit = _style_from_picture(maker, scene, rng, zh, i)
        if edit is not None:
            return edit
    return None


def _style_from_picture(maker: Maker, scene: Scene, rng: random.Random, zh: bool, i: int) -> Edit | None:
    block = scene.blocks[i]
    if not _has_text_source(maker, block.language):
        return None
    three = rng.random() < 0.4
    aspects = ("color", "font") if three else rng.choice((("color",), ("font",), ("color", "font")))
    face = None
    if "font" in aspects:
        pool = other_faces(maker, block)
        if pool:
            face = rng.choice(pool)
        elif three:
            return None
        else:
            aspects = ("color",)
    colour = maker.new_colour(scene, block, rng) if "color" in aspects else None
    if "color" in aspects and colour is None:  # the block needs a plate on this background
        if three or face is None:
            return None
        aspects = ("font",)
    new = maker._relayout(block, rng, face=face) if face is not None else copy.deepcopy(block)
    if new is None or new.text != block.text or not maker.fits_as_before(scene, i, new):
        return None
    if colour is not None:
        new.colour = colour
    target = _copy_scene(scene)
    target.blocks[i] = new
    # The reference pictures: other text of the block's language in the style to copy.
    references: list[tuple[FontFace | None, RGB | None]] = (
        [(None, colour), (face, None)] if three else [(face, colour)]
    )
    pictures, shown = [], []
    for ref_face, ref_colour in references:
        found = _reference_text(maker, rng, block, ref_face)
        if found is None:
            return None
        picture = text_picture(maker, scene, rng, found[0], found[1], face=ref_face, colour=ref_colour)
        if picture is None:
            return None
        pictures.append(picture)
        shown.append(found[0])
    q = quote(block.text)
    role_en, role_zh = _role(block)
    if three:
        instruction = (f"把图1中{q}改成图2中文字的颜色和图3中文字的字体" if zh
                       else f"Restyle {q} in Picture 1 with the color of the text in Picture 2 and the font of the text in Picture 3")
    elif aspects == ("color", "font"):
        instruction = (f"把图1中的{role_zh}{q}改成图2中文字的字体和颜色" if zh
                       else f"Change the {role_en} {q} in Picture 1 to the font and color of the text in Picture 2")
    elif aspects == ("color",):
        instruction = (f"把图1中{q}的颜色改成图2中文字的颜色" if zh
                       else f"Change the color of {q} in Picture 1 to the color of the text in Picture 2")
    else:
        instruction = (f"把图1中{q}的字体改成图2中文字的字体" if zh
                       else f"Set {q} in Picture 1 in the font of the text in Picture 2")
    details = {
        "text": block.text, "aspects": list(aspects), "picture_text": shown,
        "old_color": list(block.colour or ()), "new_color": list(new.colour or ()),
        "old_font": block.face.name, "new_font": new.face.name,
    }
    region = _union(maker.region(block), maker.region(new))
    return Edit("style_from_picture", target, instruction, maker._clip(scene, region), details, sources=pictures)


MULTI_OPS: dict[str, Callable[[Maker, Scene, random.Random, bool], Edit | None]] = {
    "title_from_picture": title_from_picture,
    "logo_onto_poster": logo_onto_poster,
    "style_from_picture": style_from_picture,
}
assert tuple(MULTI_OPS) == MULTI_SOURCE_EDIT_TYPES
