"""The curriculum stage in logs and checkpoints.

Logs `curriculum/stage` (index), `curriculum/step_in_stage` and
`data/skipped/<reason>` (summed over loader workers and ranks) every step, reports stage
changes, and keeps the stage (and the skips per stage, for the run summary) in the
checkpoint to detect a curriculum that changed between a run and its resume. The
stage itself follows from the global step (qwenimg_train.data.datamodule): nothing
here decides it.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from data_pipelines.core.untrusted import SKIP_REASONS
from qwenimg_train.data.datamodule import CurriculumDataModule

log = logging.getLogger(__name__)


class CurriculumCallback(pl.Callback):
    """Logs the active stage every step and keeps it in checkpoints."""

    def __init__(self, datamodule: CurriculumDataModule):
        self.datamodule = datamodule
        self.stage_index: int | None = None
        self.skipped: dict[int, dict[str, int]] = {}  # latest cumulative counts per loader worker
        # the run summary's `data_skipped`: stage name -> reason -> samples, every rank's
        self.skipped_by_stage: dict[str, dict[str, int]] = {}
        self._before_resume: dict[str, dict[str, int]] = {}  # counted before the checkpoint resumed from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index, start, _ = self.datamodule.stage_at(trainer.global_step)
        if index != self.stage_index:
            stage = self.datamodule.curriculum.stages[index]
            log.info("curriculum: stage %d (%s) from step %d", index, stage.name, trainer.global_step)
            self.stage_index = index
        pl_module.log("curriculum/stage", float(index), on_step=True, on_epoch=False, batch_size=len(batch))
        pl_module.log("curriculum/step_in_stage", float(trainer.global_step - start), on_step=True, on_epoch=False,
                      batch_size=len(batch))
        # data/skipped/<reason>: bad samples skipped so far in this stage, summed over workers
        # and ranks (the loggers write rank 0's values: a skip on another rank would not show).
        self.skipped[batch.worker] = batch.skipped
        totals = self.stage_skips(trainer)
        if totals:
            name = self.datamodule.curriculum.stages[index].name
            before = self._before_resume.get(name, {})
            self.skipped_by_stage[name] = {r: before.get(r, 0) + totals.get(r, 0) for r in {*before, *totals}}
        for reason, n in totals.items():
            pl_module.log(f"data/skipped/{reason}", float(n), on_step=True, on_epoch=False, batch_size=len(batch))

    def stage_skips(self, trainer) -> dict[str, int]:
        """The skips of this stage so far, by reason, over every worker of every rank. With
        several ranks this is a collective (one all-reduce of len(SKIP_REASONS) counts):
        every rank calls it at the same point of each step."""
        reasons = list(SKIP_REASONS)
        counts = torch.zeros(len(reasons), dtype=torch.float64)
        for worker_counts in self.skipped.values():
            for reason, n in worker_counts.items():
                counts[reasons.index(reason)] += n
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            counts = trainer.strategy.reduce(counts.to(device), reduce_op="sum").cpu()
        return {reason: int(n) for reason, n in zip(reasons, counts.tolist()) if n}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.skipped = {}  # a new stage, a new stream: its workers count from zero

    def state_dict(self) -> dict[str, Any]:
        names = [s.name for s in self.datamodule.curriculum.stages]
        return {"stage_index": self.stage_index, "stages": names, "curriculum": self.datamodule.curriculum.name,
                "skipped_by_stage": self.skipped_by_stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = [s.name for s in self.datamodule.curriculum.stages]
        # a resumed stage's stream counts from zero again: its skips add to the checkpoint's
        self.skipped_by_stage = {k: dict(v) for k, v in state_dict.get("skipped_by_stage", {}).items()}
        self._before_resume = {k: dict(v) for k, v in self.skipped_by_stage.items()}
        if state_dict.get("stages") != names:
            log.warning(
                "resuming with another curriculum (%s, stages %s) than the checkpoint's (%s, stages %s): "
                "the stage follows from the global step under the new one",
                self.datamodule.curriculum.name, names, state_dict.get("curriculum"), state_dict.get("stages"),
            )
