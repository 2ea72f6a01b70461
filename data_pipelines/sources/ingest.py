"""Ingest of existing images (design data, natural images) into the shard schema.

Input formats (`IngestConfig.format`):

    folder      every image (.jpg .jpeg .png .webp .bmp, any case) under `path`,
                recursively, sorted by relative path. Optional side files with the
                image's stem: `<stem>.txt` (the caption, UTF-8) and/or `<stem>.json`
                ({"caption": ..., "lines": [LINE, ...]}, both optional).
    jsonl       one object a line: {"image": path, "caption": ..., "lines": [LINE, ...]};
                relative image paths resolve against `image_root` (default: the
                manifest's folder); blank lines are ignored, malformed ones skipped.
    webdataset  img2dataset output: uncompressed tar shards of `<key>.jpg|png|webp`,
                `<key>.txt` (caption) and `<key>.json` (any fields, perhaps "caption");
                `path` is a folder, one .tar, a glob, or a brace pattern
                ("shards/{00000..00099}.tar").
    anyword     AnyWord-3M / MARIO-10M annotations: a .json file
                    {"data_root": "imgs", "data_list": [{"img_name": ..., "caption": ...,
                     "annotations": [{"polygon": [[x, y], ...], "text": ..., "language":
                     "Chinese" | "Latin" | ..., "valid": true}, ...]}, ...]}
                or a .jsonl of data_list items.
    parquet     Parquet tables, one row an item (Hugging Face datasets, TextAtlas5M, ...):
                `path` is one .parquet file, a folder (every *.parquet under it,
                recursively, sorted by relative path) or a glob. Columns (settable):
                `image_column` ("image") holds the image as bytes, as the Hugging Face
                Image feature's struct {bytes, path} (bytes preferred; path read when
                bytes are null), or as a path string; paths resolve against
                `image_root` (default: the parquet file's folder). `caption_column`
                ("caption"; null: every caption from `caption_template`) holds the
                caption; a null or blank one skips the row ("NoCaption"), a null image
                cell too ("NoImage"). `lines_column` (none by default) holds LINE
                records (or AnyWord annotations), as a list of structs or a JSON string.
                Rows are read row group by row group through
                `ParquetFile.iter_batches`, only those columns, a shard reading just
                the row groups its rows lie in; the listing is (file, rows per row
                group) from the footers, no data. A file whose footer cannot be read
                stops the listing with an error naming it; a row group that fails to
                decode later skips its rows ("BadParquet").

    LINE = {"text": str, "polygon": [[x, y] x 4] | [[x, y] x n] | [x0, y0, x1, y1],
            "language": BCP 47 tag or AnyWord name (optional),
            "direction": "horizontal" | "vertical" (optional; else from the box's aspect)}

What a sample gets:
- the image: the original bytes when the file is an RGB JPEG or PNG within `max_side`
  (no generation loss, and the bytes stay traceable to the source); otherwise it is
  decoded, EXIF-rotated, alpha-composited on white, downscaled to `max_side` and
  re-encoded (PNG when the source was PNG or had alpha, since UI and slide graphics
  blur under JPEG; else JPEG quality 95). The tar member's extension is that of the
  bytes, never the input file's name.
- lines: given boxes are scaled with the image, clamped into it and used as-is;
  without boxes, rapidocr's detector and recogniser supply them (`ocr_boxes`).
  `extra["boxes_from"]` says which: "annotation", "ocr", or "none" (no boxes and
  OCR off: the text class is then unknown, not "no text").
- caption: the item's own, else `caption_template`.

Determinism: items are listed in a fixed order (sorted paths; manifest order for
JSONL / AnyWord; sorted shards and keys for tar input; sorted files, then row order,
for parquet), shard i holds items
[i*n, (i+1)*n) and its samples are keyed `<source>_<shard>_<position>`; kept images
are the input bytes and re-encoded ones use fixed encoder options, so reruns give
byte-identical shards (OCR boxes: on the same onnxruntime build). The resume
fingerprint covers the config and the item listing, so a rerun over a changed input
is refused instead of mixing two listings.

Bad items never stop the job: unreadable, truncated and too-small images, missing
files and malformed records are skipped through `tally.skip` and listed in the
manifest with their reason ("UnidentifiedImageError: cannot identify image file",
"TooSmall: 40x30 < 64", "BadJSON: ...", "Oversized: header says 30000x30000 >
max_image_pixels=67108864": a decompression bomb, refused before decoding). Input
names (file names, tar member names, JSONL image paths) are only read, never used to
write: output samples are keyed `<source>_<shard>_<position>` and written into
`out_dir` only; a tar member that is not a regular file (link, device, folder) is
ignored.
"""

from __future__ import annotations

import bisect
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image, ImageFile, ImageOps

from data_pipelines.core.sharded import JobSettings, Produced, ShardedJob, Tally, run_sharded
from data_pipelines.core.ocr import OcrEngine
from data_pipelines.core.schema import (
    CAPTION_EXTENSION,
    LANGUAGES,
    META_EXTENSION,
    Direction,
    LineMeta,
    SampleMeta,
    Source,
    classify_text,
    count_chars,
    join_languages,
    sample_languages,
    script_languages,
    split_language,
)
from data_pipelines.core.shards import encode_image
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, split_member_name

log = logging.getLogger(__name__)

