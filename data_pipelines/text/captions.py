"""Caption templates (Chinese and English) that quote the rendered text exactly.

The quoted strings are the rendered block texts, character for character, inside
“ ” quotes, the form the released model's prompts use ("... the title “春节快乐” ...").
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipelines.text.color import RGB

# A small named palette for describing colours in captions (nearest by RGB distance).
_PALETTE: list[tuple[RGB, str, str]] = [
    ((0, 0, 0), "black", "黑色"),
    ((255, 255, 255), "white", "白色"),
    ((128, 128, 128), "grey", "灰色"),
    ((200, 30, 30), "red", "红色"),
    ((240, 130, 20), "orange", "橙色"),
    ((240, 210, 40), "yellow", "黄色"),
    ((40, 160, 60), "green", "绿色"),
    ((40, 170, 190), "cyan", "青色"),
    ((40, 80, 200), "blue", "蓝色"),
    ((20, 30, 90), "navy", "深蓝色"),
    ((130, 50, 170), "purple", "紫色"),
    ((230, 120, 170), "pink", "粉色"),
    ((120, 70, 30), "brown", "棕色"),
    ((230, 220, 190), "beige", "米色"),
]

_BACKGROUND_WORDS = {
    "solid": ("plain {c}", "纯{c}"),
    "gradient": ("{c} gradient", "{c}渐变"),
    "texture": ("textured {c}", "{c}纹理"),
    "photo": ("photographic", "照片"),
}


_DESIGN_WORDS = {"poster": ("a poster", "海报"), "slide": ("a presentation slide", "幻灯片"), "ui": ("an app screen", "应用界面")}


def color_name(rgb: RGB, zh: bool) -> str:
    best = min(_PALETTE, key=lambda p: sum((a - b) ** 2 for a, b in zip(p[0], rgb)))
    return best[2] if zh else best[1]


@dataclass
class CaptionBlock:
    role: str  # title | subtitle | body | list_item | label
    text: str
    color: RGB


def quote(text: str) -> str:
    """Text as captions and instructions quote it: exactly, inside “ ”."""
    return f"“{text}”"


def caption(
    *,
    zh: bool,
    fmt: str,
    background_kind: str,
    background_color: RGB,
    blocks: list[CaptionBlock],
    vertical: bool = False,
    picture_side: str | None = None,
) -> str:
    """One caption for a rendered sample; every block's text appears in it, quoted."""
    en_bg, zh_bg = _BACKGROUND_WORDS.get(background_kind, ("plain {c}", "纯{c}"))
    bg = (zh_bg if zh else en_bg).format(c=color_name(background_color, zh))
    design = _DESIGN_WORDS.get(fmt)
    if not blocks:
        if design:
            return f"一张{bg}背景的{design[1]}设计，画面中没有任何文字。" if zh else f"{design[0].capitalize()} design on a {bg} background, with no text."
        return f"一张{bg}背景的图片，画面中没有任何文字。" if zh else f"A {bg} background image with no text."

    colour = color_name(blocks[0].color, zh)
    titles = [b for b in blocks if b.role == "title"]
    subtitles = [b for b in blocks if b.role == "subtitle"]
    items = [b for b in blocks if b.role == "list_item"]
    bodies = [b for b in blocks if b.role not in ("title", "subtitle", "list_item")]  # body, label, button...
    parts: list[str] = []
    if zh:
        if vertical:
            parts.append(f"一张{bg}背景的图片，文字竖排，从右到左分列书写")
        elif picture_side:
            side = "左侧" if picture_side == "left" else "右侧"
            parts.append(f"一个图文混排的版面，{bg}背景，图片位于{side}，文字环绕图片排列")
        elif design:
            parts.append(f"一张{bg}背景的{design[1]}")
        elif fmt in ("composition", "list"):
            parts.append(f"一张{bg}背景的{'海报' if fmt == 'composition' else '幻灯片'}")
        else:
            parts.append(f"一张{bg}背景的图片，上面用{colour}文字写着")
        if titles:
            parts.append("标题为" + "、".join(quote(b.text) for b in titles))
        if subtitles:
            parts.append("副标题为" + "、".join(quote(b.text) for b in subtitles))
        if items:
            parts.append("列表内容依次为" + "、".join(quote(b.text) for b in items))
        if bodies:
            label = "正文为" if (titles or subtitles or items) else "内容为"
            parts.append(label + "、".join(quote(b.text) for b in bodies))
        if len(parts) == 2 and parts[0].endswith("写着"):
            return parts[0] + parts[1][3:] + "。"
        return "，".join(parts) + "。"

    if vertical:
        lead = f"A {bg} image with vertical text in columns read from right to left"
    elif picture_side:
        lead = f"A layout on a {bg} background with a picture on the {picture_side} and text wrapping around it"
    elif design:
        lead = f"{design[0].capitalize()} on a {bg} background"
    elif fmt == "composition":
        lead = f"A poster design on a {bg} background"
    elif fmt == "list":
        lead = f"A slide on a {bg} background"
    else:
        lead = f"A {bg} background with {colour} text that reads"
    if lead.endswith("reads") and len(blocks) == 1:
        return f"{lead} {quote(blocks[0].text)}."
    if titles:
        parts.append("the title reads " + ", ".join(quote(b.text) for b in titles))
    if subtitles:
        parts.append("the subtitle reads " + ", ".join(quote(b.text) for b in subtitles))
    if items:
        parts.append("a list reads " + ", ".join(quote(b.text) for b in items))
    if bodies:
        parts.append(("the body text reads " if (titles or subtitles or items) else "the text reads ") + ", ".join(quote(b.text) for b in bodies))
    if lead.endswith("reads"):
        lead = f"A {bg} background with {colour} text"
    return lead + "; " + "; ".join(parts) + "."
