"""Non-finite losses and gradients: skip the update, count it, stop when it persists.

A long run meets the odd batch whose loss or gradients overflow (a bf16 overflow, a
degenerate sample, a bad learning-rate spike). Applying that update poisons every
weight; stopping the run for one batch wastes the allocation. So:

- the update of a step whose gradients hold an inf or NaN is skipped: the weights and
  optimizer state stay as they were, the batch counts as consumed (the data stream and
  the schedule move on, so a resumed run stays aligned);
- every skip is counted (`train/nonfinite_skipped`, and in the run summary);
- after `max_consecutive` skipped steps in a row the run saves a checkpoint (the last
  good weights: the skipped steps changed nothing) and stops with an error naming the
  step, the curriculum stage and the batch's sample keys.

How a step is skipped depends on who applies it. With torch's optimizer (one process,
DDP) this callback checks the gradients after backward (DDP has already averaged them,
so every rank decides alike) and drops them: AdamW leaves a parameter without a
gradient untouched. Under DeepSpeed ZeRO-3 the gradients live in the partitions and
DeepSpeed itself skips the step when the all-reduced gradient norm is not finite
(0.19.8, which the Makefile installs: `is_invalid_grad_norm` in its stage-3 `step`, for
every dtype) and counts it in `engine.skipped_steps`; this callback reads that verdict
through `strategies.optimizer_step_skipped`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradients."""


class NonFiniteGuard(pl.Callback):
    def __init__(self, *, max_consecutive: int = 5, checkpoint_dir: str | None = None):
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive = {max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.skipped = 0  # in the whole run (kept in checkpoints)
        self.in_a_row = 0
        self._dropped = False
        self._batch: tuple[str, list[str]] = ("", [])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = (getattr(batch, "stage", ""), list(getattr(batch, "key", [])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # One fused norm and one device sync for all gradients (an inf or NaN anywhere
        # makes the total norm non-finite), not a sync per parameter.
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            for p in pl_module.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: no update at all
            self._dropped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from qwenimg_train.parallel.strategies import optimizer_step_skipped

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        nonfinite_loss = loss is not None and not math.isfinite(float(loss))
        skipped = self._dropped or optimizer_step_skipped(trainer)
        self._dropped = False
        bad = skipped or nonfinite_loss
        self.skipped += bad
        self.in_a_row = self.in_a_row + 1 if bad else 0
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if not bad:
            return
        step = trainer.global_step - 1  # the step just taken (or skipped)
        stage, keys = self._batch
        log.warning("step %d (stage %s): non-finite %s, update skipped (%d in a row, %d in the run); batch keys %s",
                    step, stage, "loss" if nonfinite_loss else "gradients", self.in_a_row, self.skipped, keys)
        if self.in_a_row >= self.max_consecutive:
            path = self._save(trainer, step)
            raise NonFiniteLossError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradients (the last: step {step}, stage "
                f"{stage!r}, batch keys {keys}); no update was applied, the last good weights are in {path}. Lower "
                "optim.lr or raise optim.warmup_steps, check those samples, or raise callbacks.nonfinite.max_consecutive"
            )

    def _save(self, trainer, step: int) -> str:
        from qwenimg_train.training.checkpointing import TMP_SUFFIX, replace_path

        folder = Path(self.checkpoint_dir or trainer.default_root_dir)
        final = folder / f"nonfinite-step{step:06d}.ckpt"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        trainer.save_checkpoint(str(tmp))
        trainer.strategy.barrier("nonfinite_checkpoint_written")
        if trainer.is_global_zero:
            replace_path(tmp, final)
        trainer.strategy.barrier("nonfinite_checkpoint_moved")
        return str(final)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