FORMATS = ("folder", "jsonl", "webdataset", "anyword", "parquet")
SOURCES = (Source.DESIGN.value, Source.NATURAL.value)
INPUT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Tar members that hold the image of an img2dataset sample, in order of preference.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
JPEG_QUALITY = 95
# Parquet rows decoded at a time (only the needed columns): bounds memory to a few
# dozen images whatever the row group size.
PARQUET_BATCH_ROWS = 64
# The parquet columns' defaults; the fingerprint leaves out settings at their default,
# so outputs made before these settings existed keep theirs.
PARQUET_COLUMN_DEFAULTS = {"image_column": "image", "caption_column": "caption", "lines_column": None}
# AnyWord-3M / MARIO-10M language names -> the schema's BCP 47 tags. Other names fall
# back to the scripts of the text.
LANGUAGE_NAMES = {"chinese": "zh-Hans", "latin": "en", "english": "en", "japanese": "ja", "korean": "ko"}
# A box at least this many times taller than wide, holding two or more characters,
# is a vertical column (given lines without a direction, OCR boxes).
VERTICAL_ASPECT = 2.0


@dataclass
class IngestConfig:
    format: str
    """folder | jsonl | webdataset | anyword | parquet (see the module docstring for each layout)."""
    path: str
    """folder: the image folder; jsonl: the .jsonl manifest; webdataset: a folder, .tar,
    glob or brace pattern of tar shards; anyword: the annotation .json or .jsonl;
    parquet: a .parquet file, a folder of them (searched recursively) or a glob."""
    samples_per_shard: int = 1000
    """Input items per output shard (skipped items leave their shard short)."""
    min_side: int = 64
    """Images whose shorter side is below this many pixels are skipped ("TooSmall")."""
    max_side: int = 4096
    """Images whose longer side exceeds this are downscaled to it (and re-encoded)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images whose header claims more pixels (width x height) are skipped ("Oversized")
    before they are decoded: decompression bombs. Default 8192x8192 (64 MP)."""
    ocr_boxes: bool = True
    """When an item has no text boxes, rapidocr detection + recognition supplies them
    (~0.65 s per 512² image on one core: the slow part of natural-image ingest)."""
    ocr_min_score: float = 0.5
    """OCR detections with a recogniser confidence below this are ignored."""
    caption_template: str = "{stem}"
    """Caption for items without one. Fields: {stem} (the file stem, or tar key, with _
    and - as spaces) and {source} (design | natural)."""
    image_root: str | None = None
    """jsonl / anyword / parquet: folder that relative image paths resolve against
    (default: an AnyWord file's data_root, else the manifest's or parquet file's folder)."""
    image_column: str = "image"
    """parquet: the image column: bytes, a {bytes, path} struct (Hugging Face Image
    feature) or a path string."""
    caption_column: str | None = "caption"
    """parquet: the caption column (a string column); rows whose caption is null or
    blank are skipped ("NoCaption"). null: no caption column, `caption_template` for all."""
    lines_column: str | None = None
    """parquet: a column of LINE records (or AnyWord annotations): a list of structs or
    a JSON string of a list. null: no boxes given (OCR supplies them, see ocr_boxes)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format = {self.format!r}; use one of {FORMATS}")
        if not self.path:
            raise ValueError("path is empty: set path to the folder, manifest or shards to ingest")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard = {self.samples_per_shard} must be >= 1")
        if self.min_side < 1:
            raise ValueError(f"min_side = {self.min_side} must be >= 1")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side = {self.max_side} must be >= min_side = {self.min_side}")
        if self.max_image_pixels < self.min_side ** 2:
            raise ValueError(f"max_image_pixels = {self.max_image_pixels} must be >= min_side**2 = {self.min_side ** 2} "
                             f"(default {MAX_IMAGE_PIXELS})")
        if not 0 <= self.ocr_min_score <= 1:
            raise ValueError(f"ocr_min_score = {self.ocr_min_score} must lie in [0, 1]")
        try:
            self.caption_template.format(stem="stem", source="design")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"caption_template = {self.caption_template!r} does not format ({type(exc).__name__}: {exc}); "
                "its only fields are {stem} and {source}"
            ) from None
        if self.image_root is not None and self.format in ("folder", "webdataset"):
            warnings.warn(f"image_root is ignored for format={self.format!r} (it applies to jsonl, anyword and parquet)",
                          stacklevel=2)
        if not isinstance(self.image_column, str) or not self.image_column:
            raise ValueError(f"image_column = {self.image_column!r} must be a non-empty column name")
        for name in ("caption_column", "lines_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} = {value!r} must be a non-empty column name or null")
        named = [c for c in (self.image_column, self.caption_column, self.lines_column) if c is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"image_column, caption_column and lines_column name the same column ({named}); "
                             "each needs its own")
        changed = [k for k, v in PARQUET_COLUMN_DEFAULTS.items() if getattr(self, k) != v]
        if changed and self.format != "parquet":
            warnings.warn(f"{', '.join(changed)} ignored for format={self.format!r} (they apply to parquet)", stacklevel=2)


# --- listing -----------------------------------------------------------------------


@dataclass
class Item:
    """One input image as listed; what it points at is read when its shard is produced."""

    origin: str
    """Names the item in skip reports: the image path, "<manifest>:<line>" (jsonl and
    anyword .jsonl, 1-based), "<manifest>:<index>" (anyword .json), "<shard>.tar:<key>"
    or "<file>.parquet:<row>" (0-based row of the file)."""
    path: str
    """The file to read: the image (folder), the manifest (jsonl, anyword), the tar shard."""
    offset: int = 0
    """jsonl / anyword .jsonl: byte offset of the item's line; parquet: the row in its file."""
    key: str = ""
    """webdataset: the sample's key in its tar shard."""
    members: tuple[tuple[str, int, int], ...] = ()
    """webdataset: (extension, data offset, size) of each tar member of the key."""
    record: Mapping[str, Any] | None = None
    """anyword .json: the data_list entry (parsed once, when listing)."""
    root: str = ""
    """jsonl / anyword: the folder relative image paths resolve against."""


