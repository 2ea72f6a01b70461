"""Lightning glue for the curriculum: the stage-aware data module.

Each curriculum stage is one Lightning epoch. The data module's `train_dataloader`
(reloaded every epoch) builds the stream of the stage that contains the current
global step, finite: it yields exactly the batches left in that stage (times the
gradient-accumulation factor), the same count on every rank. When it ends, Lightning
starts the next epoch and the next stage's stream is built. A resumed run restarts
from its global step: the stage follows from the step, and the stage's stream skips
the batches the run already trained on (`StageStream.skip_batches`), so it continues
with exactly the batches an uninterrupted run would have seen.

The stage callback (qwenimg_train.training.callbacks.curriculum) logs the stage and
keeps it in checkpoints. A stage's `caption_dropout` is applied by its stream; its
`lr_scale` by the module's scheduler through `CurriculumDataModule.lr_scale_at` (a
LambdaLR factor).
"""

from __future__ import annotations

import logging
import weakref
from typing import Mapping

import lightning.pytorch as pl
import torch

from data_pipelines.core.config import redact_text
from qwenimg_train.data.curriculum import Curriculum
from qwenimg_train.data.loader import MAX_IMAGE_PIXELS, SourceShards, StageStream

log = logging.getLogger(__name__)


class CurriculumDataModule(pl.LightningDataModule):
    def __init__(
        self,
        *,
        curriculum: Curriculum,
        sources: Mapping[str, str],
        batch_size: int,
        total_steps: int,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 256,
        max_skip_fraction: float = 0.01,
        accumulate_grad_batches: int = 1,
        precomputed: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_sources: int = 1,
        remote_retries: int = 3,
        remote_backoff_s: float = 2.0,
    ):
        super().__init__()
        self.curriculum = curriculum
        self.source_dirs = dict(sources)
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_skip_fraction = max_skip_fraction
        self.accumulate = accumulate_grad_batches
        self.precomputed = precomputed
        self.max_image_pixels = max_image_pixels
        self.max_sources = max_sources  # source images an edit may have (the model family's)
        self.remote_retries = remote_retries  # tries after a remote manifest or shard fails (loader docstring)
        self.remote_backoff_s = remote_backoff_s
        self.sources: dict[str, SourceShards] = {}
        self._shared_warned = False

    def setup(self, stage: str | None = None) -> None:
        # Only the sources some stage draws from must exist: a configured folder that
        # no stage uses (natural, at weight 0 by default) may be absent. A source is a
        # folder or a URL (SourceShards.from_location).
        needed = self.curriculum.required_sources
        self.sources = {}
        for name, path in self.source_dirs.items():
            if name not in needed:
                continue
            try:
                self.sources[name] = SourceShards.from_location(name, path, retries=self.remote_retries,
                                                                backoff_s=self.remote_backoff_s)
            except ValueError as exc:
                # the location, as a user wrote it, may carry a credential
                raise ValueError(redact_text(f"data.sources.{name} = {str(path)!r}: {exc}")) from None
        self.curriculum.check_sources({name: s.manifest for name, s in self.sources.items()})

    def check_precomputed(self, expected) -> None:
        """Every source a stage reads holds precomputed inputs made as this run would
        encode (`expected`, a PrecomputeTag), at every bucket set a stage trains at, with
        the empty-prompt encodings a stage with caption dropout needs. Called before
        training starts; an error names the folder, both tags and the fix."""
        from data_pipelines.core.precomputed import PrecomputeTag

        if not self.sources:  # train() has read the manifests already
            self.setup()
        for name, source in self.sources.items():
            where = f"data.sources.{name} = {self.source_dirs[name]!r}"
            tag = PrecomputeTag.from_manifest(source.manifest, where)
            tag.check_against(expected, where)
            for stage in self.curriculum.stages:
                if not stage.reads(name):
                    continue
                tag.check_buckets(stage.name, stage.sizes(), where)
                if stage.caption_dropout > 0 and not tag.null_prompts:
                    raise ValueError(f"stage {stage.name!r} has caption_dropout {stage.caption_dropout}, but {where} "
                                     "was precomputed with null_prompts=false: precompute with null_prompts=true "
                                     "or set the stage's caption_dropout to 0")

    def lr_scale_at(self, step: int) -> float:
        """The learning-rate multiplier of the stage active at `step`.

        Made for `torch.optim.lr_scheduler.LambdaLR` (stepped every optimizer step),
        alone or multiplied into a warm-up/decay lambda, so the scale composes with
        the schedule instead of fighting it:
            LambdaLR(optimizer, lambda step: warmup(step) * datamodule.lr_scale_at(step))
        """
        return self.curriculum.stages[self.stage_at(step)[0]].lr_scale

    def stage_at(self, step: int) -> tuple[int, int, int]:
        """(stage index, first step, end step) of the stage active at `step`."""
        starts = self.curriculum.boundaries(self.total_steps)
        index = self.curriculum.stage_index(step, self.total_steps)
        end = starts[index + 1] if index + 1 < len(starts) else self.total_steps
        return index, starts[index], end

    def stage_ending_at(self, step: int) -> int | None:
        """The index of the stage whose last step is `step` (counted as optimizer steps
        done), or None: for stage-end checkpoints and evaluations."""
        if step <= 0:
            return None
        index, _, end = self.stage_at(step - 1)
        return index if end == step else None

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if rank == 0 and not self._shared_warned:  # the same on every rank, stage and worker: said once
            self._shared_warned = True
            streams = world * max(1, self.num_workers)
            for name, source in self.sources.items():
                if len(source.urls) < streams:
                    log.warning("source %s has %d shards for %d streams (ranks x loader workers): streams share "
                                "shards and differ by seed only", name, len(source.urls), streams)
        index, start, end = self.stage_at(step)
        stream = StageStream(
            stage=self.curriculum.stages[index], stage_index=index, sources=self.sources,
            batch_size=self.batch_size, seed=self.seed, rank=rank, world_size=world,
            skip_batches=(step - start) * self.accumulate,
            shuffle_buffer=self.shuffle_buffer, max_skip_fraction=self.max_skip_fraction,
            num_batches=max(1, end - step) * self.accumulate, precomputed=self.precomputed,
            max_image_pixels=self.max_image_pixels, max_sources=self.max_sources,
            remote_retries=self.remote_retries, remote_backoff_s=self.remote_backoff_s,
        )
        from qwenimg_train.training.callbacks.graceful_stop import ignore_sigterm

        return _StageLoader(stream, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=ignore_sigterm if self.num_workers else None)

    def shutdown_workers(self) -> None:
        """End every loader worker process still running. Training calls it when `fit`
        ends, however it ends: an error raised while reading (SkippedTooMany, a bad
        config) leaves the stream's iterator referenced by the error's traceback, so
        torch never shuts its workers down, and the workers ignore SIGTERM
        (`ignore_sigterm`), so the interpreter's exit would wait for them forever."""
        _StageLoader.shutdown_all()


class _StageLoader(torch.utils.data.DataLoader):
    """A DataLoader that remembers (weakly) the worker iterators it starts, so that they
    can be ended when training stops on an error (`CurriculumDataModule.shutdown_workers`)."""

    _live: "weakref.WeakSet" = weakref.WeakSet()

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers:
            _StageLoader._live.add(iterator)
        return iterator

    @classmethod
    def shutdown_all(cls) -> None:
        for iterator in list(cls._live):
            iterator._shutdown_workers()  # torch's own, what its __del__ calls (idempotent); see compat
        cls._live.clear()

