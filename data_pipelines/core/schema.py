"""The shard sample schema: one module that every writer and reader imports.

A sample in a WebDataset shard is a group of tar members sharing one key:

    <key>.jpg | <key>.png   the target image (RGB)
    <key>.txt               the caption (UTF-8), quoting the rendered text exactly
    <key>.json              `SampleMeta` as JSON (see below)

Edit pairs add `<key>.src.jpg` (the source image) and `<key>.instruction.txt`, and
their metadata's `extra["edit"]` holds the edit type, instruction, changed region and
the source's lines; precomputed samples (later) add latents and encoder outputs. The
three members above are present in every sample.

Multi-image edits (up to `MAX_SOURCES` sources, "Picture 1..3" / "图1..3" in the
instruction) add `<key>.src2.jpg` and `<key>.src3.jpg` (`EXTRA_SOURCE_PREFIXES`), all
sources the target's pixel size; `extra["edit"]["num_sources"]` counts the sources,
`<key>.src.jpg` included (readers treat a missing value as 1).

Text classes are computed from the per-line metadata by `classify_text`, once, when
the sample is written; the curriculum filters on the stored value. Thresholds are
the module constants below, documented in docs/data.md.
"""

from __future__ import annotations

import enum
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 1

# Tar member extensions.
IMAGE_EXTENSIONS = ("jpg", "png")
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
# Edit and reconstruction pairs add the source image and the instruction; the target
# image, caption and metadata keep the members above (`<key>.src.jpg` is read by
# WebDataset as field "src.jpg").
SOURCE_IMAGE_PREFIX = "src"
INSTRUCTION_EXTENSION = "instruction.txt"
# A multi-image edit's second and third sources ("Picture 2", "Picture 3"): members
# `<key>.src2.jpg`, `<key>.src3.jpg`, present as `extra["edit"]["num_sources"]` says.
EXTRA_SOURCE_PREFIXES = ("src2", "src3")
MAX_SOURCES = 1 + len(EXTRA_SOURCE_PREFIXES)  # 3: what Qwen-Image-Edit-2509/2511 take

# Keys become tar member names `<key>.<ext>`: WebDataset splits a member name at its
# first dot, so a key must not contain one. A key is one or more segments of ASCII
# letters, digits, '_' and '-' joined by single '/': no leading '/' (absolute), no
# empty segment, no '.' or '..' (path traversal), no unicode (names that normalise
# differently on different file systems), so a shard extracted by a user never
# writes outside the folder it is extracted into.
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*$")
MAX_KEY_LENGTH = 200


def valid_key(key: str) -> bool:
    """Whether `key` is safe as a tar member name prefix (see `_KEY_RE`)."""
    return isinstance(key, str) and len(key) <= MAX_KEY_LENGTH and _KEY_RE.fullmatch(key) is not None


class TextClass(str, enum.Enum):
    """How much text an image holds; the curriculum's unit of filtering."""

    NONE = "none"  # no legible text
    SIMPLE = "simple"  # one short horizontal line in one language
    COMPLEX = "complex"  # anything else with text


class Source(str, enum.Enum):
    SYNTHETIC = "synthetic"
    DESIGN = "design"
    NATURAL = "natural"
    EDIT = "edit"


class Task(str, enum.Enum):
    """What a training sample teaches; configs (task_mix), logs and checkpoints hold the values."""

    T2I = "t2i"  # text to image: caption -> target
    TI2I = "ti2i"  # editing: instruction + source -> target (an edit pair)
    I2I = "i2i"  # reconstruction: instruction + source -> the same image (a reconstruct pair)

    # The value wherever a task becomes text (seeds, metric names), as `enum.StrEnum` on 3.11+.
    __str__ = str.__str__
    __format__ = str.__format__


class Direction(str, enum.Enum):
    HORIZONTAL = "horizontal"
    VERTICAL = "vertical"  # columns top to bottom, placed right to left


# BCP 47 tags for the languages the renderer knows. A line that mixes languages
# carries the sorted tags joined by "+", e.g. "en+zh-Hans".
LANGUAGES = ("zh-Hans", "zh-Hant", "en", "ja", "ko")
MIXED_SEPARATOR = "+"

# --- text-class thresholds (the only place they live) --------------------------
# A `simple` sample has exactly one line, horizontal, in one language, with at most
# this many non-whitespace characters. 16 covers a short Chinese slogan
# ("新品上市限时优惠") or two to three English words ("Grand Opening Sale").
SIMPLE_MAX_CHARS = 16
# Lines with fewer non-whitespace characters than this do not count as text (an OCR
# hit of one stray glyph on a photo is not "text in the image").
MIN_TEXT_CHARS = 1


