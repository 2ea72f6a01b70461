"""Line breaking for CJK and Latin text.

CJK text may break between any two characters except where the line-start and
line-end prohibitions (Chinese 避头尾 / Japanese 禁則処理, JIS X 4051 §3.1.7) forbid:
closing punctuation, small kana and the prolonged-sound mark never start a line,
opening brackets never end one. When a break would violate that, the characters
before the break move to the next line with it (追い出し, "push out").
Latin words, numbers and their attached punctuation are unbreakable units; spaces
are break opportunities and vanish at a break. A unit wider than a whole line is
broken between characters, as a last resort.
"""

from __future__ import annotations

import unicodedata
from typing import Callable

# Never at the start of a line.
NO_LINE_START = frozenset(
    "，。、．：；！？）］｝〕〉》」』】〙〗〟’”｠»…‥・゠〜～"
    "ヽヾーァィゥェォッャュョヮヵヶぁぃぅぇぉっゃゅょゎゕゖㇰㇱㇲㇳㇴㇵㇶㇷㇸㇹㇺㇻㇼㇽㇾㇿ々〻"
    "!%),.:;?]}¢°'\"’”"
)
# Never at the end of a line.
NO_LINE_END = frozenset("（［｛〔〈《「『【〘〖〝‘“｟«([{$£¥＄￥")


def _is_wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def units(text: str) -> list[str]:
    """Split text into unbreakable units: single wide characters, Latin/number runs, spaces."""
    out: list[str] = []
    buf = ""
    for ch in text:
        if ch.isspace():
            if buf:
                out.append(buf)
                buf = ""
            out.append(" ")
        elif _is_wide(ch):
            if buf:
                out.append(buf)
                buf = ""
            out.append(ch)
        else:
            buf += ch
    if buf:
        out.append(buf)
    return out


def _first_visible(items: list[str], start: int) -> str:
    """The first unit from `start` on that is not a space ("" if none)."""
    return next((u for u in items[start:] if u != " "), "")


def break_lines(
    text: str,
    max_width: Callable[[int], float],
    measure: Callable[[str], float],
    max_lines: int | None = None,
) -> list[str]:
    """Greedy line breaking; `max_width(i)` is the width available to line i.

    Returns the lines (trailing spaces stripped). With `max_lines`, stops early:
    the returned lines are a prefix of the text's lines, never a truncated unit.
    """
    items = units(text)
    lines: list[list[str]] = [[]]
    width = 0.0
    i = 0
    while i < len(items):
        unit = items[i]
        line = lines[-1]
        limit = max_width(len(lines) - 1)
        w = measure(unit)
        if unit == " ":
            if line:  # a space at a line start is dropped
                line.append(unit)
                width += w
            i += 1
            continue
        if width + w <= limit or not line:
            if not line and w > limit:
                # A unit wider than the line: split it between characters.
                head = ""
                for ch in unit:
                    if head and measure(head + ch) > limit:
                        break
                    head += ch
                if head != unit:
                    line.append(head)
                    items[i] = unit[len(head):]
                    lines.append([])
                    width = 0.0
                    if max_lines and len(lines) > max_lines:
                        break
                    continue
            line.append(unit)
            width += w
            i += 1
            continue
        # Break before `unit`. Push units down while the next line would start with
        # a character that may not start one, or this line end with one that may not
        # end one (a run of closing marks moves down with the character before it).
        # A pushed unit takes the spaces after it along; the spaces left at the
        # break itself are eaten by it.
        while True:
            gap = 0
            while line and line[-1] == " ":
                line.pop()
                gap += 1
            if len(line) > 1 and (_first_visible(items, i)[:1] in NO_LINE_START or line[-1][-1] in NO_LINE_END):
                items[i:i] = [line.pop()] + [" "] * gap
                continue
            break
        lines.append([])
        width = 0.0
        if max_lines and len(lines) > max_lines:
            break
    result = ["".join(line).strip() for line in lines]
    result = [line for line in result if line]
    if max_lines:
        result = result[:max_lines]
    return result
