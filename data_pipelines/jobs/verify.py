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
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.core.remote import InputFolder, InputShard, is_remote, local_path
from data_pipelines.core.sharded import Produced, ShardedJob, Tally, run_sharded
from data_pipelines.core.ocr import DEFAULT_OCR_LANGUAGES, OcrEngine, verify_sample
from data_pipelines.core.schema import IMAGE_EXTENSIONS, META_EXTENSION
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, check_key, decode_rgb, parse_meta, read_tar_samples

log = logging.getLogger(__name__)


@dataclass
class VerifyJob:
    in_dir: str
    """Shard folder to verify (`<prefix>-NNNNNN.tar` files, e.g. from the synthetic job), or a
    remote folder location (https://, s3://, pipe:...; its manifest lists the shards)."""
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
    remote_retries: int = 3
    """A remote in_dir: tries after a failed manifest or shard download (then the job stops)."""
    remote_backoff_s: float = 2.0
    """Seconds before the first retry, doubling after each."""

    def __post_init__(self) -> None:
        if self.mode not in ("crops", "full"):
            raise ValueError(f"mode = {self.mode!r}; use 'crops' or 'full'")
        if not 0 <= self.max_ned <= 1:
            raise ValueError(f"max_ned = {self.max_ned} must lie in [0, 1]")
        check_in_out(self.in_dir, self.out_dir, "verification")
        if self.remote_retries < 0 or self.remote_backoff_s < 0:
            raise ValueError(f"remote_retries = {self.remote_retries} and remote_backoff_s = {self.remote_backoff_s} "
                             "must be >= 0")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {self.max_image_pixels} must be >= 1 (default {MAX_IMAGE_PIXELS})")


def input_shards(in_dir: str, retries: int = 3, backoff_s: float = 2.0) -> tuple[str, InputFolder]:
    """(prefix, the folder with its shards in index order) of a folder of
    `<prefix>-NNNNNN.tar` files: a local folder, or a remote folder location (the shards
    its manifest lists; data_pipelines.core.remote)."""
    folder = InputFolder(in_dir, "*-[0-9][0-9][0-9][0-9][0-9][0-9].tar", retries=retries, backoff_s=backoff_s)
    names = [s.name for s in folder.shards if re.fullmatch(r".+-\d{6}\.tar", s.name)]
    if not names:
        raise ValueError(f"no shards (<prefix>-NNNNNN.tar) in {in_dir!r}")
    prefixes = {n.rsplit("-", 1)[0] for n in names}
    if len(prefixes) > 1:
        raise ValueError(f"{in_dir!r} mixes shard prefixes {sorted(prefixes)}; read one job's folder at a time")
    indices = [int(n.removesuffix(".tar").rsplit("-", 1)[1]) for n in names]
    if indices != list(range(len(names))) or len(names) != len(folder.shards):
        raise ValueError(f"{in_dir!r}: shard indices are not 0..{len(names) - 1} (an incomplete job?)")
    return prefixes.pop(), folder


def check_in_out(in_dir: str, out_dir: str, job: str) -> None:
    """A job never rewrites its input: out_dir must name another folder."""
    same = (in_dir.rstrip("/") == out_dir.rstrip("/") if is_remote(in_dir) or is_remote(out_dir)
            else local_path(in_dir).resolve() == local_path(out_dir).resolve())
    if same:
        raise ValueError(f"out_dir must differ from in_dir ({job} never rewrites its input)")


class VerifyProducer:
    """Reads input shard `index` back with OCR; yields the samples that pass."""

    def __init__(self, job: VerifyJob):
        self.job = job
        self.ocr = OcrEngine(threads=job.threads, languages=job.languages)
        self.folder = input_shards(job.in_dir, job.remote_retries, job.remote_backoff_s)[1]

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        shard = self.folder.shards[index]
        with self.folder.local_copy(shard) as path:
            yield from self._verified(shard, path, tally)

    def _verified(self, shard: InputShard, path: Path, tally: Tally) -> Iterator[Produced]:
        job = self.job
        for raw in read_tar_samples(str(path), report=tally.skip, label=shard.location):
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
    settings = {"in_dir": InputFolder.identify(job.in_dir), "mode": job.mode, "max_ned": job.max_ned, "languages": job.languages}
    if job.max_image_pixels != MAX_IMAGE_PIXELS:  # only when changed: earlier outputs keep their fingerprint
        settings["max_image_pixels"] = job.max_image_pixels
    return settings


def run(job: VerifyJob) -> dict[str, Any]:
    prefix, folder = input_shards(job.in_dir, job.remote_retries, job.remote_backoff_s)
    extra: dict[str, Any] = {"verified_from": folder.identity, "verify": asdict(job)}
    if folder.manifest is not None:
        extra["source_manifest"] = folder.manifest
    summary = run_sharded(
        ShardedJob(
            out_dir=job.out_dir, prefix=prefix, num_shards=len(folder.shards), settings=_settings(job),
            make_producer=functools.partial(VerifyProducer, job), workers=job.workers, node_rank=job.node_rank,
            num_nodes=job.num_nodes, progress=job.progress, manifest_extra=extra,
        )
    )
    summary["shards_verified"] = summary["shards_written"]
    return summary
