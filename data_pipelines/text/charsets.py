"""Character sets derived from the standard codecs, so nothing is downloaded.

Each national standard lays its characters out in a 94 x 94 grid ("rows" and
"cells"); the EUC encodings map row r, cell c to the bytes (0xA0 + r, 0xA0 + c).
Decoding every cell of a row range with Python's codec gives the set:

- GB 2312 level 1: rows 16-55, 3,755 common simplified hanzi (ordered by pinyin);
  level 2: rows 56-87, 3,008 less common ones (ordered by radical).
- Big5 level 1 (0xA440-0xC67E): 5,401 frequent traditional hanzi.
- JIS X 0208: row 4 hiragana (83), row 5 katakana (86), rows 16-47 level-1 kanji
  (2,965), rows 48-84 level-2 kanji (3,390).
- KS X 1001: rows 16-40, the 2,350 precomposed Hangul syllables.
"""

from __future__ import annotations

import functools
import string


def _euc_rows(codec: str, first_row: int, last_row: int) -> str:
    chars = []
    for row in range(first_row, last_row + 1):
        for cell in range(1, 95):
            try:
                chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode(codec))
            except UnicodeDecodeError:
                continue  # unassigned cell
    return "".join(chars)


@functools.cache
def gb2312_level1() -> str:
    return _euc_rows("gb2312", 16, 55)


@functools.cache
def gb2312_level2() -> str:
    return _euc_rows("gb2312", 56, 87)


@functools.cache
def big5_level1() -> str:
    chars = []
    for lead in range(0xA4, 0xC7):
        for trail in [*range(0x40, 0x7F), *range(0xA1, 0xFF)]:
            if (lead, trail) > (0xC6, 0x7E):
                break
            try:
                chars.append(bytes([lead, trail]).decode("big5"))
            except UnicodeDecodeError:
                continue
    return "".join(chars)


@functools.cache
def hiragana() -> str:
    return _euc_rows("euc_jp", 4, 4)


@functools.cache
def katakana() -> str:
    return _euc_rows("euc_jp", 5, 5)


@functools.cache
def jis_level1_kanji() -> str:
    return _euc_rows("euc_jp", 16, 47)


@functools.cache
def jis_level2_kanji() -> str:
    return _euc_rows("euc_jp", 48, 84)


@functools.cache
def ksx1001_hangul() -> str:
    return _euc_rows("euc_kr", 16, 40)


LATIN_LETTERS = string.ascii_letters
DIGITS = string.digits


def gb2312_level(ch: str) -> int | None:
    """1 or 2 for a GB 2312 hanzi, None otherwise (used to report accuracy by level)."""
    if ch in _gb_level1_set():
        return 1
    if ch in _gb_level2_set():
        return 2
    return None


@functools.cache
def _gb_level1_set() -> frozenset[str]:
    return frozenset(gb2312_level1())


@functools.cache
def _gb_level2_set() -> frozenset[str]:
    return frozenset(gb2312_level2())

