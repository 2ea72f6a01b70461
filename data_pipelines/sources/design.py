"""The procedural design composer: posters, slides and UI screens, with or without text.

It stands in for real design data in the embedded default and augments it in real
runs. Layouts come from margins proportional to the canvas, column splits (one or
two columns, a picture band) and one alignment per design; colours from a palette of
a dominant, an accent and a neutral colour; text from the renderer's fonts,
languages and contrast rules (checked against the shapes beneath). Every design is a `Scene` (see
data_pipelines.sources.render), so edit pairs can be derived from it too.

    poster   picture region, title, subtitle, body, and a price tag or date badge
    slide    title bar with title; bullets in one column, two columns, or beside a picture
    ui       navigation bar, cards with a heading and a line, form fields with
             labels, buttons
    (each kind also comes text-free, and with a single short line: the text
    classes `none` and `simple` that the first two curriculum stages need from this
    source; same shapes and pictures)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping

from data_pipelines.text.color import RGB, contrast_ratio, random_color
from data_pipelines.core.schema import SIMPLE_MAX_CHARS, Source, count_chars
from data_pipelines.sources import background as bgmod
from data_pipelines.sources.render import Block, RenderConfig, Scene, Shape, SyntheticRenderer, _weights
from data_pipelines.text.corpus import CJK_LANGUAGES, TextSampler
from data_pipelines.text.fonts import FontRegistry, snap_size

DESIGN_KINDS = ("poster", "slide", "ui")
PRICES = ("¥{n}", "${n}", "€{n}", "{n}元", "{n}% OFF", "-{n}%")
DATES = ("{y}.{m:02d}.{d:02d}", "{m}月{d}日", "{y}年{m}月{d}日", "{m:02d}/{d:02d}")


@dataclass
class DesignConfig:
    kinds: Mapping[str, float] = field(default_factory=lambda: {"poster": 0.4, "slide": 0.3, "ui": 0.3})
    """Design kinds with weights."""
    text_free_fraction: float = 0.15
    """Share of designs drawn without any text (text class `none`)."""
    single_line_fraction: float = 0.3
    """Share of designs that keep one short line (a title, a button): text class
    `simple`, which the simple-text curriculum stage needs from this source."""

    def __post_init__(self) -> None:
        for name in self.kinds:
            if name not in DESIGN_KINDS:
                raise ValueError(f"design.kinds: unknown kind {name!r}; use {DESIGN_KINDS}")
        self.kind_weights = _weights("design.kinds", self.kinds)
        for name in ("text_free_fraction", "single_line_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"design.{name} = {getattr(self, name)} must lie in [0, 1]")
        if self.text_free_fraction + self.single_line_fraction > 1:
            raise ValueError("design.text_free_fraction + design.single_line_fraction must not exceed 1")


def _palette(rng: random.Random) -> tuple[RGB, RGB, RGB]:
    """(dominant, accent, neutral): a saturated main colour, a contrasting accent, a near-white/near-black neutral."""
    dominant = random_color(rng, saturation=(0.3, 0.9), value=(0.3, 0.95))
    for _ in range(10):
        accent = random_color(rng, saturation=(0.5, 1.0), value=(0.5, 1.0))
        if contrast_ratio(accent, dominant) >= 2.0:
            break
    neutral = (rng.randint(235, 252),) * 3 if rng.random() < 0.7 else (rng.randint(18, 40),) * 3
    return dominant, accent, neutral  # type: ignore[return-value]


class DesignComposer(SyntheticRenderer):
    """Composes design scenes; drawing, captions and metadata are the renderer's."""

    def __init__(self, *, fonts: FontRegistry, text: TextSampler, config: RenderConfig, design: DesignConfig):
        super().__init__(fonts=fonts, text=text, config=config)
        self.design = design

    def compose(self, seed: int, key: str) -> Scene:
        rng = random.Random(seed)
        w, h = rng.choices(self.config.size_list, self.config.size_weights)[0]
        kind = rng.choices(list(self.design.kinds), self.design.kind_weights)[0]
        amount = rng.random()
        with_text = amount >= self.design.text_free_fraction
        single_line = with_text and amount < self.design.text_free_fraction + self.design.single_line_fraction
        dominant, accent, neutral = _palette(rng)
        language = self.text.language(rng)
        if "+" in language or language == "mixed":
            language = rng.choice([lang for lang in CJK_LANGUAGES if self.text.sources.get(lang)] or ["en"])
        scene = Scene(
            seed=seed, key=key, source=Source.DESIGN.value, fmt=kind, size=(w, h), background_kind="solid",
            background=bgmod._solid((w, h), neutral), blocks=[],
        )
        build = {"poster": self._poster, "slide": self._slide, "ui": self._ui}[kind]
        build(rng, scene, language, dominant, accent, neutral, with_text)
        if not with_text:
            scene.blocks = []
        elif single_line:
            # A minimal design: one short single-language line (the title, a badge, a
            # button) over the same shapes; the rest of the text is left out.
            short = [b for b in scene.blocks if len(b.lines) == 1 and count_chars(b.text) <= SIMPLE_MAX_CHARS
                     and "+" not in b.language]
            titles = [b for b in short if b.role == "title"]
            scene.blocks = [(titles or short)[0]] if short else []
        if scene.picture is not None:
            scene.picture_image = self.picture_image(rng, scene.picture)
        self.choose_colours(rng, scene)
        scene.caption_zh = rng.random() < self.config.caption_zh_fraction
        return scene

    # --- helpers -------------------------------------------------------------------

    def _label(self, rng, scene, role, text, language, size, x0, x1, cy, align="center") -> Block | None:
        """One line of text centred vertically on `cy` between x0 and x1, shrunk until it
        fits whole; None if it does not fit even at the smallest size."""
        while size >= self.config.min_font_px:
            block = self._horizontal_block(
                rng, role=role, source=text, language=language, size=size, boxes=[(x0, x1, cy - size * 0.62)], align=align,
            )
            if block is not None and block.text == text:
                scene.blocks.append(block)
                return block
            size = snap_size(size * 0.85) if snap_size(size * 0.85) < size else size - 2
        return None

    def _short(self, rng, language, max_chars=10) -> str:
        return self.text.short(rng, language, max_chars=max_chars)[0]

    # --- kinds -----------------------------------------------------------------------

    def _poster(self, rng, scene: Scene, language, dominant, accent, neutral, with_text) -> None:
        w, h = scene.size
        m = int(min(w, h) * 0.07)
        if rng.random() < 0.5:
            scene.background = bgmod.gradient(rng, (w, h), dominant, neutral)
            scene.background_kind = "gradient"
        else:
            scene.background = bgmod._solid((w, h), dominant)
        picture_top = rng.random() < 0.5
        ph = int(h * rng.uniform(0.3, 0.42))
        py = m if picture_top else h - m - ph
        scene.picture = {"box": [m, py, w - m, py + ph], "shape": "rectangle", "side": None}
        text_top = py + ph + m // 2 if picture_top else m
        text_bottom = h - m if picture_top else py - m // 2
        align = rng.choice(("left", "center"))
        # Badge: a price tag or a date in an accent disc (short labels) or pill (long
        # ones), over the picture's corner.
        n = rng.randint(9, 999)
        label = rng.choice(PRICES).format(n=n if "%" not in rng.choice(PRICES) else n % 80 + 10)
        if rng.random() < 0.4:
            label = rng.choice(DATES).format(y=rng.randint(2020, 2030), m=rng.randint(1, 12), d=rng.randint(1, 28))
        if "%" in label:
            label = label.replace(str(n), str(n % 80 + 10))
        if not self.fonts.union_covers(label):
            label = str(n)
        r = int(min(w, h) * rng.uniform(0.08, 0.11))
        bw = 2 * r if len(label) <= 4 else int(3.6 * r)
        bh = 2 * r if len(label) <= 4 else int(1.3 * r)
        bx = w - m - bw if rng.random() < 0.5 else m
        by = py + ph - int(0.6 * bh) if picture_top else py - int(0.4 * bh)
        badge = (bx, by, bx + bw, by + bh)
        scene.shapes.append(Shape("ellipse" if bw == bh and rng.random() < 0.5 else "rounded", badge, accent, radius=bh * 0.4))
        if not with_text:
            return
        title = self._short(rng, language, 8)
        size = snap_size(min(w, h) * rng.uniform(0.08, 0.11))
        y = text_top
        block = self._horizontal_block(rng, role="title", source=title, language=language, size=size,
                                       boxes=[(m, w - m, y)], align=align)
        if block is not None:
            scene.blocks.append(block)
            y += size * 1.45
        sub = self.text.paragraph(rng, language if rng.random() < 0.7 else "en", rng.randint(6, 14))
        ssize = snap_size(min(w, h) * 0.045)
        block = self._horizontal_block(rng, role="subtitle", source=sub[0], language=sub[1], size=ssize,
                                       boxes=[(m, w - m, y)], align=align)
        if block is not None:
            scene.blocks.append(block)
            y += ssize * 1.6
        body, tag = self.text.paragraph(rng, language, rng.randint(20, 50))
        bsize = snap_size(min(w, h) * 0.034)
        lh = bsize * 1.4
        n = int((text_bottom - y) // lh)
        if n >= 1:
            block = self._horizontal_block(rng, role="body", source=body, language=tag, size=bsize,
                                           boxes=[(m, w - m, y + i * lh) for i in range(min(n, 4))], align=align)
            if block is not None:
                scene.blocks.append(block)
        self._label(rng, scene, "label", label, "en" if label.isascii() else "zh-Hans",
                    snap_size(bh * rng.uniform(0.25, 0.32)), badge[0] + bh * 0.2, badge[2] - bh * 0.2, (badge[1] + badge[3]) / 2)

    def _slide(self, rng, scene: Scene, language, dominant, accent, neutral, with_text) -> None:
        w, h = scene.size
        m = int(min(w, h) * 0.06)
        bar_h = int(h * rng.uniform(0.14, 0.2))
        scene.shapes.append(Shape("rect", (0, 0, w, bar_h), dominant))
        scene.shapes.append(Shape("rect", (m, bar_h + m // 3, m + int(w * 0.15), bar_h + m // 3 + 4), accent))
        # One column of bullets, or two columns: bullets beside a picture, or two
        # bullet columns split by a rule.
        layout = rng.choice(("single", "picture", "columns"))
        mid = w // 2
        columns = [(m, w - m)] if layout == "single" else [(m, mid - m // 2)]
        if layout == "picture":
            scene.picture = {"box": [mid + m // 2, bar_h + m, w - m, h - m], "shape": "rectangle", "side": "right"}
        elif layout == "columns":
            columns.append((mid + m // 2, w - m))
            scene.shapes.append(Shape("rect", (mid - 1, bar_h + m, mid + 1, h - m), accent))
        if not with_text:
            return
        size = snap_size(bar_h * rng.uniform(0.4, 0.5))
        self._label(rng, scene, "title", self._short(rng, language, 10), language, size, m, w - m, bar_h / 2, align="left")
        bsize = snap_size(min(w, h) * rng.uniform(0.035, 0.045))
        lh = bsize * 1.45
        for x0, x1 in columns:
            y = bar_h + m * 1.2
            for _ in range(rng.randint(2, 5)):
                if y + 2 * lh > h - m:
                    break
                item, tag = (
                    self.text.paragraph(rng, language, rng.randint(4, 16)) if rng.random() < 0.4
                    else self.text.short(rng, language, 12)
                )
                block = self._horizontal_block(rng, role="list_item", source=item, language=tag, size=bsize,
                                               boxes=[(x0, x1, y), (x0, x1, y + lh)], align="left", indent=bsize)
                if block is None:
                    break
                block.bullet = True
                scene.blocks.append(block)
                y += len(block.lines) * lh + bsize * 0.5

    def _ui(self, rng, scene: Scene, language, dominant, accent, neutral, with_text) -> None:
        w, h = scene.size
        m = int(min(w, h) * 0.05)
        nav_h = int(h * rng.uniform(0.1, 0.13))
        scene.shapes.append(Shape("rect", (0, 0, w, nav_h), dominant))
        card_fill = tuple(max(0, min(255, c + (-14 if sum(neutral) > 380 else 18))) for c in neutral)
        y = nav_h + m
        elements = []
        # Cards: a rounded panel with a heading and a line of text.
        for _ in range(rng.randint(1, 2)):
            ch = int(h * 0.17)
            if y + ch > h - m:
                break
            scene.shapes.append(Shape("rounded", (m, y, w - m, y + ch), card_fill, radius=m * 0.4))  # type: ignore[arg-type]
            elements.append(("card", y, ch))
            y += ch + m // 2
        # Form fields: label above an outlined input box.
        for _ in range(rng.randint(1, 2)):
            fh = int(h * 0.07)
            if y + fh + m > h - m - int(h * 0.1):
                break
            label_y = y
            y += int(fh * 0.75)  # room for the label line above the field
            scene.shapes.append(Shape("rounded", (m, y, w - m, y + fh), None, outline=(150, 150, 150), width=2, radius=6))
            elements.append(("field", label_y, fh))
            y += fh + m // 2
        # Buttons: filled pills in the accent colour.
        bh = int(h * 0.08)
        buttons = []
        if y + bh <= h - m:
            bw = (w - 3 * m) // 2
            for k in range(rng.randint(1, 2)):
                box = (m + k * (bw + m), y, m + k * (bw + m) + bw, y + bh)
                scene.shapes.append(Shape("rounded", box, accent, radius=bh / 2))
                buttons.append(box)
        if not with_text:
            return
        self._label(rng, scene, "title", self._short(rng, language, 8), language,
                    snap_size(nav_h * 0.42), m, w - m, nav_h / 2, align=rng.choice(("left", "center")))
        small = snap_size(min(w, h) * 0.036)
        for kind, top, height in elements:
            if kind == "card":
                self._label(rng, scene, "subtitle", self._short(rng, language, 10), language,
                            snap_size(small * 1.25), m * 1.5, w - m * 1.5, top + height * 0.32, align="left")
                self._label(rng, scene, "body", self._short(rng, language, 14), language,
                            small, m * 1.5, w - m * 1.5, top + height * 0.7, align="left")
            else:
                self._label(rng, scene, "label", self._short(rng, language, 8), language,
                            small, m, w - m, top + small * 0.5, align="left")
        for box in buttons:
            self._label(rng, scene, "button", self._short(rng, language, 6), language,
                        snap_size(bh * 0.42), box[0] + 6, box[2] - 6, (box[1] + box[3]) / 2)