def count_chars(text: str) -> int:
    """Number of non-whitespace code points: the unit of every length threshold."""
    return sum(1 for ch in text if not ch.isspace())


def split_language(language: str) -> list[str]:
    """'en+zh-Hans' -> ['en', 'zh-Hans']."""
    return [part for part in language.split(MIXED_SEPARATOR) if part]


def join_languages(languages: Iterable[str]) -> str:
    """The line-level tag for a set of languages: sorted, '+'-joined."""
    return MIXED_SEPARATOR.join(sorted(set(languages)))


def script_languages(text: str) -> list[str]:
    """Best-effort languages of a string from its Unicode scripts.

    Used where nobody told us the language (design data, OCR output). Han characters
    count as Japanese when kana are present, else as Chinese (simplified unless the
    caller knows better). Digits and punctuation say nothing.
    """
    found: set[str] = set()
    has_kana = False
    has_han = False
    for ch in text:
        cp = ord(ch)
        if 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF:
            has_kana = True
        elif 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF:
            has_han = True
        elif 0xAC00 <= cp <= 0xD7A3 or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F:
            found.add("ko")
        elif ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
            found.add("en")
    if has_kana:
        found.add("ja")
    elif has_han:
        found.add("zh-Hans")
    return sorted(found)


@dataclass
class LineMeta:
    """One rendered line (or one vertical column) of text.

    `polygon` is four [x, y] points in pixels of the stored image, clockwise from the
    top-left corner of the text as read; it encloses the line's ink.
    """

    text: str
    language: str
    polygon: list[list[float]]
    direction: str = Direction.HORIZONTAL.value
    font: str = ""  # font file name, with "#<face index>" for collections
    font_size: int = 0  # pixels (em size)
    role: str = "body"  # title | subtitle | body | list_item | label
    ocr_text: str | None = None  # what OCR read back, when verification ran
    ocr_score: float | None = None  # 1 - normalised edit distance to `text`

    def validate(self, width: int, height: int) -> None:
        if len(self.polygon) != 4 or any(len(p) != 2 for p in self.polygon):
            raise ValueError(f"line {self.text!r}: polygon must be 4 [x, y] points, got {self.polygon}")
        for x, y in self.polygon:
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"line {self.text!r}: polygon point ({x}, {y}) outside {width}x{height}")
        if self.direction not in (d.value for d in Direction):
            raise ValueError(f"line {self.text!r}: unknown direction {self.direction!r}")
        for lang in split_language(self.language):
            if lang not in LANGUAGES:
                raise ValueError(f"line {self.text!r}: unknown language {lang!r}; known: {LANGUAGES}")


@dataclass
class SampleMeta:
    """The JSON member of every sample."""

    key: str
    source: str
    width: int
    height: int
    text_class: str
    languages: list[str]
    lines: list[LineMeta] = field(default_factory=list)
    layout: str = ""  # horizontal | vertical | wrap | none | ... (what the generator did)
    format: str = ""  # title | paragraph | list | composition | ...
    background: str = ""  # solid | gradient | texture | photo | ...
    seed: int | None = None
    ocr: dict[str, Any] | None = None  # {"engine":..., "mode":..., "score":...} when verified
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        if not valid_key(self.key):
            raise ValueError(f"sample key {self.key!r}: use segments of ASCII letters, digits, '_' and '-' joined "
                             f"by single '/' (no leading '/', no dots), at most {MAX_KEY_LENGTH} characters")
        if not (_is_int(self.width) and _is_int(self.height) and self.width > 0 and self.height > 0):
            raise ValueError(f"sample {self.key}: size {self.width!r}x{self.height!r} is not two positive integers")
        if self.source not in (s.value for s in Source):
            raise ValueError(f"sample {self.key}: unknown source {self.source!r}")
        if self.text_class not in (c.value for c in TextClass):
            raise ValueError(f"sample {self.key}: unknown text class {self.text_class!r}")
        for line in self.lines:
            line.validate(self.width, self.height)
        expected = classify_text(self.lines).value
        if expected != self.text_class:
            raise ValueError(f"sample {self.key}: text_class {self.text_class!r} but its lines say {expected!r}")

    def to_dict(self) -> dict[str, Any]:
        # Shallow per-field copy: dataclasses.asdict deep-copies every polygon point,
        # which was a tenth of the renderer's time.
        d = dict(self.__dict__)
        d["lines"] = [dict(line.__dict__) for line in self.lines]
        return d

    def to_json(self) -> str:
        # sort_keys + fixed separators: the same sample always encodes to the same
        # bytes, which the byte-identical-shards guarantee relies on.
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> "SampleMeta":
        """Parse and type-check; anything malformed (not JSON, not an object, a required
        field missing, a field of the wrong type, an unknown field) is a ValueError."""
        obj = json.loads(data) if isinstance(data, (str, bytes, bytearray)) else data
        if not isinstance(obj, dict):
            raise ValueError(f"sample metadata must be a JSON object, got {type(obj).__name__}")
        obj = dict(obj)
        version = obj.get("schema_version", SCHEMA_VERSION)
        if not _is_int(version):
            raise ValueError(f"sample metadata: schema_version = {version!r} is not an integer")
        if version > SCHEMA_VERSION:
            raise ValueError(f"sample schema version {version} is newer than this code ({SCHEMA_VERSION})")
        _check_fields("sample metadata", obj, _META_FIELDS)
        lines = obj.get("lines", [])
        for i, line in enumerate(lines):
            if not isinstance(line, dict):
                raise ValueError(f"sample metadata: lines[{i}] is a {type(line).__name__}, not an object")
            _check_fields(f"sample metadata lines[{i}]", line, _LINE_FIELDS)
            polygon = line["polygon"]
            if not all(isinstance(p, list) and len(p) == 2 and all(_is_number(c) for c in p) for p in polygon):
                raise ValueError(f"sample metadata lines[{i}]: polygon must be a list of [x, y] numbers")
        obj["lines"] = [LineMeta(**line) for line in lines]
        return cls(**obj)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field -> (required, check, what it must be): from_json's type check, kept next to the
