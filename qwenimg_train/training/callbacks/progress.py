"""The training progress bar, labelled with the curriculum stage.

Each stage is one Lightning epoch (qwenimg_train.data.datamodule) and `max_epochs` is
-1, so Lightning's own label reads "Epoch 2/-2". This bar, Lightning's Rich bar (its
default where `rich` is installed, a dependency here), shows "stage 2 complex_layout"
instead: the stage index of the logs, the `curriculum/stage` metric and the stage-end
checkpoints' names.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def stage_label(trainer) -> str | None:
    """"stage <index> <name>" of the trainer's curriculum data module at its global step."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "stage_at"):
        return None
    index = datamodule.stage_at(trainer.global_step)[0]
    return f"stage {index} {datamodule.curriculum.stages[index].name}"


class StageProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:  # compat.PRIVATE_NAMES
        return stage_label(self.trainer) or super()._get_train_description(current_epoch)
