"""The sharded-job runner every `qwenimg-data` job shares.

A job supplies a *producer*: an object built once per process whose
`produce(index, tally)` yields the samples of shard `index` as `Produced` records.
This module does the rest, the same way for every source: split shards over nodes
and processes, skip complete shards (resume), write each shard atomically with its
statistics, count samples per text class / language / layout / format, show a
progress bar, and write the manifest once every shard exists.

Producers must be deterministic in (settings, index) for byte-identical reruns, and
report what they skip through `tally.skip(item, reason)` rather than raising: bad
input is counted and listed in the manifest, never fatal.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

from tqdm import tqdm

from data_pipelines.core.schema import SampleMeta, valid_key
from data_pipelines.core.shards import AtomicShardWriter, ShardSet, fingerprint, node_shards, node_split

log = logging.getLogger(__name__)

# Skipped items listed per shard in the statistics (all are counted).
MAX_LISTED_SKIPS = 1000


@dataclass
class Produced:
    """One sample ready to write: tar members (extension -> bytes) and its metadata."""

    key: str
    fields: Mapping[str, bytes]
    meta: SampleMeta


@dataclass
class Tally:
    """Per-shard counters a producer adds to (beyond the per-sample counts)."""

    counts: dict[str, Counter] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, group: str, name: str, n: int = 1) -> None:
        self.counts.setdefault(group, Counter())[name] += n

    def skip(self, item: str, reason: str) -> None:
        """Record an input that could not be used; `reason` is one short line."""
        kind = reason.split(":", 1)[0]
        self.add("skipped", kind)
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"item": item, "reason": reason})


class Producer(Protocol):
    def produce(self, index: int, tally: Tally) -> Iterator[Produced]: ...


@dataclass
class ShardedJob:
    """What the runner needs to know about a job (the job's own settings stay with it)."""

    out_dir: str
    prefix: str
    num_shards: int
    settings: Mapping[str, Any]
    """Everything that decides shard content: its fingerprint guards resume."""
    make_producer: Callable[[], Producer]
    """Builds the per-process producer; must pickle (a module-level function or partial)."""
    workers: int = 1
    node_rank: int | None = None
    num_nodes: int | None = None
    overwrite: bool = False
    progress: bool = True
    manifest_extra: Mapping[str, Any] = field(default_factory=dict)
    samples_per_shard: int | None = None
    """Expected samples per shard, for the progress bar (None: count shards)."""


_STATE: dict[str, Any] = {}


def _init(job: ShardedJob, counter, producer: Producer | None = None) -> None:
    _STATE["job"] = job
    _STATE["producer"] = producer or job.make_producer()
    _STATE["counter"] = counter


def _write_shard(index: int) -> dict[str, Any]:
    job: ShardedJob = _STATE["job"]
    producer: Producer = _STATE["producer"]
    counter = _STATE.get("counter")
    shards = ShardSet(job.out_dir, job.prefix, job.num_shards, fingerprint(dict(job.settings)))
    tally = Tally()
    per_sample = ("text_class", "language", "layout", "format", "source")
    for group in per_sample:
        tally.counts[group] = Counter()
    writer = AtomicShardWriter(shards.tar_path(index))
    try:
        for sample in producer.produce(index, tally):
            sample.meta.validate()
            # The tar member names: a producer that copies keys from its input (verify,
            # precompute) skips unsafe ones as `bad_key`; one reaching here is a bug.
            if not valid_key(sample.key):
                raise ValueError(f"shard {index}: producer {type(producer).__name__} yielded unsafe key {sample.key!r}")
            writer.write(sample.key, sample.fields)
            meta = sample.meta
            tally.add("text_class", meta.text_class)
            tally.add("layout", meta.layout or "none")
            tally.add("format", meta.format or "none")
            tally.add("source", meta.source)
            for lang in meta.languages:
                tally.add("language", lang)
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats = {
        "shard": index,
        "num_samples": writer.count,
        "counts": {k: dict(sorted(v.items())) for k, v in sorted(tally.counts.items())},
        "skipped": tally.skipped,
    }
    shards.write_stats(index, stats)
    return stats


def run_sharded(job: ShardedJob, producer: Producer | None = None) -> dict[str, Any]:
    """Produce this node's missing shards; write the manifest when all exist.

    `producer`, when given, is used in-process instead of building one (the caller
    often built one already to validate its settings).
    """
    node_rank, num_nodes = node_split(job.node_rank, job.num_nodes)
    shards = ShardSet(job.out_dir, job.prefix, job.num_shards, fingerprint(dict(job.settings)))
    shards.make_dirs()
    mine = node_shards(job.num_shards, node_rank, num_nodes)
    if job.overwrite:
        shards.clean(mine)
    shards.remove_partial(mine)  # temporary files of a killed run (this node's shards only)
    todo = [i for i in mine if not shards.is_complete(i)]
    kept = len(mine) - len(todo)
    if kept:
        log.info("resuming: %d of this node's %d shards are complete and kept", kept, len(mine))

    per = job.samples_per_shard
    bar = tqdm(
        total=len(mine) * per if per else len(mine),
        initial=kept * per if per else kept,
        unit="img" if per else "shard",
        desc=f"{job.prefix} [node {node_rank}/{num_nodes}]",
        disable=not job.progress,
    )
    start = time.perf_counter()
    written = 0
    if job.workers == 1 or len(todo) <= 1:
        _init(job, None, producer)
        for index in todo:
            stats = _write_shard(index)
            written += stats["num_samples"]
            bar.update(stats["num_samples"] if per else 1)
    else:
        ctx = mp.get_context("spawn")  # onnxruntime and FreeType state are not fork-safe
        counter = ctx.Value("l", 0)
        with ctx.Pool(min(job.workers, len(todo)), initializer=_init, initargs=(job, counter)) as pool:
            pending = pool.map_async(_write_shard, todo, chunksize=1)
            seen = 0
            while not pending.ready():
                pending.wait(0.2)
                if per:
                    value = counter.value
                    bar.update(value - seen)
                    seen = value
            results = pending.get()  # re-raises a worker's exception
            written = sum(r["num_samples"] for r in results)
            bar.update((written - seen) if per else len(results))
    bar.close()
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "shards_written": len(todo),
        "shards_kept": kept,
        "samples_written": written,
        "seconds": round(elapsed, 2),
        "images_per_second": round(written / elapsed, 1) if written and elapsed > 0 else None,
        "manifest": None,
    }
    if shards.all_complete():
        skipped = []
        for i in range(job.num_shards):
            stats = shards.read_stats(i) or {}
            skipped += stats.get("skipped", [])
        summary["manifest"] = str(shards.write_manifest({**job.manifest_extra, "skipped": skipped[:MAX_LISTED_SKIPS]}))
    log.info("%s: %s", job.prefix, summary)
    return summary


