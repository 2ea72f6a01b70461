"""Contact sheets: the first N samples of a shard folder, polygons and classes drawn.

Read with plain `webdataset.WebDataset`, the reader training uses, so a sheet that
looks right also says the shards load. Bad samples (data_pipelines.core.untrusted reasons:
unsafe key, bad metadata, undecodable or oversized image, a broken tar) are skipped,
counted and logged; the sheet shows the good ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image, ImageDraw

from data_pipelines.core.remote import InputFolder
from data_pipelines.core.contact_sheet import Cell, label_font, paint_sheet
from data_pipelines.core.schema import IMAGE_EXTENSIONS, SOURCE_IMAGE_PREFIX, SampleMeta
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, check_key, decode_rgb, parse_meta

log = logging.getLogger(__name__)

CLASS_COLOURS = {"none": (160, 160, 160), "simple": (40, 200, 90), "complex": (240, 80, 40)}


@dataclass
class PreviewJob:
    shards: str
    """A shard folder (every .tar in it), one .tar file, or a remote folder location
    (https://, s3://, pipe:...: the shards its manifest lists)."""
    out: str
    """The PNG to write."""
    num_samples: int = 24
    columns: int = 6
    thumb_size: int = 256
    remote_retries: int = 3
    """A remote in_dir: tries after a failed manifest or shard download (then the job stops)."""
    remote_backoff_s: float = 2.0
    """Seconds before the first retry, doubling after each."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.columns < 1 or self.thumb_size < 32:
            raise ValueError("preview: num_samples and columns must be >= 1, thumb_size >= 32")
        if self.remote_retries < 0 or self.remote_backoff_s < 0:
            raise ValueError(f"remote_retries = {self.remote_retries} and remote_backoff_s = {self.remote_backoff_s} "
                             "must be >= 0")


def input_folder(location: str | Path, retries: int = 3, backoff_s: float = 2.0) -> InputFolder:
    """The shards to preview: a folder's (or remote folder's) `.tar` files, or one `.tar`."""
    folder = InputFolder(location, retries=retries, backoff_s=backoff_s)
    if not folder.shards:
        raise ValueError(f"no .tar shards in {str(location)!r}; generate some first (qwenimg-data --config-name synthetic)")
    return folder


def run(job: PreviewJob) -> Path:
    return make_sheet(job)[0]


def make_sheet(job: PreviewJob) -> tuple[Path, dict[str, int]]:
    """The contact sheet's path and the bad samples skipped on the way, by reason."""
    skipped: Counter = Counter()

    def handler(exc: BaseException) -> bool:  # a tar that breaks off: the rest of it is lost
        skipped["bad_shard" if "duplicate file name" not in str(exc) else "duplicate_member"] += 1
        log.warning("preview: %s", exc)
        return True

    folder = input_folder(job.shards, job.remote_retries, job.remote_backoff_s)
    thumbs = []
    for sample in _samples(folder, handler, enough=lambda: len(thumbs) >= job.num_samples):
        try:
            check_key(sample.get("__key__"))
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None or "json" not in sample:
                raise BadSample("missing_member", "image or json member missing")
            meta = parse_meta(sample["json"])
            image = decode_rgb(sample[ext], MAX_IMAGE_PIXELS)
            source = sample.get(f"{SOURCE_IMAGE_PREFIX}.{ext}")
            source = decode_rgb(source, MAX_IMAGE_PIXELS) if source is not None else None
        except BadSample as bad:
            skipped[bad.reason] += 1
            log.warning("preview: skipped %s: %s", sample.get("__key__"), bad)
            continue
        try:
            if source is not None:  # an edit pair: source and target side by side, region drawn
                thumbs.append(_pair(source, image, meta, job.thumb_size))
            else:
                thumbs.append(_annotate(image, meta, job.thumb_size))
        except (TypeError, ValueError) as exc:  # a malformed extra.edit (region, instruction)
            skipped["bad_meta"] += 1
            log.warning("preview: skipped %s: bad_meta: %s", sample.get("__key__"), exc)
            continue
        if len(thumbs) >= job.num_samples:
            break
    if not thumbs:
        raise ValueError(f"no readable samples in {job.shards!r} (skipped: {dict(skipped) or 'none'})")
    font = label_font(12)
    cells = [Cell(thumb, [label], font, strip=colour) for thumb, label, colour in thumbs]
    sheet = paint_sheet(cells, columns=min(job.columns, len(cells)), cell_size=(job.thumb_size, job.thumb_size),
                        label_height=18, text_offset=(4, 2), text_fill=(255, 255, 255))
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, dict(sorted(skipped.items()))


def _samples(folder: InputFolder, handler, enough) -> Iterator[dict]:
    """The folder's samples through WebDataset, shard after shard (a remote shard is
    downloaded when reached: `InputFolder.local_copy`), until `enough()`."""
    for shard in folder.shards:
        if enough():
            return
        with folder.local_copy(shard) as path:
            yield from wds.WebDataset([str(path)], shardshuffle=False, empty_check=False, handler=handler)


def _annotate(image: Image.Image, meta: SampleMeta, size: int):
    scale = size / max(image.width, image.height)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colour = CLASS_COLOURS.get(meta.text_class, (0, 0, 0))
    for line in meta.lines:
        points = [(x * scale, y * scale) for x, y in line.polygon]
        draw.polygon(points, outline=colour)
    label = f"{meta.text_class} · {meta.format or meta.layout} · {','.join(meta.languages) or '-'}"
    return canvas, label, colour


def _pair(source: Image.Image, target: Image.Image, meta: SampleMeta, size: int):
    half = size // 2
    scale = half / max(target.width, target.height)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    edit = meta.extra.get("edit")
    edit = edit if isinstance(edit, dict) else {}
    for i, im in enumerate((source, target)):
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
        canvas.paste(thumb, (i * half, 0))
        if edit.get("region"):
            pts = [(i * half + x * scale, y * scale) for x, y in edit["region"]]
            ImageDraw.Draw(canvas).polygon(pts, outline=(255, 0, 0))
    ImageDraw.Draw(canvas).text((4, half + 4), edit.get("instruction", "")[:60], fill=(0, 0, 0), font=label_font(12))
    return canvas, f"{edit.get('type', 'edit')} · {meta.text_class}", CLASS_COLOURS.get(meta.text_class, (0, 0, 0))

