"""The streaming loader: one WebDataset pipeline per source, mixed and batched per stage.

For the active curriculum stage, every worker of every rank runs, per source:

    ResampledShards(urls)        shards drawn with replacement, seeded (no epochs:
                                 a stream never ends, ranks never run dry, #188/#225)
    local_tar_samples            tar members grouped into samples, as WebDataset's
                                 tarfile_to_samples groups them, read by random access:
                                 images stay in the shard until decoded
                                 (qwenimg_train/data/shard_reader.py); a corrupt shard is
                                 counted and skipped (handler). A remote source's shards
                                 go through `remote_tar_samples` instead: a stream, with
                                 retries (below)
    shuffle(buffer)              seeded, so the stream is reproducible
    select(text class)           the stage's allowed text classes

then, in this module's own loop (not a WebDataset stage: it needs the stage's exact
proportions, which RandomMix only meets on average):

    task     t2i / ti2i / i2i by the stage's task mix, in exact proportion
    source   design / synthetic / natural by the stage's weights, in exact proportion
             (ti2i and i2i samples come from the edit-pair shards)
    decode   PIL, with reduced-size JPEG decoding (`Image.draft`) when the bucket is
             at most half the stored size; resize to cover the bucket, centre crop
    bucket   the stage's aspect-ratio bucket nearest the image's; a batch holds one
             bucket, so every tensor in it has one shape
    collate  into a typed `Batch`: each image is copied into its bucket's batch array
             as it is decoded; batch arrays are reused once released (`_ArrayPool`)

Seeds derive from (seed, stage, rank, worker): two ranks or workers never read the
same stream, and a stage's stream is the same on every run. A run resumed mid-stage
continues exactly where it stopped: the stream is rebuilt and its first
`skip_batches` batches are drawn again without decoding a single image (only tar
reads, JSON and the sampling draws), then dropped; the samples drawn meanwhile that
a later batch holds (a bucket's batch can straddle the resume point) are decoded when
skipping ends. The batches after the resume point are the ones the uninterrupted
run would have seen (unless an undecodable sample lies in the skipped span:
skipping does not decode, so it cannot notice it).

Bad samples are skipped and counted by reason (`Batch.skipped`; the reasons are
data_pipelines.core.untrusted.SKIP_REASONS: empty, truncated, undecodable, oversized (an
image header over `max_image_pixels`, checked before decoding: decompression bombs),
bad_json, bad_meta, bad_caption, missing_member, bad_key, duplicate_member, bad_shard,
unreachable_shard); past `max_skip_fraction` of the samples seen the stream stops with
an error naming the shard and key. Below it a bad sample is never fatal. Nothing is
extracted to disk.

A source is a local folder or a URL (`SourceShards.from_location`: http(s), `pipe:`,
s3://, gs://, any fsspec protocol; data_pipelines.core.remote). A local folder's shards
are read as above, with no extra layer. A remote shard that fails to open, or fails
mid-read (a transport error: the connection broke, curl or the command exited non-zero,
the object store raised), is opened again after `remote_backoff_s`, then twice that,
..., `remote_retries` times; a re-opened shard skips the samples it already yielded,
so a retry that succeeds loses and repeats nothing, and the stream is the one an
undisturbed run reads (resume included). After the last try the shard is given up:
one warning, one `unreachable_shard` skip, and the samples not yet read from it are
lost this time it was drawn (a sample half-read when the connection broke is dropped,
never yielded in part); the stream draws its next shard. Tar content that is corrupt
(the transfer itself succeeded) is `bad_shard`, as for a local file, and not retried.
"""

from __future__ import annotations

import functools
import json
import logging
import tarfile
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import webdataset as wds

from data_pipelines.core import remote
from data_pipelines.core.config import redact_text
from data_pipelines.core.images import decode_image, nearest_bucket
from data_pipelines.core.precomputed import MEMBER as PRECOMPUTED_MEMBER
from data_pipelines.core.precomputed import for_bucket, from_bytes
from data_pipelines.core.schema import (CAPTION_EXTENSION, EXTRA_SOURCE_PREFIXES, IMAGE_EXTENSIONS,
                                        INSTRUCTION_EXTENSION, SOURCE_IMAGE_PREFIX, Task)
from data_pipelines.core.shards import MANIFEST_NAME, derive_seed
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, check_key, check_meta_fields, load_json_object
from qwenimg_train.data.curriculum import EDIT_SOURCE, SOURCES, Stage
from qwenimg_train.data.shard_reader import local_tar_samples, member_bytes

log = logging.getLogger(__name__)

# A source whose samples the stage's filter refuses this many times in a row holds
# (almost) none the stage allows: stop with an error instead of spinning forever.
_MAX_CONSECUTIVE_REJECTS = 20_000