def list_items(config: IngestConfig) -> Sequence[Item]:
    """The input items in their fixed order (the same on every node and process).

    A list, except for parquet: a `ParquetListing` (rows are counted, not listed)."""
    if config.format == "parquet":
        return list_parquet(config)
    if config.format == "folder":
        return list_folder(config.path)
    if config.format == "jsonl":
        return list_jsonl(config.path, image_root=config.image_root)
    if config.format == "webdataset":
        return list_webdataset(config.path)
    return list_anyword(config.path, image_root=config.image_root)


def list_folder(path: str) -> list[Item]:
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path = {path!r} is not a folder; format=folder needs a folder of images")
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.splitext(name)[1].lower() in INPUT_IMAGE_SUFFIXES:
                found.append(Path(dirpath, name))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return [Item(origin=str(p), path=str(p)) for p in found]


def list_jsonl(path: str, *, image_root: str | None) -> list[Item]:
    """One item per non-blank line, parsed only when produced (workers hold offsets, not records)."""
    manifest = Path(path)
    if not manifest.is_file():
        raise ValueError(f"path = {path!r} is not a file; this format needs a .jsonl manifest")
    root = image_root if image_root is not None else str(manifest.parent)
    items = []
    offset = 0
    with open(manifest, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                items.append(Item(origin=f"{path}:{lineno}", path=path, offset=offset, root=root))
            offset += len(line)
    return items


def list_webdataset(pattern: str) -> list[Item]:
    """Items of img2dataset tar shards, from the tar headers only (no image bytes are read).

    Members are later read by offset, so an output shard reads just its own items
    however the input shards are cut.
    """
    base = Path(pattern)
    if base.is_dir():
        shards = sorted(base.glob("*.tar"))
    else:
        import braceexpand  # a webdataset dependency

        shards = sorted({Path(p) for expanded in braceexpand.braceexpand(pattern) for p in glob.glob(expanded)})
    if not shards:
        raise ValueError(f"path = {pattern!r}: no .tar shards found; give a folder, a .tar file, a glob or a brace pattern")
    items = []
    for shard in shards:
        by_key: dict[str, list[tuple[str, int, int]]] = {}
        try:
            # "r:" refuses compressed tars: their members cannot be read by offset.
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    # Regular members only: links and devices are never followed. Names are
                    # only read (every output sample is renamed `<source>_<shard>_<pos>`),
                    # so an odd or hostile name cannot place a file anywhere.
                    if member.isreg():
                        # Split as iter_tar_samples and WebDataset do: at the first dot of the base name.
                        key, ext = split_member_name(member.name)
                        if key is not None:
                            by_key.setdefault(key, []).append((ext, member.offset_data, member.size))
        except tarfile.ReadError as exc:
            if not by_key:
                raise ValueError(f"{shard}: not a readable uncompressed tar ({exc}); webdataset input must be plain .tar shards") from None
            log.warning("%s: %s; keeping the %d keys listed before it", shard, exc, len(by_key))
        for key in sorted(by_key):
            members = tuple(by_key[key])
            if any(ext.lower() in TAR_IMAGE_EXTENSIONS for ext, _, _ in members):
                items.append(Item(origin=f"{shard}:{key}", path=str(shard), key=key, members=members))
    return items


def list_anyword(path: str, *, image_root: str | None) -> list[Item]:
    manifest = Path(path)
    if manifest.suffix == ".jsonl":
        return list_jsonl(path, image_root=image_root)
    if not manifest.is_file():
        raise ValueError(f"path = {path!r} is not a file; format=anyword needs an annotation .json or .jsonl")
    try:
        data = json.loads(manifest.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"path = {path!r} is not valid JSON ({exc}); anyword needs {{'data_list': [...]}} or a .jsonl") from None
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
        raise ValueError(f"path = {path!r}: expected an object with a 'data_list' list (AnyWord-3M layout)")
    if image_root is not None:
        root = image_root
    elif data.get("data_root"):
        root = str(manifest.parent / str(data["data_root"]))  # an absolute data_root replaces the folder
    else:
        root = str(manifest.parent)
    return [Item(origin=f"{path}:{i}", path=path, record=entry, root=root) for i, entry in enumerate(data["data_list"])]


@dataclass(frozen=True)
class ParquetListing(SequenceABC):
    """The rows of parquet files as a sequence of items, held as row counts only.

    `files` is ((path, rows of each row group), ...) in listing order; item k is the
    k-th row over all files. It pickles small (workers get it, not millions of items);
    the producer reads a shard's rows with `iter_rows`, row group by row group.
    """

    files: tuple[tuple[str, tuple[int, ...]], ...]
    root: str | None = None
    """image_root: relative image paths resolve against it, else against each file's folder."""

    @functools.cached_property
    def _starts(self) -> list[int]:
        """The global index of each file's first row, and the total at the end."""
        starts = [0]
        for _, groups in self.files:
            starts.append(starts[-1] + sum(groups))
        return starts

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = bisect.bisect_right(self._starts, index) - 1
        path = self.files[f][0]
        row = index - self._starts[f]
        return Item(origin=f"{path}:{row}", path=path, offset=row, root=self.folder(path))

    def folder(self, path: str) -> str:
        return self.root if self.root is not None else str(Path(path).parent)

    def digest(self) -> str:
        h = hashlib.sha256()
        for path, groups in self.files:
            h.update(f"{path}\t{','.join(map(str, groups))}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    def iter_rows(self, start: int, stop: int, columns: Sequence[str]) -> Iterator[tuple[str, str, int, dict[str, Any] | SkipItem]]:
        """(origin, file, row, {column: value}) for rows [start, stop), in order; a row of a
        row group that fails to decode comes as a SkipItem instead of its values."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        stop = min(stop, len(self))
        f = bisect.bisect_right(self._starts, start) - 1
        while start < stop and f < len(self.files):
            path, groups = self.files[f]
            base = self._starts[f]
            pf = None
            try:
                first = base
                for g, rows in enumerate(groups):
                    end = first + rows
                    if end <= start or rows == 0:
                        first = end
                        continue
                    if first >= stop:
                        break
                    lo, hi = max(start, first) - first, min(stop, end) - first  # rows of this group wanted
                    row = 0
                    try:
                        if pf is None:
                            pf = pq.ParquetFile(path)
                        # Only this row group and these columns, a batch at a time: never the whole file.
                        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g], columns=list(columns),
                                                     use_threads=False):
                            n = batch.num_rows
                            if row + n <= lo:  # rows before this shard's first: read past
                                row += n
                                continue
                            a, b = max(lo - row, 0), min(hi - row, n)
                            values = {c: batch.column(c).slice(a, b - a).to_pylist() for c in columns}
                            for k in range(b - a):
                                r = first - base + row + a + k
                                yield f"{path}:{r}", path, r, {c: values[c][k] for c in columns}
                            row += n
                            if row >= hi:
                                break
                        if row < hi:
                            raise OSError(f"row group {g} holds {row} of the {rows} rows its footer claims")
                    except (pa.ArrowException, OSError) as exc:
                        # A damaged row group: its remaining rows of this shard are skipped, counted.
                        reason = SkipItem(f"BadParquet: row group {g}: {describe(exc)}")
                        for r in range(first - base + max(lo, row), first - base + hi):
                            yield f"{path}:{r}", path, r, reason
                    first = end
            finally:
                if pf is not None:
                    pf.close()
            start = max(start, self._starts[f + 1])
            f += 1


def _parquet_files(pattern: str) -> list[Path]:
    base = Path(pattern)
    if base.is_dir():
        found = [Path(d, n) for d, _, names in os.walk(base) for n in names if n.endswith(".parquet")]
        return sorted(found, key=lambda p: p.relative_to(base).as_posix())
    if base.is_file():
        return [base]
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _image_column_type_ok(tp) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(tp):
        names = {tp.field(i).name for i in range(tp.num_fields)}
        return bool(names & {"bytes", "path"})
    return (pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_string(tp)
            or pa.types.is_large_string(tp) or pa.types.is_fixed_size_binary(tp)
            or getattr(pa.types, "is_binary_view", lambda t: False)(tp)
            or getattr(pa.types, "is_string_view", lambda t: False)(tp))


def list_parquet(config: IngestConfig) -> ParquetListing:
    """The row counts of every row group of every file, from the footers only (no data read).

    A file whose footer cannot be read, or that lacks a configured column, is an error
    naming it: a half-downloaded file must not silently shrink the listing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(config.path)
    if not files:
        raise ValueError(f"path = {config.path!r}: no .parquet files found; give a .parquet file, a folder or a glob")
    columns = {"image_column": config.image_column, "caption_column": config.caption_column,
               "lines_column": config.lines_column}
    listed = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable parquet file ({describe(exc)}); re-download it, or leave it out "
                             "of path (a glob or a folder without it)") from None
        try:
            schema = pf.schema_arrow
            for setting, name in columns.items():
                if name is not None and schema.get_field_index(name) < 0:
                    raise ValueError(f"{path}: no column {name!r} ({setting}); its columns: {', '.join(schema.names)}. "
                                     f"Set input.{setting} to the right one"
                                     + (" (or null to caption from caption_template)" if setting == "caption_column" else ""))
            tp = schema.field(config.image_column).type
            if not _image_column_type_ok(tp):
                raise ValueError(f"{path}: image_column {config.image_column!r} is {tp}; it must hold bytes, a "
                                 "{bytes, path} struct or path strings")
            meta = pf.metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        finally:
            pf.close()
        listed.append((str(path), groups))
    return ParquetListing(tuple(listed), root=config.image_root)


def items_digest(items: Sequence[Item]) -> str:
    """A hash of the listing: part of the resume fingerprint."""
    if isinstance(items, ParquetListing):
        return items.digest()
    h = hashlib.sha256()
    for item in items:
        h.update(item.origin.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]


# --- reading one item ----------------------------------------------------------------


class SkipItem(Exception):
    """An input that cannot become a sample; `reason` is "<Kind>: <detail>"."""

    def __init__(self, reason: str, item: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.item = item


@dataclass
class RawItem:
    """An item's bytes and annotations, before any decoding."""

    name: str
    """The image path or "<shard>.tar:<key>": names image problems in skip reports."""
    data: bytes
    stem: str
    """The template's {stem} before _ and - become spaces."""
    caption: str | None
    lines: list[Any] | None
    """Line records as given; None when the item has no boxes (OCR may supply them)."""
    extra: dict[str, Any] = field(default_factory=dict)


def describe(exc: BaseException) -> str:
    """One short, run-independent skip reason for an exception ("<Kind>: <message>")."""
    # Pillow puts the stream's repr (with a memory address) in some messages: drop it
    # so that two runs write the same statistics.
    text = re.sub(r"\s*<[^<>]*>", "", str(exc)).strip()
    message = text.splitlines()[0][:200] if text else ""
    kind = type(exc).__name__
    if isinstance(exc, OSError) and "truncated" in message.lower():
        kind = "Truncated"
    return f"{kind}: {message}" if message else kind


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SkipItem(describe(exc), str(path)) from None


def _json_object(data: bytes, where: str, kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SkipItem(f"{kind}: {exc}", where) from None
    if not isinstance(obj, dict):
        raise SkipItem(f"{kind}: expected a JSON object, got {type(obj).__name__}", where)
    return obj


def _caption(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SkipItem(f"BadRecord: caption is a {type(value).__name__}, not a string", where)
    return value.strip() or None


def _lines(value: Any, where: str) -> list[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SkipItem(f"BadRecord: lines/annotations is a {type(value).__name__}, not a list", where)
    return value


def _resolve(root: str, image: str) -> Path:
    p = Path(image)
    return p if p.is_absolute() else Path(root) / p


def load_folder_item(item: Item) -> RawItem:
    image = Path(item.path)
    data = _read_file(image)
    caption = lines = None
    txt = image.with_suffix(".txt")
    if txt.is_file():
        try:
            caption = _caption(txt.read_bytes().decode("utf-8"), str(txt))
        except UnicodeDecodeError as exc:
            raise SkipItem(f"BadSideFile: not UTF-8 ({exc.reason})", str(txt)) from None
    side = image.with_suffix(".json")
    if side.is_file():
        obj = _json_object(_read_file(side), str(side), "BadSideFile")
        caption = caption or _caption(obj.get("caption"), str(side))
        lines = _lines(obj.get("lines"), str(side))
    return RawItem(str(image), data, image.stem, caption, lines, {"origin": str(image)})


def _read_line(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline()


def load_jsonl_item(item: Item) -> RawItem:
    record = _json_object(_read_line(item.path, item.offset), item.origin, "BadJSON")
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise SkipItem("BadRecord: no 'image' path", item.origin)
    path = _resolve(item.root, image)
    caption = _caption(record.get("caption"), item.origin)
    lines = _lines(record.get("lines"), item.origin)
    return RawItem(str(path), _read_file(path), path.stem, caption, lines, {"origin": str(path)})


def load_anyword_item(item: Item) -> RawItem:
    if item.record is None:  # a .jsonl line
        record = _json_object(_read_line(item.path, item.offset), item.origin, "BadJSON")
    elif isinstance(item.record, Mapping):
        record = dict(item.record)
    else:
        raise SkipItem(f"BadRecord: data_list entry is a {type(item.record).__name__}, not an object", item.origin)
    name = record.get("img_name")
    if not isinstance(name, str) or not name:
        raise SkipItem("BadRecord: no 'img_name'", item.origin)
    path = _resolve(item.root, name)
    caption = _caption(record.get("caption"), item.origin)
    lines = _lines(record.get("annotations"), item.origin)
    return RawItem(str(path), _read_file(path), path.stem, caption, lines, {"origin": str(path)})


def load_webdataset_item(item: Item) -> RawItem:
    members = {ext: (offset, size) for ext, offset, size in item.members}
    key = item.key

    def read(ext: str) -> bytes:
        offset, size = members[ext]
        with open(item.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:  # a tar cut short by a killed download job
            raise SkipItem(f"Truncated: tar member {key}.{ext} holds {len(data)} of {size} bytes", item.origin)
        return data

    data = read(next(have for ext in TAR_IMAGE_EXTENSIONS for have in members if have.lower() == ext))
    caption = lines = None
    if "txt" in members:
        try:
            caption = _caption(read("txt").decode("utf-8"), item.origin)
        except UnicodeDecodeError as exc:
            raise SkipItem(f"BadSideFile: not UTF-8 ({exc.reason})", item.origin) from None
    extra: dict[str, Any] = {"origin": key, "shard": Path(item.path).name}
    if "json" in members:
        obj = _json_object(read("json"), item.origin, "BadSideFile")
        caption = caption or _caption(obj.get("caption"), item.origin)
        lines = _lines(obj.get("lines"), item.origin)
        if isinstance(obj.get("url"), str):
            extra["url"] = obj["url"]  # provenance: img2dataset's source URL
    return RawItem(item.origin, data, key, caption, lines, extra)


def parquet_columns(config: IngestConfig) -> list[str]:
    """The columns a parquet row is read with (no others are decoded)."""
    return [c for c in (config.image_column, config.caption_column, config.lines_column) if c is not None]


def load_parquet_row(config: IngestConfig, origin: str, path: str, row: int, values: Mapping[str, Any], root: str) -> RawItem:
    """A RawItem from one parquet row's values (`ParquetListing.iter_rows`)."""
    cell = values[config.image_column]
    data: bytes | None = None
    image_path: str | None = None
    if isinstance(cell, Mapping):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
        data = cell.get("bytes")
        image_path = cell.get("path") or None
    elif isinstance(cell, str):
        image_path = cell or None
    elif cell is not None:
        data = cell
    if data is None and image_path is None:
        raise SkipItem(f"NoImage: {config.image_column!r} is null", origin)
    extra: dict[str, Any] = {"origin": origin}
    stem = f"{Path(path).stem}_{row}"
    name = origin
    if image_path is not None:
        stem = Path(image_path).stem or stem
        extra["image_path"] = image_path  # provenance (the dataset's own file name)
    caption = None
    if config.caption_column is not None:
        caption = _caption(values[config.caption_column], origin)
        if caption is None:
            raise SkipItem(f"NoCaption: {config.caption_column!r} is null or blank", origin)
    lines = None
    if config.lines_column is not None:
        value = values[config.lines_column]
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SkipItem(f"BadRecord: {config.lines_column!r} is not JSON ({exc})", origin) from None
        lines = _lines(value, origin)
    if data is None:
        resolved = _resolve(root, image_path)
        name = str(resolved)
        data = _read_file(resolved)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise SkipItem(f"BadRecord: image bytes are a {type(data).__name__}", origin)
    return RawItem(name, bytes(data), stem, caption, lines, extra)


LOADERS = {
    "folder": load_folder_item,
    "jsonl": load_jsonl_item,
    "webdataset": load_webdataset_item,
    "anyword": load_anyword_item,
}


# --- the image -----------------------------------------------------------------------


@dataclass
class PreparedImage:
    data: bytes
    """The bytes to store: the input file's, or a re-encoding."""
    ext: str
    """jpg | png, matching `data`."""
    image: Image.Image
    """The RGB image as stored (what OCR reads and boxes refer to)."""
    scale: tuple[float, float]
    """Stored size over input size (x, y): boxes given on the input are scaled by it."""
    how: str
    """kept | reencoded | downscaled."""
    source_size: tuple[int, int]


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_rgb(im: Image.Image, alpha: bool) -> Image.Image:
    if alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im if im.mode == "RGB" else im.convert("RGB")


def prepare_image(data: bytes, *, min_side: int, max_side: int, max_pixels: int = MAX_IMAGE_PIXELS) -> PreparedImage:
    """Decode fully (corrupt and truncated files fail here, not in a training loader) and decide how to store.

    The header's size is checked against `max_pixels` before decoding (decompression bombs)."""
    if not data:
        raise SkipItem("EmptyFile: 0 bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would be kept; unset it")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its limit
        raise SkipItem(f"Oversized: {describe(exc)}") from None
    except Exception as exc:
        raise SkipItem(describe(exc)) from None
    if im.width * im.height > max_pixels:
        raise SkipItem(f"Oversized: header says {im.width}x{im.height} > max_image_pixels={max_pixels}")
    try:
        im.load()
        fmt = im.format
        # Cameras store rotation as an EXIF tag; readers that ignore it (WebDataset's
        # decoder does) would see the image on its side, so it is applied here.
        oriented = im.getexif().get(0x0112, 1) not in (1, None)
        if oriented:
            im = ImageOps.exif_transpose(im)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad files
        raise SkipItem(describe(exc)) from None
    w, h = im.size
    if min(w, h) < min_side:
        raise SkipItem(f"TooSmall: {w}x{h} < {min_side}")
    size = (w, h)
    if max(w, h) > max_side:
        factor = max_side / max(w, h)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        if min(size) < min_side:
            raise SkipItem(f"TooSmall: {w}x{h} -> {size[0]}x{size[1]} < {min_side} after downscaling to max_side")
    alpha = _has_alpha(im)
    if fmt in ("JPEG", "PNG") and size == (w, h) and not oriented and im.mode == "RGB" and not alpha:
        return PreparedImage(data, "jpg" if fmt == "JPEG" else "png", im, (1.0, 1.0), "kept", (w, h))
    rgb = _to_rgb(im, alpha)
    how = "reencoded"
    if size != (w, h):
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        how = "downscaled"
    ext = "png" if alpha or fmt == "PNG" else "jpg"
    return PreparedImage(encode_image(rgb, ext, JPEG_QUALITY), ext, rgb, (size[0] / w, size[1] / h), how, (w, h))


# --- lines ---------------------------------------------------------------------------


def parse_polygon(value: Any) -> list[list[float]] | None:
    """4 [x, y] points from [[x, y] x 4] (as-is), [[x, y] x n] or flat [x, y, ...] (bounding box), [x0, y0, x1, y1]."""
    try:
        if all(isinstance(v, (int, float)) for v in value):
            flat = [float(v) for v in value]
            if len(flat) == 4:
                x0, x1 = sorted(flat[0::2])
                y0, y1 = sorted(flat[1::2])
                return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            if len(flat) < 6 or len(flat) % 2:
                return None
            points = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
        else:
            points = []
            for p in value:
                if len(p) != 2:
                    return None
                points.append((float(p[0]), float(p[1])))
    except (TypeError, ValueError):
        return None
    if len(points) < 3 or not all(math.isfinite(c) for p in points for c in p):
        return None
    if len(points) == 4:
        return [[x, y] for x, y in points]
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    return [[min(xs), min(ys)], [max(xs), min(ys)], [max(xs), max(ys)], [min(xs), max(ys)]]


def fit_polygon(polygon: Sequence[Sequence[float]], *, width: int, height: int, scale: tuple[float, float] = (1.0, 1.0)) -> list[list[float]] | None:
    """Scale into the stored image, clamp into it; None when less than a pixel is left inside."""
    sx, sy = scale
    fitted = [[round(min(max(x * sx, 0.0), width), 2), round(min(max(y * sy, 0.0), height), 2)] for x, y in polygon]
    xs = [x for x, _ in fitted]
    ys = [y for _, y in fitted]
    if max(xs) - min(xs) < 1 or max(ys) - min(ys) < 1:
        return None
    return fitted


def infer_direction(polygon: Sequence[Sequence[float]], text: str) -> str:
    """Vertical when the box is much taller than wide and holds several characters.

    The axis-aligned box is used, not the point order: given polygons do not all
    start at the top-left corner.
    """
    xs = [p[0] for p in polygon]
    ys = [p[1] for p in polygon]
    tall = (max(ys) - min(ys)) > VERTICAL_ASPECT * (max(xs) - min(xs))
    return Direction.VERTICAL.value if tall and count_chars(text) >= 2 else Direction.HORIZONTAL.value


def line_language(given: Any, text: str) -> str | None:
    """The line's language tag: the annotation's (tag or AnyWord name), else the text's scripts.

    Digits and punctuation carry no script; an ASCII line of them ("2024", "50%") is
    set in Latin fonts, hence "en". Anything else without a known script (Arabic,
    Thai, ...) gives None: the schema has no tag for it.
    """
    if isinstance(given, str) and given.strip():
        name = LANGUAGE_NAMES.get(given.strip().lower())
        if name:
            return name
        parts = split_language(given.strip())
        if parts and all(part in LANGUAGES for part in parts):
            return join_languages(parts)
    found = script_languages(text)
    if found:
        return join_languages(found)
    if text.isascii() and count_chars(text):
        return "en"
    return None


def lines_from_records(
    records: Sequence[Any], *, width: int, height: int, scale: tuple[float, float], dropped: Counter
) -> list[LineMeta]:
    """LineMeta from given line / AnyWord annotation records; unusable ones are counted in `dropped`."""
    lines = []
    for rec in records:
        if not isinstance(rec, Mapping):
            dropped["not_an_object"] += 1
            continue
        if rec.get("valid", True) is False:
            dropped["marked_invalid"] += 1
            continue
        text = rec.get("text")
        if not isinstance(text, str) or not count_chars(text):
            dropped["empty_text"] += 1
            continue
        text = text.strip()
        polygon = parse_polygon(rec.get("polygon"))
        if polygon is None:
            dropped["bad_polygon"] += 1
            continue
        polygon = fit_polygon(polygon, width=width, height=height, scale=scale)
        if polygon is None:
            dropped["outside_image"] += 1
            continue
        language = line_language(rec.get("language"), text)
        if language is None:
            dropped["unknown_language"] += 1
            continue
        direction = rec.get("direction")
        if direction not in (d.value for d in Direction):
            direction = infer_direction(polygon, text)
        lines.append(LineMeta(text=text, language=language, polygon=polygon, direction=direction))
    return lines


def lines_from_ocr(
    detections: Sequence[tuple[Sequence[Sequence[float]], str, float]],
    *,
    width: int,
    height: int,
    min_score: float,
    dropped: Counter,
) -> tuple[list[LineMeta], list[float]]:
    """LineMeta (and their recogniser confidences) from `OcrEngine.detect_and_recognize` output."""
    lines, scores = [], []
    for box, text, score in detections:
        text = (text or "").strip()
        if score < min_score:
            dropped["ocr_low_score"] += 1
            continue
        if not count_chars(text):
            dropped["empty_text"] += 1
            continue
        polygon = parse_polygon(box)
        polygon = None if polygon is None else fit_polygon(polygon, width=width, height=height)
        if polygon is None:
            dropped["outside_image"] += 1
            continue
        # Only the scripts decide: a stray "1" or "." read off a photo is not text.
        found = script_languages(text)
        if not found:
            dropped["unknown_language"] += 1
            continue
        lines.append(LineMeta(text=text, language=join_languages(found), polygon=polygon, direction=infer_direction(polygon, text)))
        scores.append(round(float(score), 4))
    return lines, scores


def template_stem(stem: str) -> str:
    """'spring_sale-poster' -> 'spring sale poster'."""
    return " ".join(re.sub(r"[_\-]+", " ", stem).split())


# --- the producer ----------------------------------------------------------------------


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source = {source!r}; ingest writes one of {SOURCES}")


def _raise(exc: BaseException):
    raise exc


class IngestProducer:
    """Turns shard `index`'s slice of the item list into samples (see the module docstring).

    `items` is the listing from `list_items` (the runner passes it so that worker
    processes do not walk the input again); without it the producer lists the input
    itself, on first use. The OCR engine is built on first use, once per process.
    """

    def __init__(self, config: IngestConfig, source: str, *, items: Sequence[Item] | None = None):
        _check_source(source)
        self.config = config
        self.source = source
        self._items = items if items is None or isinstance(items, ParquetListing) else list(items)
        self._ocr: OcrEngine | None = None

    @property
    def items(self) -> Sequence[Item]:
        if self._items is None:
            self._items = list_items(self.config)
        return self._items

    @property
    def ocr(self) -> OcrEngine:
        if self._ocr is None:
            self._ocr = OcrEngine(threads=1)
        return self._ocr

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        n = self.config.samples_per_shard
        for j, (origin, load) in enumerate(self._loaders(index * n, (index + 1) * n)):
            # The key is the item's position, not a count of accepted samples: a key
            # always names the same input item, whatever else was skipped.
            key = f"{self.source}_{index:06d}_{j:06d}"
            try:
                yield self.sample_raw(load(), key, tally)
            except SkipItem as skip:
                tally.skip(skip.item or origin, skip.reason)

    def _loaders(self, start: int, stop: int) -> Iterator[tuple[str, Any]]:
        """(origin, a call giving the item's RawItem or raising SkipItem) for items [start, stop)."""
        items = self.items
        if isinstance(items, ParquetListing):
            config = self.config
            for origin, path, row, values in items.iter_rows(start, stop, parquet_columns(config)):
                if isinstance(values, SkipItem):
                    yield origin, functools.partial(_raise, values)
                else:
                    yield origin, functools.partial(load_parquet_row, config, origin, path, row, values, items.folder(path))
            return
        loader = LOADERS[self.config.format]
        for item in items[start:stop]:
            yield item.origin, functools.partial(loader, item)

    def sample(self, item: Item, key: str, tally: Tally) -> Produced:
        """One sample, or SkipItem. OCR failures propagate: a broken engine must stop the job.

        Not for parquet, whose rows are read a shard at a time (`produce`)."""
        if self.config.format not in LOADERS:
            raise TypeError(f"format={self.config.format!r} items are read a shard at a time: use produce()")
        return self.sample_raw(LOADERS[self.config.format](item), key, tally)

    def sample_raw(self, raw: RawItem, key: str, tally: Tally) -> Produced:
        """The sample of a loaded item, or SkipItem (see `sample`)."""
        config = self.config
        try:
            prepared = prepare_image(raw.data, min_side=config.min_side, max_side=config.max_side,
                                     max_pixels=config.max_image_pixels)
        except SkipItem as skip:
            raise SkipItem(skip.reason, raw.name) from None
        width, height = prepared.image.size
        dropped: Counter = Counter()
        extra = dict(raw.extra)
        if raw.lines is not None:
            lines = lines_from_records(raw.lines, width=width, height=height, scale=prepared.scale, dropped=dropped)
            extra["boxes_from"] = "annotation"
        elif config.ocr_boxes:
            detections = self.ocr.detect_and_recognize(prepared.image)
            lines, scores = lines_from_ocr(detections, width=width, height=height, min_score=config.ocr_min_score, dropped=dropped)
            extra["boxes_from"] = "ocr"
            extra["ocr_confidence"] = scores
        else:
            lines = []
            extra["boxes_from"] = "none"
        if dropped:
            extra["lines_dropped"] = dict(sorted(dropped.items()))
        if prepared.how != "kept":
            extra["source_size"] = list(prepared.source_size)
        if raw.caption:
            caption = raw.caption
            extra["caption_from"] = "item"
        else:
            caption = config.caption_template.format(stem=template_stem(raw.stem), source=self.source)
            extra["caption_from"] = "template"
        meta = SampleMeta(
            key=key,
            source=self.source,
            width=width,
            height=height,
            text_class=classify_text(lines).value,
            languages=sample_languages(lines),
            lines=lines,
            layout="",
            format=f"ingest:{config.format}",
            background="",
            extra=extra,
        )
        tally.add("image", prepared.how)
        tally.add("boxes_from", extra["boxes_from"])
        tally.add("caption_from", extra["caption_from"])
        for reason, count in dropped.items():
            tally.add("lines_dropped", reason, count)
        return Produced(
            key,
            {
                prepared.ext: prepared.data,
                CAPTION_EXTENSION: caption.encode("utf-8"),
                META_EXTENSION: meta.to_json().encode("utf-8"),
            },
            meta,
        )


def run_ingest(
    config: IngestConfig,
    *,
    source: str,
    out_dir: str,
    workers: int = 1,
    node_rank: int | None = None,
    num_nodes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resolved_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest `config.path` into `<out_dir>/<source>-NNNNNN.tar` shards; returns the runner's summary.

    Every node lists the input itself (the same order everywhere) and produces the
    shards `run_sharded` assigns it; the manifest is written once every shard exists.
    """
    _check_source(source)
    if workers < 1:
        raise ValueError(f"workers = {workers} must be >= 1")
    items = list_items(config)
    if not items:
        raise ValueError(f"path = {config.path!r}: no {config.format} items found; check path and format")
    num_shards = math.ceil(len(items) / config.samples_per_shard)
    ingest_settings = asdict(config)
    if config.max_image_pixels == MAX_IMAGE_PIXELS:  # only when changed: earlier outputs keep their fingerprint
        ingest_settings.pop("max_image_pixels")
    for name, default in PARQUET_COLUMN_DEFAULTS.items():  # the same: settings added with format=parquet
        if ingest_settings[name] == default:
            ingest_settings.pop(name)
    settings = {"source": source, "ingest": ingest_settings, "num_items": len(items), "items_digest": items_digest(items)}
    job = ShardedJob(
        out_dir=out_dir,
        prefix=source,
        num_shards=num_shards,
        settings=settings,
        make_producer=functools.partial(IngestProducer, config, source, items=items),
        workers=workers,
        node_rank=node_rank,
        num_nodes=num_nodes,
        overwrite=overwrite,
        progress=progress,
        samples_per_shard=config.samples_per_shard,
        manifest_extra={"source": source, "ingest": asdict(config), "config": resolved_config, "num_items": len(items)},
    )
    return run_sharded(job, IngestProducer(config, source, items=items))


@dataclass
class SourceJob(JobSettings):
    """A source job's settings (design, natural): those of every sharded job
    (data_pipelines.core.sharded.JobSettings) plus the ingest input. With `input` set
    the job ingests existing images; without it, a procedural generator produces them."""

    num_shards: int = 4
    """Procedural mode only: ingest derives the shard count from the input."""
    input: IngestConfig | None = None
    """Ingest existing images (folder, jsonl, webdataset, anyword, parquet) instead of generating."""

    RUN_ONLY = (*JobSettings.RUN_ONLY, "input")

    def content_settings(self) -> dict[str, Any]:
        d = super().content_settings()
        d.get("ocr", {}).pop("threads", None)
        return d

    def _run(self, source: str, make_producer, producer, resolved_config) -> dict[str, Any]:
        if self.input is not None:
            return run_ingest(
                self.input, source=source, out_dir=self.out_dir, workers=self.workers, node_rank=self.node_rank,
                num_nodes=self.num_nodes, overwrite=self.overwrite, progress=self.progress, resolved_config=resolved_config,
            )
        return run_sharded(
            self.sharded(
                prefix=source,
                make_producer=make_producer,
                manifest_extra={"source": source, "config": resolved_config if resolved_config is not None else asdict(self)},
            ),
            producer(),
        )
