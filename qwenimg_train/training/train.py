"""`qwenimg-train`: the training entry point (a Hydra app over configs/train.yaml).

    qwenimg-train experiment=smoke                       the embedded default
    qwenimg-train experiment=smoke trainer.max_steps=30 paths.output_dir=outputs/x
    qwenimg-train model=qwen_image_edit model.pretrained_path=/data/Qwen-Image-Edit ...
    qwenimg-train ... ckpt_path=last                     resume the run in paths.output_dir

`train(cfg)` is the configuration boundary: the composed config becomes one validated
`TrainConfig` (qwenimg_train.config.schema), and a short list of builders
(qwenimg_train.training.builders) turns it into the run. The resolved config is saved
with each checkpoint and as `<output_dir>/config.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qwenimg_train.config import config_dir  # noqa: F401  (tests and tools compose from here)
from qwenimg_train.config.schema import TrainConfig
from qwenimg_train.training import builders


def train(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run a training job from a composed config; returns the run summary."""
    import lightning.pytorch as pl

    config = TrainConfig.from_mapping(cfg)  # every key validated before any work
    saved = builders.saved_config(cfg)
    out = builders.prepare_run_dir(config, saved)
    pl.seed_everything(config.seed, workers=True)
    datamodule = builders.build_datamodule(config)
    callbacks = builders.build_callbacks(config.callbacks, datamodule=datamodule, output_dir=out,
                                         scheduler_dir=Path(config.model.pretrained_path) / "scheduler",
                                         family=config.model.family)
    encoders = builders.build_encoders(config, datamodule)
    loggers = builders.build_loggers(config, saved)
    module = builders.build_module(config, encoders, datamodule, saved)
    trainer = builders.build_trainer(config, callbacks.all, loggers, out)
    with builders.closing_loggers(loggers, trainer):
        try:
            # weights_only: a checkpoint is tensors and plain containers, never code to run on load
            trainer.fit(module, datamodule=datamodule, weights_only=True,
                        ckpt_path=builders.resolve_ckpt(config.ckpt_path, out / "checkpoints"))
        finally:
            datamodule.shutdown_workers()  # after an error too: otherwise the exit waits on them
    return builders.write_summary(config, trainer, callbacks, out)


def end_process_group() -> None:
    """After a run that finished on every rank: the ranks meet at a barrier and end their
    process group together, in Python, rather than each at its interpreter's exit
    (Lightning's atexit hook), where a rank was seen to abort once in gloo's teardown
    ("terminate called without an active exception", exit -6) after a complete run.
    Every rank of the run must call it: `qwenimg-train` after train(), and a sweep job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    from qwenimg_train.cli import train as main

    main()