class SkippedTooMany(RuntimeError):
    pass


class _Starved(Exception):
    """A stream's filter refused too many samples in a row."""


@dataclass
class SourceShards:
    """One source's shard files, read from its manifest."""

    name: str
    urls: list[str]
    manifest: dict[str, Any]
    remote: bool = False  # urls are read through data_pipelines.core.remote.open_url (with retries)

    @classmethod
    def from_location(cls, name: str, location: str | Path, *, retries: int = 3,
                      backoff_s: float = 2.0) -> "SourceShards":
        """A source from a local folder (a path or file:// URL: `from_folder`) or a remote
        one: a folder URL (`https://host/prefix/`, `s3://bucket/prefix/`, any fsspec
        protocol), its manifest's URL (`.../manifest.json`), or a `pipe:` command with
        `{file}` for the file name (`pipe:curl -s https://host/prefix/{file}`). The
        manifest is read with `retries` and `backoff_s` as shards are (module docstring)."""
        location = str(location)
        if not remote.is_remote(location):
            return cls.from_folder(name, remote.local_path(location))
        try:
            base, manifest_name = remote.locate(location)
        except ValueError as exc:
            raise ValueError(f"data source {name!r}: {exc}") from None
        url = remote.join(base, manifest_name)
        if remote.protocol(url) in ("http", "https") and not shutil.which("curl"):
            raise ValueError(f"data source {name!r}: reading {url} needs curl, which is not on PATH; "
                             "install it (apt-get install curl)")
        try:
            data = remote.read_url(url, retries=retries, backoff_s=backoff_s)
        except Exception as exc:
            tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
            raise ValueError(
                f"data source {name!r}: cannot read its manifest {url} ({remote.describe(exc)}; {tries}). Check the "
                "URL (a folder URL is its prefix, or give the manifest.json URL itself), that the server or bucket "
                "is reachable from here, and the credentials (docs/data.md, Remote sources)") from None
        try:
            manifest = json.loads(data)
            shards = [s for s in manifest.get("shards", []) if s.get("num_samples", 0) > 0]
            urls = [remote.join(base, s["file"]) for s in shards]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"data source {name!r}: {url} is not a shard manifest written by qwenimg-data "
                             f"({str(exc)[:200]})") from None
        if not urls:
            raise ValueError(f"data source {name!r}: the manifest {url} lists no non-empty shard")
        return cls(name, urls, manifest, remote=True)

    @classmethod
    def from_folder(cls, name: str, folder: str | Path) -> "SourceShards":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.exists():
            raise ValueError(f"data source {name!r}: no {MANIFEST_NAME} in {str(folder)!r}; generate the shards first")
        manifest = json.loads(path.read_text("utf-8"))
        urls = [str(folder / s["file"]) for s in manifest.get("shards", []) if s.get("num_samples", 0) > 0]
        if not urls:
            raise ValueError(f"data source {name!r}: the manifest in {str(folder)!r} lists no non-empty shard")
        return cls(name, urls, manifest)


@dataclass
class EncodedBatch:
    """A batch's encoder outputs, read from precomputed shards (data_pipelines.core.precomputed)
    instead of running the frozen encoders: per sample, its tensors by kind for its bucket
    (the empty prompt's text when its caption was dropped). The model family collates them
    as its own encoder would (`encode_batch`)."""

    samples: list[dict[str, torch.Tensor]]

    def stack(self, kind: str) -> torch.Tensor | None:
        """The `kind` tensors of the samples that have one, stacked (one bucket: one shape)."""
        rows = [s[kind] for s in self.samples if kind in s]
        return torch.stack(rows) if rows else None

    def padded(self, kind: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [T_i, D] right-padded to [B, T, D] with a long mask [B, T] (1 = token), as
        the first generation's prompt encoder pads a mixed batch."""
        rows = [s[kind] for s in self.samples]
        length = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), length, *rows[0].shape[1:])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=out.device)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return out, mask


