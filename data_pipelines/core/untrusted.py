"""Reading untrusted samples: shard members and images that may be corrupt, truncated or hostile.

Everything a job or the training loader reads from a shard is treated as untrusted:
a bad sample is *skipped and counted by reason*, never fatal (the loader still stops
past its `max_skip_fraction`), and nothing read is ever extracted to disk, so a
member name can never place a file anywhere. The reasons, shared by the loader
(`Batch.skipped`, logged as `data/skipped/<reason>`) and the shard-reading jobs
(verify, precompute, preview: manifest `counts.skipped`) are `SKIP_REASONS`.

Images are checked from their header before any pixel is decoded: a file whose
header claims more than `max_image_pixels` pixels (default `MAX_IMAGE_PIXELS`,
64 MP) is refused as `oversized`. That is what stops decompression bombs: a
30000x30000 PNG of a few kilobytes would otherwise ask for 2.7 GB. Pillow's own
guard (`Image.MAX_IMAGE_PIXELS`, 89 MP) only warns below twice its limit.
Truncated files stay errors: this module never sets `ImageFile.LOAD_TRUNCATED_IMAGES`
(and refuses to decode while something else has set it).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Callable, Iterator, Mapping

from PIL import Image, ImageFile

from data_pipelines.core.schema import SampleMeta, valid_key

# 8192 x 8192: above every training bucket and every real poster or photo we ingest
# (a 50 MP camera frame is 8660x5773 = 50.0 MP), far below what a bomb asks for.
# Change it per job (`max_image_pixels` of verify / precompute / ingest, the loader's
# StageStream(max_image_pixels=...)).
MAX_IMAGE_PIXELS = 8192 * 8192
# A single tar member larger than this is not read into memory (counted `oversized`).
MAX_MEMBER_BYTES = 512 << 20

SKIP_REASONS = {
    "empty": "a zero-byte image member",
    "truncated": "an image whose data ends early",
    "undecodable": "image bytes no decoder reads (corrupt, or not an image)",
    "oversized": "an image header claiming more than max_image_pixels (a decompression bomb), "
                 "or a tar member over MAX_MEMBER_BYTES",
    "bad_json": "a json member that is not valid UTF-8 JSON holding an object",
    "bad_meta": "metadata with a required key missing or of the wrong type or value",
    "bad_caption": "a caption or instruction member that is not UTF-8",
    "missing_member": "no image, caption, json (or source image / instruction for a pair) member",
    "bad_key": "a key that is not one or more [A-Za-z0-9_-] segments joined by '/' "
               "(path traversal, absolute path, unicode, empty segments)",
    "duplicate_member": "two tar members with the same key and extension",
    "bad_shard": "a tar that cannot be read on (cut short or corrupt): the rest of that shard is lost",
    "unreachable_shard": "a remote shard that could not be opened or read to its end after data.remote_retries "
                         "retries (the loader's): the rest of that shard is lost, this time it was drawn",
}


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not valid_key(key):
        raise BadSample("bad_key", repr(key)[:120])
    return key


def image_reason(exc: BaseException) -> str:
    """The skip reason for an exception raised while opening or decoding an image."""
    if isinstance(exc, BadSample):
        return exc.reason
    if isinstance(exc, Image.DecompressionBombError):
        return "oversized"
    message = str(exc).lower()
    if isinstance(exc, (OSError, SyntaxError)) and ("truncated" in message or "premature end" in message):
        return "truncated"
    return "undecodable"


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image opened from bytes, its header read and checked, no pixel decoded yet.

    Raises BadSample (empty, oversized, undecodable). The caller decodes (`load()`,
    `convert()`, `draft()` first for JPEGs) and maps decode errors with `image_reason`.
    """
    if not data:
        raise BadSample("empty", "0 bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would be decoded "
                           "as grey; something in this process set it, unset it")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error, ...
        raise BadSample(image_reason(exc), _describe(exc)) from None
    width, height = im.size
    if width < 1 or height < 1 or width * height > max_pixels:
        im.close()
        raise BadSample("oversized" if width * height > max_pixels else "undecodable",
                        f"header says {width}x{height} (max_image_pixels={max_pixels})")
    return im


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> a fully decoded RGB image, or BadSample with its reason."""
    im = open_image(data, max_pixels)
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise BadSample(image_reason(exc), _describe(exc)) from None


def _describe(exc: BaseException) -> str:
    # Pillow puts the stream's repr (with a memory address) in some messages: drop it,
    # so two runs write the same statistics.
    return re.sub(r"\s*<[^<>]*>", "", f"{type(exc).__name__}: {exc}").strip()[:200]


def load_json_object(data: Any) -> dict[str, Any]:
    """A json member's bytes -> dict, or BadSample('bad_json')."""
    try:
        obj = json.loads(data)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample("bad_json", _describe(exc)) from None
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta_fields(meta: Mapping[str, Any]) -> None:
    """The fields the loader relies on, without building a SampleMeta (cheap, per sample):
    width and height positive ints, text_class a string, extra (and extra.edit) objects."""
    for name in ("width", "height"):
        if name not in meta:
            raise BadSample("bad_meta", f"no {name!r}")
        if not _is_int(meta[name]) or meta[name] < 1:
            raise BadSample("bad_meta", f"{name} = {meta[name]!r} is not a positive integer")
    if not isinstance(meta.get("text_class"), str):
        raise BadSample("bad_meta", f"text_class = {meta.get('text_class')!r} is not a string")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("edit", {}), dict):
        raise BadSample("bad_meta", "extra (and extra.edit) must be objects")


def parse_meta(data: Any) -> SampleMeta:
    """A json member -> SampleMeta, or BadSample (bad_json: not a JSON object; bad_meta:
    a field missing, of the wrong type, or failing `SampleMeta.validate`)."""
    obj = load_json_object(data)
    try:
        meta = SampleMeta.from_json(obj)
        meta.validate()
    except ValueError as exc:
        raise BadSample("bad_meta", str(exc)[:200]) from None
    return meta


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """'<key>.<ext>' as WebDataset splits it: at the first dot after the last '/'; the
    extension lower-cased. (None, None) for a name without one."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def read_tar_samples(
    path: str, *, report: Callable[[str, str], None] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES,
    label: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of a shard as {ext: bytes, '__key__': key}, grouped like WebDataset groups them.

    Only regular members are read (directories, symlinks, hard links and devices are
    ignored and never followed); nothing is extracted to disk. With `report`, problems
    are passed to `report(where, reason_and_detail)` and reading goes on where it can:
    a duplicate member is dropped, an over-large one not read, and a tar that breaks
    off (cut short, corrupt header) ends the shard (`bad_shard`). Without `report`
    they raise. Keys are *not* checked here (`check_key`): the caller counts bad ones.
    Problems name the shard as `label` (default: `path`; a downloaded copy names its URL).
    """
    def problem(where: str, reason: str, detail: str) -> None:
        if report is None:
            raise BadSample(reason, f"{where}: {detail}")
        report(where, f"{reason}: {detail}")

    current: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_member_name(member.name)
                if key is None:
                    continue
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"] = key
                where = f"{label or path}:{key}"
                if ext in current:
                    problem(where, "duplicate_member", f"second {ext!r} member")
                    continue
                if member.size > max_member_bytes:
                    problem(where, "oversized", f"member {ext!r} holds {member.size} bytes (> {max_member_bytes})")
                    continue
                data = tar.extractfile(member)
                current[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem(str(label or path), "bad_shard", _describe(exc))
    if current:
        yield current