@dataclass
class JobSettings:
    """The settings every sharded `qwenimg-data` job has (each job's dataclass extends it)."""

    out_dir: str
    """Folder for the shards, their statistics and manifest.json: a path, or an fsspec URL
    (s3://bucket/prefix, gs://..., file:///path; docs/data.md, Remote sources)."""
    seed: int = 0
    num_shards: int = 8
    samples_per_shard: int = 256
    """Samples in every shard."""
    workers: int = 1
    """Processes on this node."""
    node_rank: int | None = None
    """This node's index among `num_nodes`; null reads SLURM_ARRAY_TASK_ID or RANK."""
    num_nodes: int | None = None
    """Nodes sharing the job by shard index; null reads SLURM_ARRAY_TASK_COUNT or WORLD_SIZE."""
    overwrite: bool = False
    """Delete this node's existing shards first (else complete shards are kept: resume)."""
    progress: bool = True
    image_format: str = "jpg"
    jpeg_quality: int = 90

    # Settings that change how a job runs, not what it writes: left out of the
    # resume fingerprint, so a rerun may use more workers or nodes.
    RUN_ONLY = ("out_dir", "workers", "node_rank", "num_nodes", "overwrite", "progress", "num_shards")

    def __post_init__(self) -> None:
        for name in ("num_shards", "samples_per_shard", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format = {self.image_format!r}; use 'jpg' or 'png'")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality = {self.jpeg_quality} must lie in [1, 100]")

    def content_settings(self) -> dict[str, Any]:
        """The settings that decide shard content (the resume fingerprint)."""
        d = asdict(self)
        for key in self.RUN_ONLY:
            d.pop(key)
        return d

    def sharded(self, *, prefix: str, make_producer: Callable[[], Producer], manifest_extra: Mapping[str, Any]) -> ShardedJob:
        """The runner's view of this job, producing `num_shards` x `samples_per_shard` samples."""
        return ShardedJob(
            out_dir=self.out_dir, prefix=prefix, num_shards=self.num_shards, settings=self.content_settings(),
            make_producer=make_producer, workers=self.workers, node_rank=self.node_rank, num_nodes=self.num_nodes,
            overwrite=self.overwrite, progress=self.progress, samples_per_shard=self.samples_per_shard,
            manifest_extra={"seed": self.seed, "samples_per_shard": self.samples_per_shard, **manifest_extra},
        )
