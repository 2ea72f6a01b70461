"""Editing (TI2I) and reconstruction (I2I) pairs, derived from rendered scenes.

A pair is one `Scene` drawn twice: as composed (the source) and with one change (the
target). Because both come from the same scene, they differ exactly where the
change is; the pair records that region. Edit types:

    replace_text  a block's text replaced by another string of its language
    recolor       a block's text colour changed
    resize        a block's font size changed (larger or smaller)
    reweight      a block's font weight changed (regular <-> bold face)
    move          a block moved up, down, left or right
    add_line      a new line of text added in free space
    remove_line   a block removed
    background    the background replaced (the region is the whole image)
    reconstruct   I2I: target = source, a fixed (or empty) instruction

Multi-image edits (data_pipelines.pairs.multi) take the scene as Picture 1 and add
one or two pictures of the same pixel size that the instruction names by number
("Picture 2" / "图2"); the target is still Picture 1 with one change:

    title_from_picture  a block's text replaced by the text shown in Picture 2
    logo_onto_poster    the logo of Picture 2 placed at a named spot of Picture 1
    style_from_picture  a block re-rendered in the colour and/or font of the text in
                        Picture 2 (3 sources: colour from Picture 2, font from Picture 3)

Instructions come from Chinese and English templates quoting the old and new text
exactly, e.g. 把标题“夏日特卖”改为“冬季清仓” / Change the title “Summer Sale” to
“Winter Clearance”.
"""

from __future__ import annotations

import copy
import functools
import random
from typing import Callable

from data_pipelines.text.color import RGB, contrast_ratio
from data_pipelines.text.fonts import snap_size
from data_pipelines.sources import background as bgmod
from data_pipelines.text.captions import color_name, quote
from data_pipelines.sources.render import Block, Scene, SyntheticRenderer
from data_pipelines.core.schema import Direction
from data_pipelines.pairs.common import (  # noqa: F401 (EDIT_TYPES and its parts: imported from here by the job)
    _ROLE_NAMES, EDIT_TYPES, MULTI_SOURCE_EDIT_TYPES, SINGLE_SOURCE_EDIT_TYPES, Edit, _copy_scene, _overlaps, _union,
)
from data_pipelines.pairs.multi import MULTI_OPS

_DIRECTIONS = {"up": "上", "down": "下", "left": "左", "right": "右"}