@dataclass
class Batch:
    """One batch of one bucket size; per-sample tasks may differ (mixed-task batches)."""

    task: list[str]  # t2i | ti2i | i2i, per sample
    # uint8 RGB: a quarter of float32's bytes through pinned memory and the bus;
    # the model side normalises on the device (data_pipelines.core.images.to_unit_range).
    # The tensors are BCHW views of channels-last memory (images are stacked as decoded, HWC).
    # None when the batch comes precomputed (`encoded`): no image is decoded then.
    target_bchw: torch.Tensor | None  # uint8 [B, 3, H, W]
    source_bchw: torch.Tensor | None  # uint8 [B, 3, H, W], zeros where has_source is False; None when no sample has one
    has_source: torch.Tensor  # bool [B]
    prompt: list[str]  # caption (t2i) or instruction (ti2i, i2i); "" when dropped
    key: list[str]
    source: list[str]  # which data source each sample came from
    text_class: list[str]
    stage: str
    skipped: dict[str, int] = field(default_factory=dict)  # this worker's skips so far, by reason
    worker: int = 0  # which loader worker made it (skip counts are per worker)
    encoded: EncodedBatch | None = None  # precomputed encoder outputs (data.precomputed=true)
    # Multi-image edits (max_sources > 1): each sample's second and third sources, uint8
    # [B, K, 3, H, W] (K: the batch's most extra sources; zeros where a sample has fewer),
    # and num_sources [B] (0 for T2I); both None when no sample has more than one source.
    extra_sources_bkchw: torch.Tensor | None = None
    num_sources: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.task)


class Interleave:
    """Exact weighted interleaving (smooth weighted round robin).

    Over any window of n picks, each name is picked within one of n * weight times:
    the mix holds in every batch, not only on average. A seeded random start makes
    different workers' sequences differ.
    """

    def __init__(self, weights: Mapping[str, float], rng: np.random.Generator):
        self.names = [k for k, w in weights.items() if w > 0]
        total = sum(weights[k] for k in self.names)
        self.weights = [weights[k] / total for k in self.names]
        # Python floats, not a numpy array: two picks a sample, and on three numbers numpy's
        # per-call cost is most of the work. The arithmetic (float64) and the pick are the same.
        self.credit = (rng.random(len(self.names)) * np.array(self.weights)).tolist()

    def __next__(self) -> str:
        credit = self.credit
        for i, weight in enumerate(self.weights):
            credit[i] += weight
        i = credit.index(max(credit))  # the first of equal credits, as np.argmax
        credit[i] -= 1.0
        return self.names[i]


class _SkipCounter:
    """A WebDataset handler that counts what it skips and enforces the threshold."""

    def __init__(self, max_fraction: float, min_seen: int = 200):
        self.counts: Counter = Counter()
        self.seen = 0
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self._warned: set[tuple[str, str]] = set()  # each skip is logged once: a bad shard is drawn again and again

    def __call__(self, exc: BaseException) -> bool:
        """WebDataset's handler for errors reading a tar: a shard cut short or corrupt
        (the rest of it is lost), a member duplicated within a sample."""
        message = " ".join(str(a) for a in exc.args)[:200]
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            reason = "bad_shard"
        elif isinstance(exc, ValueError) and "duplicate file name" in message:
            reason = "duplicate_member"
        else:
            reason = type(exc).__name__
        self.skip(reason, message)
        return True  # keep going

    def skip(self, reason: str, where: str) -> None:
        where = redact_text(where)  # a location may carry its credential (docs/data.md, Remote sources)
        self.counts[reason] += 1
        total = sum(self.counts.values())
        if (reason, where) in self._warned or len(self._warned) >= 10_000:
            log.debug("skipped sample (%s) again: %s", reason, where)
        else:
            self._warned.add((reason, where))
            log.warning("skipped sample (%s): %s", reason, where)
        if self.seen + total >= self.min_seen and total > self.max_fraction * (self.seen + total):
            raise SkippedTooMany(
                f"{total} of {self.seen + total} samples skipped ({dict(self.counts)}), over "
                f"data.max_skip_fraction={self.max_fraction}; last: {reason} at {where}"
            )


def read_meta(sample: Mapping[str, Any], skips: _SkipCounter) -> dict | None:
    """A sample's metadata, checked before any filter reads a field; None (counted by
    reason: bad_key, missing_member, bad_json, bad_meta) when the sample is unusable."""
    try:
        check_key(sample.get("__key__"))
        if "json" not in sample:
            raise BadSample("missing_member", "no json member")
        meta = load_json_object(member_bytes(sample["json"]))
        check_meta_fields(meta)
    except BadSample as bad:
        skips.skip(bad.reason, f"{sample.get('__url__')}:{sample.get('__key__')!r}: {bad.detail}")
        return None
    return meta


