"""Checkpoint callbacks whose saves are never half-written.

Lightning's ModelCheckpoint writes straight to the final path: a job killed during
the save (pre-emption, an out-of-memory kill) leaves a truncated `last.ckpt` that no
resume can load. `AtomicModelCheckpoint` writes every checkpoint to a temporary
sibling, waits for every rank, and only then renames it into place
(`qwenimg_train.training.checkpointing`). `StageEndCheckpoint` adds one checkpoint at
the end of every curriculum stage.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qwenimg_train import compat
from qwenimg_train.training.checkpointing import TMP_SUFFIX, remove_path, replace_path


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder); the earlier ones are intact."""


@contextlib.contextmanager
def _collect_write_errors(trainer, errors: list[BaseException]):
    """Record an OSError of Lightning's file writer instead of raising it, so that the
    writing rank still meets the other ranks at Lightning's barrier after the write; the
    ranks then decide together (AtomicModelCheckpoint)."""
    io = trainer.strategy.checkpoint_io
    original = io.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except OSError as exc:
            errors.append(exc)

    io.save_checkpoint = save_checkpoint
    try:
        yield
    finally:
        del io.save_checkpoint  # back to the class's method


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saves (periodic, stage-end and `last`) are atomic.

    A write that fails (disk full, an unwritable or vanished folder) removes its
    temporary file and stops the run with `CheckpointWriteError`, naming the path, the
    cause and the checkpoints that remain: nothing already saved is touched, and the
    run resumes from them (`ckpt_path=last`) once there is space.
    """

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        final = Path(trainer.strategy.broadcast(filepath))
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if trainer.is_global_zero:
            remove_path(tmp)  # a leftover of an interrupted save
        trainer.strategy.barrier("atomic_checkpoint_clean")
        errors: list[BaseException] = []
        with _collect_write_errors(trainer, errors):
            try:
                trainer.save_checkpoint(str(tmp), self.save_weights_only)
                if tmp.is_dir():  # a sharded checkpoint: callbacks with per-rank state add their shards
                    for callback in trainer.callbacks:
                        if hasattr(callback, "save_shard"):
                            callback.save_shard(tmp)
            except OSError as exc:  # DeepSpeed's own writers, the shard files
                errors.append(exc)
        if trainer.strategy.reduce_boolean_decision(bool(errors), all=False):
            if trainer.is_global_zero:
                remove_path(tmp)
            trainer.strategy.barrier("atomic_checkpoint_failed")
            kept = sorted(p.name for p in final.parent.glob("*.ckpt")) if final.parent.is_dir() else []
            cause = f"{type(errors[0]).__name__}: {errors[0]}" if errors else "the write failed on another rank"
            raise CheckpointWriteError(
                f"could not write checkpoint {final} at step {trainer.global_step} ({cause}). The earlier checkpoints "
                f"are intact ({', '.join(kept) or 'none yet'}); free space or point paths.output_dir at a writable "
                "disk, then resume with ckpt_path=last") from (errors[0] if errors else None)
        trainer.strategy.barrier("atomic_checkpoint_written")
        if trainer.is_global_zero:
            replace_path(tmp, final)
        trainer.strategy.barrier("atomic_checkpoint_moved")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class StageEndCheckpoint(AtomicModelCheckpoint):
    """A checkpoint when a curriculum stage (one epoch) ends at its last step; an
    epoch cut short by a stop (StopAtStep, a signal) is not a stage end."""

    def __init__(self, *, stage_ending_at, **kwargs):
        super().__init__(every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True, **kwargs)
        self.stage_ending_at = stage_ending_at  # step -> index of the stage that ends there, or None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.stage_ending_at(trainer.global_step) is not None:
            super().on_train_epoch_end(trainer, pl_module)

    def _monitor_candidates(self, trainer):
        # `{stage}` in the file name: the curriculum stage (Lightning's epoch counter
        # is not one after a resume).
        candidates = super()._monitor_candidates(trainer)
        stage = self.stage_ending_at(trainer.global_step)
        candidates["stage"] = torch.tensor(stage if stage is not None else -1)
        return candidates


def save_last(trainer) -> None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            compat.save_last_checkpoint(callback, trainer)
