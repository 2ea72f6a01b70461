"""`qwenimg-data --config-name verify`: OCR verification as a separate stage.

OCR costs ~300x a render (DESIGN.md), so a job may render with `ocr=disabled` and
verify later, on other machines: this stage reads a shard folder, reads every
sample back with the recogniser, writes the samples that pass to a new folder
under the same shard names (image and caption bytes untouched, metadata with the
OCR fields filled in), and counts the drops. Shards are split over processes and
nodes like generation, written atomically, and a rerun keeps complete ones.
Unreadable samples (bad image, bad JSON, missing member) are skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_pipelines.ocr import DEFAULT_OCR_LANGUAGES, OcrEngine, verify_sample
from data_pipelines.schema import CAPTION_EXTENSION, IMAGE_EXTENSIONS, META_EXTENSION, SampleMeta
from data_pipelines.shards import AtomicShardWriter, ShardSet, fingerprint, iter_tar_samples, node_shards, node_split

log = logging.getLogger(__name__)


@dataclass
class VerifyJob:
    in_dir: str
    """Shard folder to verify (`<prefix>-NNNNNN.tar` files, e.g. from the synthetic job)."""
    out_dir: str
    """Folder for the verified shards and their manifest."""
    mode: str = "crops"
    """crops | full (see data_pipelines.ocr)."""
    max_ned: float = 0.2
    """Drop a sample whose normalised edit distance over its scored lines exceeds this."""
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_OCR_LANGUAGES))
    threads: int = 1
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


_STATE: dict[str, Any] = {}


def _init(job: VerifyJob, counter) -> None:
    _STATE.update(job=job, counter=counter, ocr=OcrEngine(threads=job.threads, languages=job.languages))


def verify_shard(index: int) -> dict[str, Any]:
    job: VerifyJob = _STATE["job"]
    ocr: OcrEngine = _STATE["ocr"]
    prefix, paths = input_shards(job.in_dir)
    shards = ShardSet(job.out_dir, prefix, len(paths), fingerprint(_settings(job)))
    counts: dict[str, Counter] = {k: Counter() for k in ("text_class", "language", "layout", "ocr", "skipped")}
    writer = AtomicShardWriter(shards.tar_path(index))
    try:
        for raw in iter_tar_samples(paths[index]):
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            try:
                if ext is None or META_EXTENSION not in raw:
                    raise KeyError("image or json member missing")
                meta = SampleMeta.from_json(raw[META_EXTENSION])
                image = Image.open(io.BytesIO(raw[ext]))
                image.load()
            except Exception as exc:  # a bad sample is skipped and counted, never fatal
                counts["skipped"][type(exc).__name__] += 1
                log.warning("%s: skipping %s: %s", paths[index].name, raw.get("__key__"), exc)
                continue
            score = verify_sample(ocr, image.convert("RGB"), meta, job.mode)  # the generator's own check
            if not meta.lines:
                counts["ocr"]["no_text"] += 1
            elif score is None:
                counts["ocr"]["unscored"] += 1
            elif score > job.max_ned:
                counts["ocr"]["dropped"] += 1
                continue
            else:
                counts["ocr"]["passed"] += 1
            fields = {k: v for k, v in raw.items() if k != "__key__"}
            fields[META_EXTENSION] = meta.to_json().encode("utf-8")
            writer.write(raw["__key__"], fields)
            counts["text_class"][meta.text_class] += 1
            counts["layout"][meta.layout] += 1
            for lang in meta.languages:
                counts["language"][lang] += 1
            counter = _STATE.get("counter")
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats = {"shard": index, "num_samples": writer.count, "counts": {k: dict(sorted(v.items())) for k, v in counts.items()}}
    shards.write_stats(index, stats)
    return stats


def _settings(job: VerifyJob) -> dict[str, Any]:
    return {"in_dir": str(Path(job.in_dir).resolve()), "mode": job.mode, "max_ned": job.max_ned, "languages": job.languages}


def run(job: VerifyJob) -> dict[str, Any]:
    prefix, paths = input_shards(job.in_dir)
    node_rank, num_nodes = node_split(job.node_rank, job.num_nodes)
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    shards = ShardSet(job.out_dir, prefix, len(paths), fingerprint(_settings(job)))
    mine = node_shards(len(paths), node_rank, num_nodes)
    shards.remove_partial(mine)
    todo = [i for i in mine if not shards.is_complete(i)]
    bar = tqdm(total=len(todo), unit="shard", desc=f"verify [node {node_rank}/{num_nodes}]", disable=not job.progress)
    if job.workers == 1 or len(todo) <= 1:
        _init(job, None)
        for index in todo:
            verify_shard(index)
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(job.workers, len(todo)), initializer=_init, initargs=(job, ctx.Value("l", 0))) as pool:
            for _ in pool.imap_unordered(verify_shard, todo):
                bar.update(1)
    bar.close()
    summary: dict[str, Any] = {"node_rank": node_rank, "num_nodes": num_nodes, "shards_verified": len(todo), "manifest": None}
    if shards.all_complete():
        source_manifest = Path(job.in_dir) / "manifest.json"
        extra = {"verified_from": str(Path(job.in_dir).resolve()), "verify": asdict(job)}
        if source_manifest.exists():
            extra["source_manifest"] = json.loads(source_manifest.read_text("utf-8"))
        summary["manifest"] = str(shards.write_manifest(extra))
    log.info("verify: %s", summary)
    return summary
