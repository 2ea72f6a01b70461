"""Fault injection for subprocess runs of the tests (tests/test_faults.py).

Python imports `sitecustomize` at start-up from PYTHONPATH; the tests put this folder
there, so every rank a strategy launches injects the same faults. Nothing happens
unless a QWENIMG_FAULT_* variable is set.

- QWENIMG_FAULT_NAN_STEPS=2,3  QWENIMG_FAULT_NAN_RANK=1: the loss is NaN at those
  global steps on that rank (all ranks when the rank is unset).
"""

import os
import sys

if os.environ.get("QWENIMG_FAULT_NAN_STEPS"):
    steps = {int(s) for s in os.environ["QWENIMG_FAULT_NAN_STEPS"].split(",")}
    only_rank = os.environ.get("QWENIMG_FAULT_NAN_RANK")

    from qwenimg_train.training import module

    real_step, real_loss = module.QwenImageModule.training_step, module.flow_matching_loss
    state = {}

    def training_step(self, batch, batch_idx):
        state["step"], state["rank"] = self.global_step, self.global_rank
        return real_step(self, batch, batch_idx)

    def flow_matching_loss(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        if state["step"] in steps and (only_rank is None or int(only_rank) == state["rank"]):
            print(f"fault injected: NaN loss at step {state['step']} on rank {state['rank']}", file=sys.stderr)
            return losses * float("nan")
        return losses

    module.QwenImageModule.training_step = training_step
    module.flow_matching_loss = flow_matching_loss

# - QWENIMG_FAULT_SIGNAL=KILL@step:3 (or TERM@step:3): the signal at global step 3, in
#   the middle of the step (after the forward pass, before backward), on rank
#   QWENIMG_FAULT_SIGNAL_RANK (default 0). TERM goes to the whole process group (as
#   SLURM sends it, loader workers included); KILL to this process.
# - QWENIMG_FAULT_SIGNAL=KILL@stage_switch:1: SIGKILL while the loader of curriculum
#   stage 1 is being built (the stage switch).
# - QWENIMG_FAULT_SIGNAL=KILL@save:3: SIGKILL half-way through writing the 3rd
#   checkpoint file of the run.
if os.environ.get("QWENIMG_FAULT_SIGNAL"):
    import signal

    spec = os.environ["QWENIMG_FAULT_SIGNAL"]
    sig_name, _, where = spec.partition("@")
    point, _, value = where.partition(":")
    sig = getattr(signal, f"SIG{sig_name}")
    fault_rank = int(os.environ.get("QWENIMG_FAULT_SIGNAL_RANK", "0"))

    def _fire(what: str) -> None:
        print(f"fault injected: SIG{sig_name} {what}", file=sys.stderr, flush=True)
        if sig == signal.SIGTERM:
            os.killpg(os.getpgrp(), sig)
        else:
            os.kill(os.getpid(), sig)

    if point == "step":
        from qwenimg_train.training import module as _module

        _real_step, _real_loss = _module.QwenImageModule.training_step, _module.flow_matching_loss
        _state = {"fired": False}

        def _training_step(self, batch, batch_idx):
            _state["step"], _state["rank"] = self.global_step, self.global_rank
            return _real_step(self, batch, batch_idx)

        def _loss(*args, **kwargs):
            losses = _real_loss(*args, **kwargs)
            if _state["step"] == int(value) and _state["rank"] == fault_rank and not _state["fired"]:
                _state["fired"] = True
                _fire(f"in the middle of step {value} on rank {fault_rank}")
            return losses

        _module.QwenImageModule.training_step = _training_step
        _module.flow_matching_loss = _loss
    elif point == "save":
        import lightning.fabric.plugins.io.torch_io as _torch_io

        _real_save, _calls = _torch_io._atomic_save, [0]

        def _dying_save(checkpoint, path):
            _calls[0] += 1
            if _calls[0] == int(value):  # the Nth checkpoint file: die half-way through writing it
                with open(path, "wb") as handle:
                    handle.write(b"half a checkpoint")
                _fire(f"half-way through writing checkpoint file {_calls[0]} ({path})")
            return _real_save(checkpoint, path)

        _torch_io._atomic_save = _dying_save
    elif point == "stage_switch":
        from qwenimg_train.data import datamodule as _cl

        _real_loader = _cl.CurriculumDataModule.train_dataloader

        def _train_dataloader(self):
            step = self.trainer.global_step if self.trainer is not None else 0
            if self.stage_at(step)[0] == int(value):
                _fire(f"while switching to stage {value} at step {step}")
            return _real_loader(self)

        _cl.CurriculumDataModule.train_dataloader = _train_dataloader
