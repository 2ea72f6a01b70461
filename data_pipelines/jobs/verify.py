"""`qwenimg-data --config-name verify`: OCR verification as a separate stage.

OCR costs ~300x a render (docs/data.md), so a job may render with `ocr=disabled` and
verify later, on other machines: this stage reads a shard folder, reads every
sample back with the recogniser, writes the samples that pass to a new folder
under the same shard names (image and caption bytes untouched, metadata with the
OCR fields filled in), and counts the drops. Shards are split over processes and
nodes like generation, written atomically, and a rerun keeps complete ones.
Unreadable samples (bad image, bad JSON, missing member, unsafe key; the reasons
of data_pipelines.core.untrusted) are skipped and counted.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.core.sharded import Produced, ShardedJob, Tally, run_sharded
from data_pipelines.core.ocr import DEFAULT_OCR_LANGUAGES, OcrEngine, verify_sample
from data_pipelines.core.schema import IMAGE_EXTENSIONS, META_EXTENSION
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, check_key, decode_rgb, parse_meta, read_tar_samples

log = logging.getLogger(__name__)


@dataclass
class VerifyJob:
    in_dir: str
    """Shard folder to verify (`<prefix>-NNNNNN.tar` files, e.g. from the synthetic job)."""
    out_dir: str
    """Folder for the verified shards and their manifest."""
    mode: str = "crops"
    """crops | full (see data_pipelines.core.ocr)."""
    max_ned: float = 0.2
    """Drop a sample whose normalised edit distance over its scored lines exceeds this."""
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_OCR_LANGUAGES))
    threads: int = 1
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are skipped as `oversized` (decompression bombs)."""
    workers: int = 1
    node_rank: int | None = None
    num_nodes: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("crops", "full"):
            raise ValueError(f"mode = {self.mode!r}; use 'crops' or 'full'")
        if not 0 <= self.max_ned <= 1:
            raise ValueError(f"max_ned = {self.max_ned} must lie in [0, 1]")
        if Path(self.in_dir).resolve() == Path(self.out_dir).resolve():
            raise ValueError("out_dir must differ from in_dir (verification never rewrites its input)")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {self.max_image_pixels} must be >= 1 (default {MAX_IMAGE_PIXELS})")


def input_shards(in_dir: str) -> tuple[str, list[Path]]:
    """(prefix, shard paths in index order) of a folder of `<prefix>-NNNNNN.tar` files."""
    paths = sorted(Path(in_dir).glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if not paths:
        raise ValueError(f"no shards (<prefix>-NNNNNN.tar) in {in_dir!r}")
    prefixes = {p.name.rsplit("-", 1)[0] for p in paths}
    if len(prefixes) > 1:
        raise ValueError(f"{in_dir!r} mixes shard prefixes {sorted(prefixes)}; verify one job's folder at a time")
    indices = [int(p.stem.rsplit("-", 1)[1]) for p in paths]
    if indices != list(range(len(paths))):
        raise ValueError(f"{in_dir!r}: shard indices are not 0..{len(paths) - 1} (an incomplete job?)")
    return prefixes.pop(), paths


class VerifyProducer:
    """Reads input shard `index` back with OCR; yields the samples that pass."""

    def __init__(self, job: VerifyJob):
        self.job = job
        self.ocr = OcrEngine(threads=job.threads, languages=job.languages)
        self.paths = input_shards(job.in_dir)[1]

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        shard = self.paths[index]
        for raw in read_tar_samples(str(shard), report=tally.skip):
            try:
                key = check_key(raw["__key__"])
                ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
                if ext is None or META_EXTENSION not in raw:
                    raise BadSample("missing_member", "image or json member missing")
                meta = parse_meta(raw[META_EXTENSION])
                image = decode_rgb(raw[ext], job.max_image_pixels)
            except BadSample as bad:  # a bad sample is skipped and counted, never fatal
                tally.skip(f"{shard.name}:{raw.get('__key__')!r}", str(bad))
                continue
            score = verify_sample(self.ocr, image, meta, job.mode)  # the generator's own check
            if not meta.lines:
                tally.add("ocr", "no_text")
            elif score is None:
                tally.add("ocr", "unscored")
            elif score > job.max_ned:
                tally.add("ocr", "dropped")
                continue
            else:
                tally.add("ocr", "passed")
            fields = {k: v for k, v in raw.items() if k != "__key__"}
            fields[META_EXTENSION] = meta.to_json().encode("utf-8")
            yield Produced(key, fields, meta)


def _settings(job: VerifyJob) -> dict[str, Any]:
    settings = {"in_dir": str(Path(job.in_dir).resolve()), "mode": job.mode, "max_ned": job.max_ned, "languages": job.languages}
    if job.max_image_pixels != MAX_IMAGE_PIXELS:  # only when changed: earlier outputs keep their fingerprint
        settings["max_image_pixels"] = job.max_image_pixels
    return settings


def run(job: VerifyJob) -> dict[str, Any]:
    prefix, paths = input_shards(job.in_dir)
    extra: dict[str, Any] = {"verified_from": str(Path(job.in_dir).resolve()), "verify": asdict(job)}
    source_manifest = Path(job.in_dir) / "manifest.json"
    if source_manifest.exists():
        extra["source_manifest"] = json.loads(source_manifest.read_text("utf-8"))
    summary = run_sharded(
        ShardedJob(
            out_dir=job.out_dir, prefix=prefix, num_shards=len(paths), settings=_settings(job),
            make_producer=functools.partial(VerifyProducer, job), workers=job.workers, node_rank=job.node_rank,
            num_nodes=job.num_nodes, progress=job.progress, manifest_extra=extra,
        )
    )
    summary["shards_verified"] = summary["shards_written"]
    return summary