class EditMaker:
    """Applies edits to scenes composed by a renderer (synthetic or design)."""

    def __init__(self, renderer: SyntheticRenderer, *, reconstruction_instruction: tuple[str, str] = ("", "")):
        self.renderer = renderer
        self.reconstruction_instruction = reconstruction_instruction  # (en, zh)
        self.ops: dict[str, Callable[[Scene, random.Random, bool], Edit | None]] = {
            "replace_text": self.replace_text,
            "recolor": self.recolor,
            "resize": self.resize,
            "reweight": self.reweight,
            "move": self.move,
            "add_line": self.add_line,
            "remove_line": self.remove_line,
            "background": self.background,
            "reconstruct": self.reconstruct,
        }
        for name, op in MULTI_OPS.items():
            self.ops[name] = functools.partial(op, self)
        assert tuple(self.ops) == EDIT_TYPES, tuple(self.ops)

    # --- geometry ----------------------------------------------------------------

    def region(self, block: Block) -> tuple[float, float, float, float]:
        """Where a block's pixels can be: layout boxes, plates, bullets and ink overhangs."""
        x0, y0, x1, y1 = self.renderer._block_region(block)
        pad = block.size * 0.5 + 3  # plate padding (0.3 em) and glyph overhangs
        left = x0 - pad - (block.size * 0.8 if block.bullet else 0)
        return (left, y0 - pad, x1 + pad, y1 + pad)

    def _clip(self, scene: Scene, box) -> tuple[float, float, float, float]:
        w, h = scene.size
        return (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))

    def _fits(self, scene: Scene, block: Block, others: list[Block]) -> bool:
        """Inside the canvas margin, clear of other blocks and the picture."""
        w, h = scene.size
        box = self.region(block)
        if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
            return False
        if scene.picture and _overlaps(box, scene.picture["box"]):
            return False
        return not any(_overlaps(box, self.region(o)) for o in others)

    def fits_as_before(self, scene: Scene, i: int, new: Block) -> bool:
        """Whether block `i` laid out again as `new` stays on the canvas and touches
        nothing (other blocks, the picture) that the old block did not touch: a laxer
        test than `_fits`, whose clearance from everything blocks stacked a line apart
        never have. The multi-image edits use it."""
        w, h = scene.size
        old_box, new_box = self.region(scene.blocks[i]), self.region(new)
        if (new_box[0] < min(0, old_box[0]) or new_box[1] < min(0, old_box[1])
                or new_box[2] > max(w, old_box[2]) or new_box[3] > max(h, old_box[3])):
            return False
        boxes = [self.region(b) for k, b in enumerate(scene.blocks) if k != i]
        if scene.picture:
            boxes.append(tuple(scene.picture["box"]))
        return not any(_overlaps(new_box, b) and not _overlaps(old_box, b) for b in boxes)

    def _pick(self, scene: Scene, rng: random.Random, *, max_lines: int = 99) -> int | None:
        candidates = [
            i for i, b in enumerate(scene.blocks)
            if b.direction == Direction.HORIZONTAL.value and len(b.lines) <= max_lines and b.boxes
        ]
        return rng.choice(candidates) if candidates else None

    def _relayout(self, block: Block, rng, *, source=None, size=None, face=None) -> Block | None:
        """The block laid out again from its first line's position, with changes."""
        size = size or block.size
        x0, x1, top = block.boxes[0]
        lh = size * block.line_spacing
        boxes = [(bx0, bx1, top + i * lh) for i, (bx0, bx1, _) in enumerate(block.boxes)]
        new = self.renderer._horizontal_block(
            rng, role=block.role, source=block.source if source is None else source, language=block.language,
            size=size, boxes=boxes, align=block.align, prefix=block.prefix, indent=block.indent,
            line_spacing=block.line_spacing, face=face or block.face,
        )
        if new is None:
            return None
        new.bullet, new.colour, new.plate = block.bullet, block.colour, block.plate
        return new

    # --- edit types --------------------------------------------------------------

    def replacement(self, scene: Scene, rng: random.Random, i: int, *, relaxed: bool = False
                    ) -> tuple[Scene, Block, str] | None:
        """Block `i`'s text replaced by another string of its language, laid out in the
        same place, face and colour: (target scene, new block, the new string without
        the block's prefix), or None when nothing fitted in 6 tries (`_fits`, or with
        `relaxed` `fits_as_before`)."""
        old = scene.blocks[i]
        sampler = self.renderer.text
        for _ in range(6):
            if "+" in old.language:
                new_text, _ = sampler.mixed(rng)
            else:
                new_text, _ = sampler.short(rng, old.language, max_chars=max(2, min(16, len(old.source) + 4)))
            if new_text == old.source or not self.renderer.fonts.covers(old.face, old.prefix + new_text):
                continue
            new = self._relayout(old, rng, source=new_text)
            if new is None or new.text != old.prefix + new_text:
                continue  # truncated: the instruction would misquote it
            others = scene.blocks[:i] + scene.blocks[i + 1:]
            target = _copy_scene(scene)
            target.blocks[i] = new
            if not (self.fits_as_before(scene, i, new) if relaxed else self._fits(scene, new, others)):
                continue
            return target, new, new_text
        return None

    def replace_text(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        i = self._pick(scene, rng, max_lines=2)
        if i is None:
            return None
        found = self.replacement(scene, rng, i)
        if found is None:
            return None
        target, new, _ = found
        old = scene.blocks[i]
        role_en, role_zh = _ROLE_NAMES.get(old.role, ("text", "文字"))
        instruction = (
            f"把{role_zh}{quote(old.text)}改为{quote(new.text)}" if zh
            else f"Change the {role_en} {quote(old.text)} to {quote(new.text)}"
        )
        region = _union(self.region(old), self.region(new))
        return Edit("replace_text", target, instruction, self._clip(scene, region), {"old": old.text, "new": new.text})

    def new_colour(self, scene: Scene, block: Block, rng: random.Random) -> RGB | None:
        """A text colour for `block` that keeps `min_contrast` with what lies beneath it
        (its plate, or the scene without a plate) and has another name than its own."""
        old = block.colour
        assert old is not None
        beneath = [block.plate] if block.plate is not None else None
        for _ in range(20):
            probe = copy.deepcopy(block)
            probe.colour = None
            probe.plate = None
            if beneath is None:
                t = _copy_scene(scene)
                t.blocks = [probe]
                self.renderer.choose_colours(rng, t)
                colour = probe.colour
                if probe.plate is not None:
                    continue  # this background needs a plate: keep looking for a plain colour
            else:
                colour = _random_contrasting(rng, beneath[0], self.renderer.config.min_contrast)
            if colour is None or color_name(colour, False) == color_name(old, False):
                continue
            return colour
        return None

    def recolor(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        i = self._pick(scene, rng)
        if i is None:
            return None
        block = scene.blocks[i]
        old = block.colour
        assert old is not None
        colour = self.new_colour(scene, block, rng)
        if colour is None:
            return None
        target = _copy_scene(scene)
        target.blocks[i].colour = colour
        name = color_name(colour, zh)
        instruction = (
            f"把{quote(block.text)}的颜色改为{name}" if zh else f"Change the color of {quote(block.text)} to {name}"
        )
        return Edit("recolor", target, instruction, self._clip(scene, self.region(block)),
                    {"text": block.text, "old": list(old), "new": list(colour)})

    def resize(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        i = self._pick(scene, rng, max_lines=2)
        if i is None:
            return None
        block = scene.blocks[i]
        larger = rng.random() < 0.5
        size = snap_size(block.size * (rng.uniform(1.25, 1.5) if larger else rng.uniform(0.6, 0.8)))
        size = max(self.renderer.config.min_font_px, size)
        if size == block.size:
            return None
        new = self._relayout(block, rng, size=size)
        others = scene.blocks[:i] + scene.blocks[i + 1:]
        if new is None or new.text != block.text or not self._fits(scene, new, others):
            return None
        target = _copy_scene(scene)
        target.blocks[i] = new
        word_zh, word_en = ("调大", "larger") if size > block.size else ("调小", "smaller")
        instruction = f"把{quote(block.text)}的字号{word_zh}" if zh else f"Make {quote(block.text)} {word_en}"
        region = _union(self.region(block), self.region(new))
        return Edit("resize", target, instruction, self._clip(scene, region), {"text": block.text, "old": block.size, "new": size})

    def reweight(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        i = self._pick(scene, rng, max_lines=2)
        if i is None:
            return None
        block = scene.blocks[i]
        fonts = self.renderer.fonts
        want_bold = not block.face.bold
        pool = [
            f for group in fonts.preference_groups(block.language) for f in group
            if f.bold == want_bold and f.family.replace(" Bold", "") == block.face.family.replace(" Bold", "")
            and fonts.covers(f, block.prefix + block.source)
        ] or [
            f for f in fonts.faces if f.bold == want_bold and fonts.covers(f, block.prefix + block.source)
        ]
        if not pool:
            return None
        new = self._relayout(block, rng, face=rng.choice(pool))
        others = scene.blocks[:i] + scene.blocks[i + 1:]
        if new is None or new.text != block.text or not self._fits(scene, new, others):
            return None
        target = _copy_scene(scene)
        target.blocks[i] = new
        if zh:
            instruction = f"把{quote(block.text)}改为{'粗体' if want_bold else '常规字重'}"
        else:
            instruction = f"Make {quote(block.text)} {'bold' if want_bold else 'regular weight'}"
        region = _union(self.region(block), self.region(new))
        return Edit("reweight", target, instruction, self._clip(scene, region), {"text": block.text, "bold": want_bold})

    def move(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        i = self._pick(scene, rng)
        if i is None:
            return None
        block = scene.blocks[i]
        w, h = scene.size
        others = scene.blocks[:i] + scene.blocks[i + 1:]
        for direction in rng.sample(list(_DIRECTIONS), 4):
            step = rng.uniform(0.1, 0.25) * (h if direction in ("up", "down") else w)
            dx = {"left": -step, "right": step}.get(direction, 0.0)
            dy = {"up": -step, "down": step}.get(direction, 0.0)
            new = copy.deepcopy(block)
            for line in new.lines:
                line.x += dx
                line.y += dy
            new.boxes = [(x0 + dx, x1 + dx, top + dy) for x0, x1, top in new.boxes]
            if not self._fits(scene, new, others):
                continue
            target = _copy_scene(scene)
            target.blocks[i] = new
            instruction = (
                f"把{quote(block.text)}向{_DIRECTIONS[direction]}移动" if zh else f"Move {quote(block.text)} {direction}"
            )
            region = _union(self.region(block), self.region(new))
            return Edit("move", target, instruction, self._clip(scene, region), {"text": block.text, "direction": direction})
        return None

    def add_line(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        w, h = scene.size
        r = self.renderer
        left, top, right, bottom = r._content_box(w, h)
        language = scene.blocks[0].language if scene.blocks and "+" not in scene.blocks[0].language else r.text.language(rng)
        for _ in range(8):
            text, tag = r.text.short(rng, language, max_chars=10)
            size = r._size(rng, h, w, 0.04, 0.08)
            lh = size * 1.35
            y = rng.uniform(top, max(top, bottom - lh))
            block = r._horizontal_block(
                rng, role="label", source=text, language=tag, size=size, boxes=[(left, right, y)],
                align=rng.choice(("left", "center", "right")),
            )
            if block is None or block.text != text or not self._fits(scene, block, scene.blocks):
                continue
            target = _copy_scene(scene)
            target.blocks.append(block)
            r.choose_colours(rng, target, [block])
            instruction = f"添加文字{quote(text)}" if zh else f"Add the text {quote(text)}"
            return Edit("add_line", target, instruction, self._clip(scene, self.region(block)), {"new": text})
        return None

    def remove_line(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        if not scene.blocks:
            return None
        i = rng.randrange(len(scene.blocks))
        block = scene.blocks[i]
        target = _copy_scene(scene)
        del target.blocks[i]
        instruction = f"删除文字{quote(block.text)}" if zh else f"Remove the text {quote(block.text)}"
        return Edit("remove_line", target, instruction, self._clip(scene, self.region(block)), {"old": block.text})

    def background(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        w, h = scene.size
        r = self.renderer
        colours = [b.colour for b in scene.blocks if b.plate is None and b.colour is not None]
        for _ in range(12):
            kind = rng.choice(("solid", "gradient", "texture"))
            image, kind = bgmod.background(rng, (w, h), kind, r.photos)
            mean = tuple(int(c) for c in image.resize((1, 1), bgmod.Image.Resampling.BOX).getpixel((0, 0)))
            if any(contrast_ratio(c, mean) < r.config.min_contrast for c in colours):  # type: ignore[arg-type]
                continue
            if color_name(mean, False) == color_name(_mean(scene), False) and kind == scene.background_kind:
                continue  # too alike to call it a change
            target = _copy_scene(scene)
            target.background, target.background_kind = image, kind
            desc_en, desc_zh = _background_words(kind, mean)
            instruction = f"把背景换成{desc_zh}" if zh else f"Change the background to {desc_en}"
            return Edit("background", target, instruction, (0.0, 0.0, float(w), float(h)), {"kind": kind})
        return None

    def reconstruct(self, scene: Scene, rng: random.Random, zh: bool) -> Edit | None:
        en, zh_text = self.reconstruction_instruction
        return Edit("reconstruct", _copy_scene(scene), zh_text if zh else en, (0.0, 0.0, 0.0, 0.0), {})


def _mean(scene: Scene) -> RGB:
    return tuple(int(c) for c in scene.background.resize((1, 1), bgmod.Image.Resampling.BOX).getpixel((0, 0)))  # type: ignore[return-value]


def _background_words(kind: str, colour: RGB) -> tuple[str, str]:
    en, zh = color_name(colour, False), color_name(colour, True)
    if kind == "solid":
        return f"plain {en}", f"纯{zh}"
    if kind == "gradient":
        return f"a {en} gradient", f"{zh}渐变"
    return f"a {en} texture", f"{zh}纹理"


def _random_contrasting(rng: random.Random, under: RGB, min_contrast: float) -> RGB | None:
    from data_pipelines.text.color import random_color

    for _ in range(20):
        colour = random_color(rng)
        if contrast_ratio(colour, under) >= min_contrast:
            return colour
    return None
