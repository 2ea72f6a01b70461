"""End a run after a given optimizer step, with a final `last.ckpt`."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from qwenimg_train.training.callbacks.checkpoint import save_last


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
            save_last(trainer)
            trainer.should_stop = True
