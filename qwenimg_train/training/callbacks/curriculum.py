"""The curriculum stage in logs and checkpoints.

Logs `curriculum/stage` (index), `curriculum/step_in_stage` and
`data/skipped/<reason>` every step, reports stage changes, and keeps the stage in the
checkpoint to detect a curriculum that changed between a run and its resume. The
stage itself follows from the global step (qwenimg_train.data.datamodule): nothing
here decides it.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl

from qwenimg_train.data.datamodule import CurriculumDataModule

log = logging.getLogger(__name__)


class CurriculumCallback(pl.Callback):
    """Logs the active stage every step and keeps it in checkpoints."""

    def __init__(self, datamodule: CurriculumDataModule):
        self.datamodule = datamodule
        self.stage_index: int | None = None
        self.skipped: dict[int, dict[str, int]] = {}  # latest cumulative counts per loader worker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index, start, _ = self.datamodule.stage_at(trainer.global_step)
        if index != self.stage_index:
            stage = self.datamodule.curriculum.stages[index]
            log.info("curriculum: stage %d (%s) from step %d", index, stage.name, trainer.global_step)
            self.stage_index = index
        pl_module.log("curriculum/stage", float(index), on_step=True, on_epoch=False, batch_size=len(batch))
        pl_module.log("curriculum/step_in_stage", float(trainer.global_step - start), on_step=True, on_epoch=False,
                      batch_size=len(batch))
        # data/skipped/<reason>: bad samples skipped so far in this stage, summed over workers.
        self.skipped[batch.worker] = batch.skipped
        totals: dict[str, int] = {}
        for counts in self.skipped.values():
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            pl_module.log(f"data/skipped/{reason}", float(n), on_step=True, on_epoch=False, batch_size=len(batch))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.skipped = {}  # a new stage, a new stream: its workers count from zero

    def state_dict(self) -> dict[str, Any]:
        names = [s.name for s in self.datamodule.curriculum.stages]
        return {"stage_index": self.stage_index, "stages": names, "curriculum": self.datamodule.curriculum.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = [s.name for s in self.datamodule.curriculum.stages]
        if state_dict.get("stages") != names:
            log.warning(
                "resuming with another curriculum (%s, stages %s) than the checkpoint's (%s, stages %s): "
                "the stage follows from the global step under the new one",
                self.datamodule.curriculum.name, names, state_dict.get("curriculum"), state_dict.get("stages"),
            )