class StageStream(torch.utils.data.IterableDataset):
    """A stream of `Batch`es for one stage and one rank (its workers split it below):
    endless, or `num_batches` long (a curriculum stage's remaining batches).

    Use with `DataLoader(stream, batch_size=None, num_workers=N)`: batching happens
    here, per bucket. `rank` and `world_size` are arguments, never read from globals.
    """

    def __init__(
        self,
        *,
        stage: Stage,
        stage_index: int,
        sources: Mapping[str, SourceShards],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        shuffle_buffer: int = 256,
        max_skip_fraction: float = 0.01,
        reduced_decode: bool = True,
        num_batches: int | None = None,
        precomputed: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_sources: int = 1,
        remote_retries: int = 3,
        remote_backoff_s: float = 2.0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        for name, weight in stage.source_weights.items():
            if weight > 0 and name not in sources:
                raise ValueError(f"stage {stage.name!r} draws from {name!r} but no {name} shards were given")
        if stage.needs_edit_pairs and EDIT_SOURCE not in sources:
            raise ValueError(f"stage {stage.name!r} has TI2I/I2I weight but no edit-pair shards were given")
        self.stage = stage
        self.stage_index = stage_index
        self.sources = dict(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if skip_batches < 0:
            raise ValueError(f"skip_batches = {skip_batches} must be >= 0")
        self.skip_batches = skip_batches  # over all workers of this rank, as num_batches
        self.shuffle_buffer = shuffle_buffer
        self.max_skip_fraction = max_skip_fraction
        self.reduced_decode = reduced_decode
        self.num_batches = num_batches  # over all workers of this rank; None: endless
        # Read each sample's encoder outputs (`pre.safetensors`) instead of decoding its
        # images; the draws (task, source, bucket, caption dropout) are the same.
        self.precomputed = precomputed
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {max_image_pixels} must be >= 1 (default {MAX_IMAGE_PIXELS})")
        # An image whose header claims more pixels is skipped as `oversized` before decoding.
        self.max_image_pixels = max_image_pixels
        if not 1 <= max_sources <= 1 + len(EXTRA_SOURCE_PREFIXES):
            raise ValueError(f"max_sources = {max_sources} must lie in [1, {1 + len(EXTRA_SOURCE_PREFIXES)}]")
        # Edits with more source images than the model family takes are filtered out (`_fits`).
        self.max_sources = max_sources
        if remote_retries < 0 or remote_backoff_s < 0:
            raise ValueError(f"remote_retries = {remote_retries}, remote_backoff_s = {remote_backoff_s}: both must be >= 0")
        # A remote shard that fails is opened again this many times, remote_backoff_s, then
        # twice that, ... apart, before it is given up (module docstring).
        self.remote_retries = remote_retries
        self.remote_backoff_s = remote_backoff_s

    def _fits(self, meta: Mapping) -> bool:
        """Whether an edit pair's source count is one the model family takes (a malformed
        count passes here and is skipped as bad_meta when the sample is read)."""
        count = ((meta.get("extra") or {}).get("edit") or {}).get("num_sources", 1)
        return not (isinstance(count, int) and count > self.max_sources)

    def _worker(self) -> tuple[int, int]:
        """(role, workers): this loader worker's place in the stage's stream. The
        DataLoader takes batches from workers 0, 1, ... in turn, so batch i of a rank is
        made by role i % workers; a stream that skips k batches starts with role
        k % workers, so worker w plays role (w + k) % workers."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (worker + self.skip_batches) % workers, workers

    def stream_seed(self) -> int:
        worker, _ = self._worker()
        return derive_seed(self.seed, self.stage_index, self.rank, worker)

    def _my_urls(self, name: str) -> list[str]:
        """This (rank, worker)'s shards of a source: a disjoint slice when there are at
        least as many shards as streams, else all of them (streams then differ by seed
        only, and may meet the same samples)."""
        urls = self.sources[name].urls
        worker, workers = self._worker()
        slots = self.world_size * workers
        if len(urls) >= slots:
            return urls[self.rank * workers + worker :: slots]
        return urls  # CurriculumDataModule.train_dataloader warns of this once

    def _samples(self, name: str, seed: int, skips: _SkipCounter, select=None) -> Iterator[dict]:
        """The flat WebDataset pipeline of one source (see the module docstring).

        A stream reads its own slice of the source's shards; if the slice holds
        (almost) no sample the stage admits (a rare text class, I2I pairs of text-free
        images, in a few small shards), the stream falls back to all of the source's
        shards with a warning, and only if those hold none either is it an error.
        """
        allowed = set(self.stage.text_classes)
        all_urls = self.sources[name].urls
        urls = self._my_urls(name)
        while True:
            try:
                yield from self._pipeline(name, urls, seed, skips, allowed, select)
            except _Starved:
                if len(urls) == len(all_urls):
                    raise ValueError(
                        f"stage {self.stage.name!r}: {_MAX_CONSECUTIVE_REJECTS} samples in a row from source {name!r} "
                        f"failed its filter (text classes {sorted(allowed)}); the source holds (almost) none that "
                        "it allows"
                    ) from None
                log.warning("stage %s: this stream's %d shards of source %s hold (almost) no sample the stage admits; "
                            "reading all %d shards (streams may meet the same samples)",
                            self.stage.name, len(urls), name, len(all_urls))
                urls = all_urls

    def _shard_reader(self, name: str, skips: _SkipCounter):
        """The stage from shard URLs to samples: random access for a local folder
        (`shard_reader.local_tar_samples`: images read only when decoded), a stream with
        retries (`remote_tar_samples`, then `unreachable_shard`) for a URL."""
        if not self.sources[name].remote:
            return functools.partial(local_tar_samples, handler=skips)
        return functools.partial(remote_tar_samples, skips=skips, retries=self.remote_retries,
                                 backoff_s=self.remote_backoff_s)

    def _pipeline(self, name: str, urls: list[str], seed: int, skips: _SkipCounter, allowed: set, select):
        rejected = [0]  # consecutive samples the filter refused

        def admit(sample: dict) -> bool:
            meta = read_meta(sample, skips)
            if meta is None:
                return False
            sample["meta"] = meta
            if meta.get("text_class") in allowed and (select is None or select(meta)):
                rejected[0] = 0
                return True
            rejected[0] += 1
            if rejected[0] > _MAX_CONSECUTIVE_REJECTS:
                raise _Starved()
            return False

        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=0, worker_seed=lambda: seed, deterministic=True),
            self._shard_reader(name, skips),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64), rng=random.Random(seed)),
            wds.select(admit),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[Batch]:
        keep_freed_memory()
        seed = self.stream_seed()
        rng = np.random.default_rng(seed)
        skips = _SkipCounter(self.max_skip_fraction)
        stage = self.stage
        streams: dict[str, Iterator[dict]] = {}
        for k, name in enumerate(n for n in SOURCES if stage.source_weights.get(n, 0) > 0):
            streams[name] = self._samples(name, derive_seed(seed, "source", k), skips)
        if stage.task_mix.get(Task.TI2I, 0) > 0:
            # Edits with more source images than the model family takes are filtered out
            # (a one-image editor cannot be shown "Picture 2"), like reconstructions here.
            streams[Task.TI2I.value] = self._samples(EDIT_SOURCE, derive_seed(seed, Task.TI2I.value), skips,
                                            select=lambda m: m.get("extra", {}).get("edit", {}).get("type") != "reconstruct"
                                            and self._fits(m))
        if stage.task_mix.get(Task.I2I, 0) > 0:
            streams[Task.I2I.value] = self._samples(EDIT_SOURCE, derive_seed(seed, Task.I2I.value), skips,
                                           select=lambda m: m.get("extra", {}).get("edit", {}).get("type") == "reconstruct"
                                           and self._fits(m))
        tasks = Interleave(stage.task_mix, rng)
        t2i_sources = Interleave(stage.source_weights, rng)
        sizes = stage.sizes()
        pending: dict[tuple[int, int], _Bucket] = {}
        pool = _ArrayPool()
        # A finite stream (one curriculum stage) splits its batches over the workers;
        # every rank yields the same count, so no rank waits at the stage's end.
        # Batch i of this rank is made by role i % workers (see _worker).
        role, workers = self._worker()

        def mine(count: int) -> int:  # of batches 0 .. count-1, those of this role
            return count // workers + (role < count % workers)

        skip = mine(self.skip_batches)
        remaining = None if self.num_batches is None else mine(self.skip_batches + self.num_batches) - skip
        while remaining is None or remaining > 0:
            task = next(tasks)
            name = next(t2i_sources) if task == Task.T2I else task
            sample = next(streams[name])
            item = self._item(sample, task, name, sizes, rng, skips, decode=skip == 0)
            if item is None:
                continue
            skips.seen += 1
            bucket = pending.get(item["size"])
            if bucket is None:
                bucket = pending[item["size"]] = _Bucket(self.batch_size, pool)
            bucket.add(item)
            if len(bucket.items) == self.batch_size:
                del pending[item["size"]]
                if skip > 0:
                    skip -= 1
                    if skip == 0:  # the samples drawn undecoded that later batches hold
                        pending = self._decode_pending(pending, sizes, rng, skips, pool)
                    continue
                yield self._collate(bucket, skips)
                if remaining is not None:
                    remaining -= 1

    def _decode_pending(self, pending: dict[tuple[int, int], "_Bucket"], sizes, rng,
                        skips: _SkipCounter, pool: "_ArrayPool") -> dict[tuple[int, int], "_Bucket"]:
        """The buckets with their samples decoded, once skipping to a resume point ends:
        the samples drawn undecoded that the batches after it hold. An undecodable one
        is skipped and counted now, one draw later than an uninterrupted run skips it."""
        decoded = {}
        for size, bucket in pending.items():
            decoded[size] = _Bucket(self.batch_size, pool)
            for drawn in bucket.items:
                item = self._item(drawn["sample"], drawn["task"], drawn["source"], sizes, rng, skips,
                                  dropped=drawn["dropped"])
                if item is not None:
                    decoded[size].add(item)
        return decoded

    def _item(self, sample: dict, task: str, name: str, sizes, rng, skips: _SkipCounter,
              decode: bool = True, dropped: bool | None = None) -> dict | None:
        """One sample, decoded to its bucket; `decode=False` (skipping to a resume
        point) makes the same draws and the same bucket choice without decoding, and
        keeps the sample and its draw (`dropped`: caption dropout) to decode it later."""
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        meta = sample["meta"]
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        load = ((lambda data, size: decode_image(member_bytes(data), size, self.reduced_decode, self.max_image_pixels))
                if decode else (lambda data, size: None))
        pair = task != Task.T2I  # an edit pair: instruction and source image
        encoded = None
        try:
            # width and height are positive ints: `admit` checked them.
            size = nearest_bucket(meta["width"], meta["height"], sizes)
            count = source_count(meta) if pair else 0
            members = [INSTRUCTION_EXTENSION if pair else CAPTION_EXTENSION]
            if self.precomputed:
                members.append(PRECOMPUTED_MEMBER)
            else:
                members += [ext] if ext is not None else ["jpg|png"]
                if pair:
                    members.append(f"{SOURCE_IMAGE_PREFIX}.{ext}")
                    members += [f"{prefix}.{ext}" for prefix in EXTRA_SOURCE_PREFIXES[: count - 1]]
            missing = [m for m in members if m not in sample]
            if missing:
                raise BadSample("missing_member", f"no {', '.join(missing)} member")
            try:
                prompt = member_bytes(sample[members[0]]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample("bad_caption", str(exc)) from None
            target = source = None
            extra = []
            if self.precomputed:
                encoded = from_bytes(member_bytes(sample[PRECOMPUTED_MEMBER])) if decode else {}
            else:
                target = load(sample[ext], size)
                if pair:
                    source = load(sample[f"{SOURCE_IMAGE_PREFIX}.{ext}"], size)
                    extra = [load(sample[f"{prefix}.{ext}"], size) for prefix in EXTRA_SOURCE_PREFIXES[: count - 1]]
        except BadSample as bad:  # undecodable image, missing member, ...: counted, not fatal
            skips.skip(bad.reason, f"{where}: {bad.detail}")
            return None
        except Exception as exc:  # anything else a sample's bytes provoke (a bad safetensors member)
            skips.skip(type(exc).__name__, where)
            return None
        if dropped is None:
            dropped = rng.random() < self.stage.caption_dropout
        if dropped:
            prompt = ""
        if encoded:  # the tensors of this sample's bucket, as the online encoder would give them
            try:
                encoded = for_bucket(encoded, size, dropped=dropped)
            except KeyError as exc:
                # The tag check at start-up makes this a shard that differs from its manifest.
                raise ValueError(f"{where}: precomputed tensors lack {exc.args[0]!r} (has {sorted(encoded)}); "
                                 "the shard does not match its manifest's precompute tag: precompute it again") from None
        return {
            "task": task, "target": target, "source_img": source, "extra_sources": extra, "num_sources": count,
            "prompt": prompt, "key": sample["__key__"],
            "source": EDIT_SOURCE if pair else name, "text_class": meta.get("text_class", ""), "size": size,
            "encoded": encoded, **({} if decode else {"sample": sample, "dropped": dropped}),
        }

    def _collate(self, bucket: "_Bucket", skips: _SkipCounter) -> Batch:
        bucket.finish()
        items = bucket.items
        has_source = torch.tensor([it["task"] != Task.T2I for it in items])
        target = source = encoded = None
        if self.precomputed:
            encoded = collate_encoded([it["encoded"] for it in items])
        else:
            # HWC images, as decoded; the BCHW view costs nothing.
            target = torch.from_numpy(bucket.target).permute(0, 3, 1, 2)
            if bucket.source is not None:  # some sample has a source image
                source = torch.from_numpy(bucket.source).permute(0, 3, 1, 2)
        extra = num_sources = None
        most = max(it["num_sources"] for it in items)
        if most > 1 and not self.precomputed:
            # Each sample's extra sources, padded with zero images to the batch's most.
            rows = [image for it in items
                    for image in [*it["extra_sources"], *[None] * (most - 1 - len(it["extra_sources"]))]]
            _, height, width, _ = bucket.target.shape
            extra = stack_images(rows).view(len(items), most - 1, height, width, 3).permute(0, 1, 4, 2, 3)  # [B, K, 3, H, W]
            num_sources = torch.tensor([it["num_sources"] for it in items])
        return Batch(
            task=[it["task"] for it in items], target_bchw=target, source_bchw=source, has_source=has_source,
            prompt=[it["prompt"] for it in items], key=[it["key"] for it in items], source=[it["source"] for it in items],
            text_class=[it["text_class"] for it in items], stage=self.stage.name, skipped=dict(skips.counts),
            worker=self._worker()[0], encoded=encoded, extra_sources_bkchw=extra, num_sources=num_sources,
        )


def remote_tar_samples(shards: Iterator[dict], *, skips: _SkipCounter, retries: int, backoff_s: float,
                       open_url=remote.open_url, sleep=time.sleep) -> Iterator[dict]:
    """Remote shards ({"url": ...}, as ResampledShards yields them) -> samples, grouped
    as `wds.tarfile_to_samples` groups them, with a transport failure retried.

    A shard is opened with `open_url`; when opening or reading fails for a reason other
    than corrupt tar content, it is opened again after `backoff_s`, 2 * `backoff_s`, ...
    (`retries` times), and the samples it already yielded are read past, not yielded
    again (a shard's bytes are the same on every read). Then it is given up: one
    `unreachable_shard` skip (one warning line), the rest of the shard is lost, and the
    next shard is read. A sample cut off by the failure is never yielded in part. Corrupt
    content over a transfer that succeeded is `bad_shard` (the handler), not retried.
    """
    for shard in shards:
        url = shard["url"]
        done = 0  # samples of this shard yielded so far, over every try
        for attempt in range(retries + 1):
            position = [0]  # samples of this try so far; below `done` they are read past

            def handler(exc: BaseException) -> bool:  # a duplicate member: counted once, not again on a retry
                return True if position[0] < done else skips(exc)

            try:
                for sample in _tar_samples(open_url(url), url, handler):
                    position[0] += 1
                    if position[0] > done:
                        done += 1
                        yield sample
                break
            except SkippedTooMany:
                raise
            except (tarfile.TarError, EOFError) as exc:  # the bytes arrived, and they are not a valid tar
                skips(exc)
                break
            except Exception as exc:
                if attempt < retries:
                    log.debug("remote shard %s failed (%s); trying again", url, remote.describe(exc))
                    sleep(backoff_s * 2 ** attempt)
                    continue
                skips.skip("unreachable_shard", f"{url}: given up after {retries + 1} tries, {done} samples read "
                           f"(the rest of the shard is lost this time): {remote.describe(exc)}")


def _tar_samples(stream, url: str, handler) -> Iterator[dict]:
    """One opened shard's samples (WebDataset's tar iterator and grouping). The stream is
    closed at the end, which is where a pipe's failed exit status shows, so a transfer
    that broke is reported as that, not as the truncated tar it left."""
    try:
        members = wds.tariterators.tar_file_iterator(stream)  # raises on any error: the caller decides
        yield from wds.tariterators.group_by_keys(({**m, "__url__": url} for m in members), handler=handler)
    except GeneratorExit:  # abandoned (the pipeline was dropped): stop a curl that is still writing
        remote.close_quietly(stream)
        raise
    except BaseException:
        stream.close()  # raises the transport error, if the transfer is what failed
        raise
    stream.close()


class _Bucket:
    """One aspect bucket's next batch, filled sample by sample.

    A decoded sample's images are copied into the batch's arrays as it arrives (while
    they are still in the CPU cache) and dropped, so a batch's pixels are copied once
    and held once. The arrays come from the stream's `_ArrayPool`; the rows of the
    source array that no sample of this batch wrote are zeros (`finish`: only the rows
    an earlier batch wrote are cleared; np.stack copied a blank image into each)."""

    def __init__(self, batch_size: int, pool: "_ArrayPool | None" = None):
        self.batch_size = batch_size
        self.pool = pool
        self.items: list[dict] = []
        self.target: np.ndarray | None = None  # uint8 [B, H, W, 3], with the first decoded sample
        self.source: np.ndarray | None = None  # uint8 [B, H, W, 3], with the first sample that has a source
        self.source_rows: set[int] = set()  # the rows of `source` written

    def add(self, item: dict) -> None:
        row = len(self.items)
        self.items.append(item)
        target, source = item.pop("target"), item.pop("source_img")
        if target is None:  # drawn undecoded (skipping to a resume point), or precomputed
            return
        if self.target is None:  # every row is written before the batch is yielded: no zeroing needed
            shape = (self.batch_size, *target.shape)
            self.target = self.pool.take("target", shape) if self.pool is not None else np.empty(shape, dtype=np.uint8)
        self.target[row] = target
        if source is not None:
            if self.source is None:  # rows without a source are zeros (`finish`)
                self.source = (self.pool.take("source", self.target.shape) if self.pool is not None
                               else np.zeros(self.target.shape, dtype=np.uint8))
            self.source[row] = source
            self.source_rows.add(row)

    def finish(self) -> None:
        """Before collation: the source rows this batch did not write are zeros."""
        if self.source is not None and self.pool is not None:
            self.pool.zero_stale_rows(self.source, self.source_rows)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc, once per process, to keep freed memory mapped (up to 256 MiB
    at the top of the heap; blocks up to 32 MiB from the heap, not mmap). A loader
    allocates and frees a few hundred KiB to a few MiB per image (Pillow's buffers, the
    packed pixels); with glibc's defaults each is handed back to the kernel and the next
    one faults its pages in again, zeroed: on a 2-core VM that was 10-25% of the loader's
    time (bench_loader.py; the same as MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_
    set in the environment). False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


class _ArrayPool:
    """Batch image arrays of one stream, reused once nothing outside the pool holds them.

    A fresh 12 MB array a batch (16 images at 512²) is memory the kernel must map and
    zero page by page as its rows are first written, several times the cost of copying
    a decoded image into a row of an array already mapped. Arrays come from torch's
    allocator (see `take`). An
    array goes back into use only when its reference count says that the pool alone
    holds it: a batch the consumer still holds (a prefetch queue, a tensor view, a
    training step) keeps its array, and a batch sent from a worker process has been
    copied into shared memory by then. At most `per_shape` arrays are kept per bucket
    and kind (one being filled, one the consumer holds: a worker's batches are copied
    into shared memory as they are sent, so two suffice there); past that a batch gets a
    fresh array that is not kept. The pool thus holds at most two batches' images per
    bucket beyond what the pending buckets hold anyway."""

    def __init__(self, per_shape: int = 2):
        self.per_shape = per_shape
        self.arrays: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
        self.written: dict[int, set[int]] = {}  # id of a kept array -> its rows that may be nonzero

    def take(self, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        """An array of `shape` for `kind` (target, source) that nobody else holds; its
        contents are an earlier batch's (`zero_stale_rows`)."""
        kept = self.arrays.setdefault((kind, shape), [])
        for i in range(len(kept)):
            # References: the list's, and getrefcount's own argument. Any other is a holder.
            if sys.getrefcount(kept[i]) == 2:
                return kept[i]
        # torch's allocator, not numpy's: numpy advises the kernel to back arrays over 4 MiB
        # with huge pages, and faulting in a 2 MiB page may stall on memory compaction (a
        # copy into such a row took 5-10x its time on the 2-core VM; bench_loader.py).
        array = torch.zeros(shape, dtype=torch.uint8).numpy()
        if len(kept) < self.per_shape:
            kept.append(array)
            self.written[id(array)] = set()
        return array

    def zero_stale_rows(self, array: np.ndarray, rows: set[int]) -> None:
        """`array` now holds data in `rows` only: rows an earlier batch wrote are zeroed."""
        written = self.written.get(id(array))
        if written is None:  # not kept: fresh zeros but for `rows`
            return
        for row in written - rows:
            array[row] = 0
        self.written[id(array)] = set(rows)


def stack_images(images: list[np.ndarray | None]) -> torch.Tensor:
    """Same-shape uint8 HWC images -> a uint8 tensor [N, H, W, 3], each copied once into
    it; a None is an image of zeros, which costs no copy (a batch's missing sources)."""
    shape = next(image.shape for image in images if image is not None)
    # np.zeros maps fresh zeroed pages instead of writing zeros; only the real rows are written.
    out = (np.zeros if any(image is None for image in images) else np.empty)((len(images), *shape), dtype=np.uint8)
    for row, image in zip(out, images):
        if image is not None:
            assert image.shape == shape, (image.shape, shape)  # one bucket per batch
            row[...] = image
    return torch.from_numpy(out)


def source_count(meta: Mapping) -> int:
    """Source images of an edit pair, from its metadata (extra["edit"]["num_sources"]; 1 when absent)."""
    edit = (meta.get("extra") or {}).get("edit") or {}
    count = edit.get("num_sources", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1 + len(EXTRA_SOURCE_PREFIXES):
        raise BadSample("bad_meta", f"extra.edit.num_sources = {count!r}")
    return count


def collate_encoded(items: list[dict[str, torch.Tensor]]) -> EncodedBatch:
    """Per-sample precomputed tensors (`for_bucket`) -> one `EncodedBatch`."""
    return EncodedBatch(samples=list(items))
