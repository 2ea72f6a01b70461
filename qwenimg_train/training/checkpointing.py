"""Checkpoints that are never half-written.

Lightning's ModelCheckpoint writes straight to the final path: a job killed during
the save (pre-emption, an out-of-memory kill) leaves a truncated `last.ckpt` that no
resume can load. `AtomicModelCheckpoint` writes every checkpoint (a file, or a
DeepSpeed ZeRO-3 directory with one shard per rank) to a temporary sibling, waits for
every rank, and only then renames it into place. Replacing an existing path renames
the old one aside first and deletes it after; `resolve_checkpoint` falls back to that
aside copy if a crash hit between the two renames. A shared file system across nodes
is assumed (as for any sharded checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished checkpoint into place (rank 0 only)."""
    if tmp.is_file() and not final.is_dir():
        os.replace(tmp, final)  # atomic for files
        return
    old = final.with_name(final.name + OLD_SUFFIX)
    _remove(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _remove(old)


def resolve_checkpoint(path: Path) -> Path | None:
    """`path`, or its aside copy when a crash came between the two renames of a replace."""
    if path.exists():
        return path
    old = path.with_name(path.name + OLD_SUFFIX)
    return old if old.exists() else None


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
            _remove(tmp)  # a leftover of an interrupted save
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
                _remove(tmp)
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


class StopAtStep(Callback):
    """End the run after optimizer step `step`, writing `last.ckpt` first; the LR
    schedule and the curriculum still follow trainer.max_steps. For time-sliced jobs
    (run a slice, resume with ckpt_path=last) and the resume tests."""

    def __init__(self, step: int):
        if step < 1:
            raise ValueError(f"callbacks.stop_at_step = {step} must be >= 1")
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not trainer.should_stop:
            _save_last(trainer)
            trainer.should_stop = True


def _save_last(trainer) -> None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


class GracefulStop(Callback):
    """SIGTERM (what SLURM sends before pre-emption or at the time limit, what torchrun
    and Kubernetes send to stop a job) ends the run at the next step boundary with a
    final `last.ckpt`, and the process exits normally, so its launcher can requeue it
    and `ckpt_path=last` resumes exactly (launch/slurm/train.sbatch does).

    Lightning's own handler stops without a checkpoint, so this one replaces it for the
    run. The signal may reach one rank only (a Lightning-launched rank 0, say): the ranks
    agree at each step end (one small all-reduce) and stop together. Loader workers
    ignore the signal (`ignore_sigterm`, their worker_init_fn) so that a signal sent to
    the whole process group does not kill them under the step that is still running.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True  # acted on at the step end: never save from inside a handler

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its handlers (in Trainer._run); restored at teardown.
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.requested, all=False)
        if stop and not trainer.should_stop:
            log.warning("SIGTERM: saving last.ckpt at step %d and stopping (resume with ckpt_path=last)",
                        trainer.global_step)
            _save_last(trainer)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: a group-wide SIGTERM is the trainer's to handle (GracefulStop);
    workers end when the loader shuts them down or their parent exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
