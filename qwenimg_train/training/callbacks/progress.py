"""The training progress bar, labelled with the curriculum stage.

Each stage is one Lightning epoch (qwenimg_train.data.datamodule) and `max_epochs` is
-1, so Lightning's own label reads "Epoch 2/-2". This bar, Lightning's Rich bar (its
default where `rich` is installed, a dependency here), shows "stage 3/3
complex_layout" instead.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def stage_label(trainer) -> str | None:
    """"stage i/n name" of the trainer's curriculum data module at its global step."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "stage_at"):
        return None
    stages = datamodule.curriculum.stages
    index = datamodule.stage_at(trainer.global_step)[0]
    return f"stage {index + 1}/{len(stages)} {stages[index].name}"


class StageProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:  # compat.PRIVATE_NAMES
        return stage_label(self.trainer) or super()._get_train_description(current_epoch)