# dataclasses it mirrors.
_OPT = False
_REQ = True
_META_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "key": (_REQ, lambda v: isinstance(v, str), "a string"),
    "source": (_REQ, lambda v: isinstance(v, str), "a string"),
    "width": (_REQ, _is_int, "an integer"),
    "height": (_REQ, _is_int, "an integer"),
    "text_class": (_REQ, lambda v: isinstance(v, str), "a string"),
    "languages": (_REQ, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "lines": (_OPT, lambda v: isinstance(v, list), "a list"),
    "layout": (_OPT, lambda v: isinstance(v, str), "a string"),
    "format": (_OPT, lambda v: isinstance(v, str), "a string"),
    "background": (_OPT, lambda v: isinstance(v, str), "a string"),
    "seed": (_OPT, lambda v: v is None or _is_int(v), "an integer or null"),
    "ocr": (_OPT, lambda v: v is None or isinstance(v, dict), "an object or null"),
    "extra": (_OPT, lambda v: isinstance(v, dict), "an object"),
    "schema_version": (_OPT, _is_int, "an integer"),
}
_LINE_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "text": (_REQ, lambda v: isinstance(v, str), "a string"),
    "language": (_REQ, lambda v: isinstance(v, str), "a string"),
    "polygon": (_REQ, lambda v: isinstance(v, list), "a list of [x, y] points"),
    "direction": (_OPT, lambda v: isinstance(v, str), "a string"),
    "font": (_OPT, lambda v: isinstance(v, str), "a string"),
    "font_size": (_OPT, _is_int, "an integer"),
    "role": (_OPT, lambda v: isinstance(v, str), "a string"),
    "ocr_text": (_OPT, lambda v: v is None or isinstance(v, str), "a string or null"),
    "ocr_score": (_OPT, lambda v: v is None or _is_number(v), "a number or null"),
}


def _check_fields(where: str, obj: dict[str, Any], spec: dict[str, tuple[bool, Any, str]]) -> None:
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    for name, (required, check, what) in spec.items():
        if name not in obj:
            if required:
                raise ValueError(f"{where}: required field {name!r} is missing")
            continue
        if not check(obj[name]):
            raise ValueError(f"{where}: {name} = {obj[name]!r:.80} is not {what}")


def classify_text(lines: Sequence[LineMeta]) -> TextClass:
    """The text class of an image from its lines (module thresholds above)."""
    text_lines = [line for line in lines if count_chars(line.text) >= MIN_TEXT_CHARS]
    if not text_lines:
        return TextClass.NONE
    if len(text_lines) > 1:
        return TextClass.COMPLEX
    (line,) = text_lines
    if (
        line.direction == Direction.HORIZONTAL.value
        and len(split_language(line.language)) <= 1
        and count_chars(line.text) <= SIMPLE_MAX_CHARS
    ):
        return TextClass.SIMPLE
    return TextClass.COMPLEX


def sample_languages(lines: Sequence[LineMeta]) -> list[str]:
    """Sorted union of the languages of the lines."""
    return sorted({lang for line in lines for lang in split_language(line.language)})
