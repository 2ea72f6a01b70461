"""Font discovery and glyph coverage.

Fonts come from fontconfig (`fc-list`) and/or configured folders. A string is drawn
in a face only if the face's cmap maps every character of it: no tofu boxes, ever.
Coverage is read with fontTools (the cmap table), lazily and once per face, because
a CJK collection holds ~65k mappings per face and most runs touch only a few faces.

Noto CJK ships one collection per weight with a face per region (SC, TC, HK, JP,
KR); the glyph shapes differ by region, so a language prefers the faces whose family
names carry its region tag and falls back to any face that covers the string.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import shutil
import subprocess
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import ImageFont

log = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

# Region tags in family names, per language (soft preference, see module doc).
LANGUAGE_REGION_TAGS = {
    "zh-Hans": ("SC", "CN", "GB", "Hans"),
    "zh-Hant": ("TC", "HK", "TW", "Hant"),
    "ja": ("JP",),
    "ko": ("KR",),
}

# Font sizes in pixels that renderers snap to: steps of ~12%, fine enough for variety,
# few enough that font objects and measurements are reused (each (face, size) is a
# FreeType face of its own; see FontRegistry.font).
SIZE_LADDER = (12, 14, 16, 18, 20, 23, 26, 29, 33, 37, 42, 47, 53, 60, 67, 75, 84, 94, 105, 118, 132, 148, 166, 186)


def snap_size(size: float) -> int:
    """The ladder size nearest to `size` (sizes beyond the ladder are kept, rounded)."""
    if size > SIZE_LADDER[-1]:
        return int(round(size))
    return min(SIZE_LADDER, key=lambda s: abs(s - size))


# A CJK region tag at the end of a family name ("Noto Sans CJK SC").
_REGION_SUFFIX = re.compile(r"\s+(SC|TC|HK|JP|KR|CN|TW)$")

BOLD_WEIGHT = 600  # CSS / OpenType usWeightClass at and above which a face is bold


class MissingGlyphsError(ValueError):
    """No available face covers every character of a string."""

    def __init__(self, text: str, missing: Iterable[str], where: str):
        self.text = text
        self.missing = sorted(set(missing))
        shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in self.missing[:10])
        more = f" and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        super().__init__(
            f"no font {where} covers {shown}{more} in {text!r}; add a font that does "
            f"(fonts.dirs, or install one fontconfig finds) or remove these characters "
            f"from the corpus"
        )


@dataclass(frozen=True)
class FontFace:
    path: str
    index: int  # face index inside a .ttc/.otc collection, 0 for single fonts
    family: str
    style: str
    weight: int  # OpenType usWeightClass scale (400 regular, 700 bold)

    @property
    def name(self) -> str:
        """What the sample metadata records: the file name, plus the face index in collections."""
        base = Path(self.path).name
        return f"{base}#{self.index}" if self.path.lower().endswith((".ttc", ".otc")) else base

    @property
    def bold(self) -> bool:
        return self.weight >= BOLD_WEIGHT


@dataclass(frozen=True)
class FaceTables:
    """What layout needs from a face's tables, in compact arrays indexed by code point.

    fontTools objects for a CJK face hold ~65k parsed entries (tens of MB); these
    arrays hold the same facts in ~0.6 MB, so a job can know every installed face.
    """

    units_per_em: int
    covered: bytes  # covered[cp] == 1 when the cmap maps cp to a glyph
    advances: array  # "H": horizontal advance in font units (0 where not covered)

    def covers(self, cp: int) -> bool:
        return cp < len(self.covered) and self.covered[cp] == 1

    def advance(self, cp: int) -> int:
        """Advance of `cp`, one em for characters the face lacks (never drawn in it)."""
        if cp < len(self.advances) and self.covered[cp]:
            return self.advances[cp]
        return self.units_per_em


@functools.lru_cache(maxsize=None)
def face_tables(path: str, index: int) -> FaceTables:
    """The cmap coverage and advance widths of a face, read once per process.

    FreeType's hinted advance at an integer pixel size is the scaled advance rounded
    to a whole pixel (off by one pixel for ~0.1% of glyphs, measured on Noto CJK and
    DejaVu), so layout measures candidate lines from these without FreeType; final
    glyph boxes come from Pillow.
    """
    from fontTools.ttLib import TTFont

    font = TTFont(path, fontNumber=index, lazy=True)
    try:
        upem = int(font["head"].unitsPerEm)
        cmap = font.getBestCmap() or {}
        metrics = font["hmtx"].metrics
        size = max(cmap, default=0) + 1
        covered = bytearray(size)
        advances = array("H", bytes(2 * size))
        for cp, name in cmap.items():
            covered[cp] = 1
            advances[cp] = metrics[name][0] if name in metrics else upem
        return FaceTables(upem, bytes(covered), advances)
    finally:
        font.close()
        del font
        gc.collect()  # parsed tables form reference cycles: free them now, not at some later GC pass


def open_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    """A Pillow font object with the basic layout engine (no shaping: CJK, Latin and
    precomposed Hangul need none, and it is faster than raqm)."""
    return ImageFont.truetype(path, size=size, index=index, layout_engine=ImageFont.Layout.BASIC)


def _fc_weight_to_css(fc_weight: int) -> int:
    # fontconfig weights: 40 light, 50 book, 80 regular, 100 medium, 180 semibold,
    # 200 bold, 210 extrabold, 215 black.
    table = [(40, 300), (50, 350), (80, 400), (100, 500), (180, 600), (200, 700), (210, 800), (215, 900)]
    best = min(table, key=lambda t: abs(t[0] - fc_weight))
    return best[1]


def _fontconfig_faces() -> list[FontFace]:
    if shutil.which("fc-list") is None:
        log.warning("fc-list not found: fontconfig fonts are not available (install fontconfig)")
        return []
    fmt = "%{file}\\t%{index}\\t%{family[0]}\\t%{style[0]}\\t%{weight}\\n"
    out = subprocess.run(["fc-list", "--format", fmt], capture_output=True, text=True, check=True).stdout
    faces = []
    for row in out.splitlines():
        parts = row.split("\t")
        if len(parts) != 5 or not parts[0].lower().endswith(FONT_SUFFIXES):
            continue
        path, index, family, style, weight = parts
        try:
            css_weight = _fc_weight_to_css(int(float(weight)))
        except ValueError:
            css_weight = 400
        faces.append(FontFace(path, int(index or 0), family, style, css_weight))
    return faces


def _folder_faces(folder: Path) -> list[FontFace]:
    from fontTools.ttLib import TTCollection, TTFont

    if not folder.is_dir():
        raise ValueError(f"font folder {str(folder)!r} does not exist; fix fonts.dirs")
    faces = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_SUFFIXES):
        try:
            if path.suffix.lower() in (".ttc", ".otc"):
                collection = TTCollection(str(path), lazy=True)
                fonts = list(collection.fonts)
            else:
                fonts = [TTFont(str(path), lazy=True)]
        except Exception as exc:  # a broken font file is skipped, not fatal
            log.warning("skipping unreadable font %s: %s", path, exc)
            continue
        for index, font in enumerate(fonts):
            name = font["name"]
            family = name.getBestFamilyName() or path.stem
            style = name.getBestSubFamilyName() or "Regular"
            weight = font["OS/2"].usWeightClass if "OS/2" in font else 400
            faces.append(FontFace(str(path), index, str(family), str(style), int(weight)))
            font.close()
    return faces


class FontRegistry:
    """The faces a job may draw with, and the rule for choosing one for a string."""

    def __init__(self, faces: Sequence[FontFace], *, cache_size: int = 128):
        if not faces:
            raise ValueError(
                "no fonts found: install fonts-noto-cjk (the Makefile does) or set fonts.dirs "
                "to a folder of .ttf/.otf/.ttc files"
            )
        # Sorted so that the choice for a given seed does not depend on discovery order.
        self.faces = sorted(set(faces), key=lambda f: (f.path, f.index))
        self._groups: dict[str, list[list[FontFace]]] = {}
        if cache_size < 1:
            raise ValueError(f"fonts.cache_size = {cache_size} must be >= 1")
        self.cache_size = cache_size
        self._fonts: OrderedDict[tuple[str, int, int], ImageFont.FreeTypeFont] = OrderedDict()

    def font(self, face: FontFace, size: int) -> ImageFont.FreeTypeFont:
        """The Pillow font for (face, size), from a bounded LRU cache.

        Opening one costs ~0.3 ms (FreeType parses the face), and each is a FreeType
        face of its own: 0.7 MB for a Noto CJK face when opened, up to ~5 MB once it
        has rendered many glyphs (measured). `cache_size` trades memory for speed:
        a renderer process holds ~0.9 GB at 128, ~1.5 GB at 256 (measured over 5,000
        samples); renderers snap sizes to `SIZE_LADDER` so the cache keeps hitting.
        """
        key = (face.path, face.index, size)
        font = self._fonts.get(key)
        if font is None:
            font = self._fonts[key] = open_font(face.path, face.index, size)
            if len(self._fonts) > self.cache_size:
                self._fonts.popitem(last=False)
        else:
            self._fonts.move_to_end(key)
        return font

    @classmethod
    def discover(
        cls,
        *,
        dirs: Sequence[str] = (),
        use_fontconfig: bool = True,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        cache_size: int = 128,
    ) -> "FontRegistry":
        """Faces from fontconfig and folders, filtered by family-name regexes."""
        faces: list[FontFace] = []
        if use_fontconfig:
            faces += _fontconfig_faces()
        for folder in dirs:
            faces += _folder_faces(Path(folder).expanduser())
        if include:
            patterns = [re.compile(p) for p in include]
            faces = [f for f in faces if any(p.search(f.family) for p in patterns)]
        if exclude:
            patterns = [re.compile(p) for p in exclude]
            faces = [f for f in faces if not any(p.search(f.family) for p in patterns)]
        return cls(faces, cache_size=cache_size)

    def covers(self, face: FontFace, text: str) -> bool:
        tables = face_tables(face.path, face.index)
        return all(tables.covers(ord(ch)) or ch.isspace() for ch in text)

    def missing(self, face: FontFace, text: str) -> list[str]:
        tables = face_tables(face.path, face.index)
        return [ch for ch in text if not ch.isspace() and not tables.covers(ord(ch))]

    def preference_groups(self, language: str) -> list[list[FontFace]]:
        """Faces in groups tried in order: the language's region faces, then the rest."""
        groups = self._groups.get(language)
        if groups is None:
            tags = [t for lang in language.split("+") for t in LANGUAGE_REGION_TAGS.get(lang, ())]
            if tags:
                pattern = re.compile(r"\b(" + "|".join(map(re.escape, tags)) + r")\b")
                preferred = [f for f in self.faces if pattern.search(f.family)]
                rest = [f for f in self.faces if not pattern.search(f.family)]
                groups = [g for g in (preferred, rest) if g]
            else:
                # No region preference (Latin text): regional twins of one CJK family
                # (Noto Sans CJK SC/TC/HK/JP/KR) share their Latin glyphs, so one region
                # per family stands for all: the same variety with a fifth of the faces,
                # which keeps the font cache hitting. The others stay as a fallback.
                first_of_family: dict[tuple[str, str, int], FontFace] = {}
                for face in self.faces:
                    base = _REGION_SUFFIX.sub("", face.family)
                    first_of_family.setdefault((base, face.style, face.weight), face)
                preferred = list(first_of_family.values())
                rest = [f for f in self.faces if f not in preferred]
                groups = [g for g in (preferred, rest) if g]
            self._groups[language] = groups
        return groups

    def choose(self, text: str, language: str, rng, *, bold: bool | None = None) -> FontFace:
        """A random face that covers `text`, preferring the language's region faces.

        `rng` is a `random.Random`. `bold` restricts the weight when faces of that
        weight cover the text (a preference, not a requirement). Raises
        `MissingGlyphsError` naming the characters no face covers.
        """
        for group in self.preference_groups(language):
            if bold is not None:
                weighted = [f for f in group if f.bold == bold]
                group = weighted + [f for f in group if f.bold != bold]
                split = len(weighted)
            else:
                split = len(group)
            for subgroup in (group[:split], group[split:]):
                pool = list(subgroup)
                rng.shuffle(pool)
                for face in pool:
                    if self.covers(face, text):
                        return face
        missing = set.intersection(*(set(self.missing(f, text)) for f in self.faces))
        if missing:
            raise MissingGlyphsError(text, missing, "in this job's font set")
        # Every character is covered somewhere, but by no single face.
        best = min(self.faces, key=lambda f: len(self.missing(f, text)))
        raise MissingGlyphsError(text, self.missing(best, text), f"that also covers the rest (closest: {best.name})")

    def union_covers(self, text: str) -> bool:
        """Whether some face covers every character (used to screen user corpora)."""
        return any(self.covers(face, text) for face in self.faces)
