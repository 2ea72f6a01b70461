"""The builders `train()` is made of: each takes the typed config (or the part it needs)
and returns one object of the run, with explicit arguments below it.

    TrainConfig -> run directory -> data module -> frozen encoders -> callbacks
                -> loggers -> LightningModule (the model is built in configure_model)
                -> Trainer (with the strategy) -> fit -> summary.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf

from data_pipelines.core.config import redact_secrets
from data_pipelines.core.files import atomic_write_text
from qwenimg_train import compat
from qwenimg_train.config.schema import CallbacksConfig, ModelConfig, TrainConfig
from qwenimg_train.data.datamodule import CurriculumDataModule
from qwenimg_train.models import get_family

log = logging.getLogger("qwenimg-train")


def _launcher_rank() -> int:
    """This process's global rank as its launcher set it before any Trainer exists:
    torchrun's RANK, srun's SLURM_PROCID, or LOCAL_RANK of the ranks Lightning starts
    itself on one node; 0 for a process started alone."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def prepare_run_dir(cfg: TrainConfig, saved: dict[str, Any]) -> Path:
    """The run directory, checked writable before any heavy work, with the resolved
    (secret-free) config written once, by rank 0, atomically, as `config.yaml`."""
    out = Path(cfg.paths.output_dir)
    try:  # a run that cannot write its checkpoints is pointless
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"paths.output_dir = {str(out)!r} is not writable ({type(exc).__name__}: {exc}); "
                         "point it at a folder you can write to") from None
    # Lightning relaunches the ranks of a DDP / DeepSpeed run with this process's command
    # line, which would recompose `${now:...}` into another directory: configs/paths reads
    # this variable first, so every rank resolves the directory the first process chose.
    os.environ["QWENIMG_RUN_DIR"] = str(out)
    if _launcher_rank() == 0:  # one writer on a shared file system, and never a half-written file
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(saved)))
    return out


def build_datamodule(cfg: TrainConfig) -> CurriculumDataModule:
    """The stage-aware data module, with every shard folder a stage reads checked now
    (before any model loads)."""
    data = cfg.data
    datamodule = CurriculumDataModule(
        curriculum=cfg.curriculum, sources=data.sources, batch_size=data.batch_size,
        total_steps=cfg.trainer.max_steps, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        num_workers=data.num_workers, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
        max_skip_fraction=data.max_skip_fraction, precomputed=data.precomputed,
        max_image_pixels=data.max_image_pixels, max_sources=get_family(cfg.model.family).max_sources,
        remote_retries=data.remote_retries, remote_backoff_s=data.remote_backoff_s)
    datamodule.setup()
    return datamodule


def precomputed_tag(cfg: ModelConfig):
    """The precompute tag this run's model folder and encoder settings give: precomputed
    shards must carry the same."""
    from data_pipelines.core.precomputed import PrecomputeTag

    family = get_family(cfg.family)
    family.check_folder(cfg.pretrained_path)
    return PrecomputeTag.for_model(cfg.pretrained_path, family=family, dtype=cfg.encoder_dtype,
                                   max_sequence_length=cfg.max_sequence_length)


def build_encoders(cfg: TrainConfig, datamodule: CurriculumDataModule):
    """The frozen encoders, loaded before the Trainer exists (outside any sharded-init
    context, so ZeRO-3 never partitions them); None when the data is precomputed (the
    shards carry their outputs, checked against this run's model folder by the tag) and no
    OCR evaluation needs them to generate images."""
    model = cfg.model
    family = get_family(model.family)
    if model.build_tiny:
        family.build_tiny(model.pretrained_path, variant=model.pipeline_class, world=model.tiny_world)
    if cfg.data.precomputed:
        datamodule.check_precomputed(precomputed_tag(model))
        if cfg.callbacks.ocr_eval is None:
            return None
        # Training reads the shards' encoder outputs; generating images still needs the encoders.
        log.info("data.precomputed=true with callbacks.ocr_eval: the frozen encoders are loaded for the "
                 "evaluation only (callbacks.ocr_eval=null keeps them off this machine)")
    encoders = family.load_encoders(model.pretrained_path, dtype=model.encoder_dtype,
                                    max_sequence_length=model.max_sequence_length)
    edit_stages = [s.name for s in cfg.curriculum.stages if s.needs_edit_pairs]
    if edit_stages and encoders.processor is None:
        raise ValueError(f"stages {edit_stages} train TI2I/I2I, but {model.pretrained_path!r} has no processor/ "
                         "(a T2I checkpoint): use a Qwen-Image-Edit folder, or stages with task_mix {t2i: 1.0}")
    return encoders


def build_model(cfg: ModelConfig, encoders, rank: int = 0):
    """The model, called from `QwenImageModule.configure_model`: inside the strategy's
    sharded-init context where there is one, so the strategy layer builds the transformer
    partitioned as it is constructed (qwenimg_train.parallel.sharding)."""
    from qwenimg_train.parallel import sharding

    if rank == 0 and cfg.frozen_base_dtype in ("int8", "float8") and not cfg.gradient_checkpointing:
        log.warning("model.base_dtype=%s without model.gradient_checkpointing: torchao keeps a dequantized bf16 "
                    "copy of every weight for the backward pass, so the step holds as much as a bf16 base; turn "
                    "gradient checkpointing on to save the memory", cfg.frozen_base_dtype)

    def load_transformer(cls, folder, overrides, **kwargs):  # kwargs: dtype, a LoRA run's base
        return sharding.load_transformer(cls, folder, overrides, rank=rank, **kwargs)

    model = get_family(cfg.family).build_model(cfg.pretrained_path, encoders, options=cfg.options(),
                                               load_transformer=load_transformer)
    if cfg.lora is not None:
        sharding.finish_lora(model.transformer, rank=rank)
    if cfg.gradient_checkpointing:
        sharding.apply_activation_checkpointing(model.transformer)
    return model


@dataclass
class RunCallbacks:
    """The run's callbacks, with handles on those whose results go into the summary."""

    all: list
    summary: Any
    curriculum: Any
    graceful: Any
    nonfinite: Any | None
    ocr_eval: Any | None


def build_callbacks(cfg: CallbacksConfig, *, datamodule: CurriculumDataModule, output_dir: Path,
                    scheduler_dir: Path, family: str) -> RunCallbacks:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from qwenimg_train.training.callbacks import run_summary
    from qwenimg_train.training.callbacks.checkpoint import AtomicModelCheckpoint, StageEndCheckpoint
    from qwenimg_train.training.callbacks.curriculum import CurriculumCallback
    from qwenimg_train.training.callbacks.ema import EMACallback
    from qwenimg_train.training.callbacks.graceful_stop import GracefulStop
    from qwenimg_train.training.callbacks.nonfinite import NonFiniteGuard
    from qwenimg_train.training.callbacks.ocr_eval import OcrEvalCallback
    from qwenimg_train.training.callbacks.stop_at_step import StopAtStep

    checkpoint_dir = output_dir / "checkpoints"
    ckpt = cfg.checkpoint
    summary, graceful = run_summary.RunSummary(), GracefulStop()  # SIGTERM: last.ckpt at the step end, then exit
    curriculum = CurriculumCallback(datamodule)
    callbacks = [
        curriculum, summary, graceful,
        # keep-last-K: rank periodic checkpoints by step (a candidate ModelCheckpoint always has).
        AtomicModelCheckpoint(dirpath=str(checkpoint_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                              every_n_train_steps=ckpt.every_n_train_steps, save_last=ckpt.save_last,
                              monitor="step", mode="max", save_top_k=ckpt.keep_last, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    if ckpt.stage_end:  # one stage = one epoch (qwenimg_train.data.datamodule)
        callbacks.append(StageEndCheckpoint(
            dirpath=str(checkpoint_dir), filename="stage{stage}-step{step:06d}", auto_insert_metric_name=False,
            enable_version_counter=False, stage_ending_at=datamodule.stage_ending_at))
    if cfg.ema is not None:
        callbacks.append(EMACallback(decay=cfg.ema.decay, every=cfg.ema.every, warmup=cfg.ema.warmup))
    if cfg.stop_at_step is not None:
        callbacks.append(StopAtStep(cfg.stop_at_step))
    nonfinite = ocr_eval = None
    if cfg.nonfinite is not None:
        nonfinite = NonFiniteGuard(max_consecutive=cfg.nonfinite.max_consecutive, checkpoint_dir=str(checkpoint_dir))
        callbacks.append(nonfinite)
    if cfg.ocr_eval is not None:
        o = cfg.ocr_eval
        ocr_eval = OcrEvalCallback(output_dir=str(output_dir), scheduler_dir=str(scheduler_dir),
                                   every_n_steps=o.every_n_steps, stage_end=o.stage_end, suites=o.suites, limit=o.limit,
                                   resolution=o.resolution, steps=o.steps, guidance=o.guidance, seed=o.seed,
                                   stage_ending_at=datamodule.stage_ending_at, family=family, at_start=o.at_start,
                                   edit_source_area=o.edit_source_area)
        callbacks.append(ocr_eval)
    return RunCallbacks(callbacks, summary, curriculum, graceful, nonfinite, ocr_eval)


def build_loggers(cfg: TrainConfig, saved: dict[str, Any]) -> list:
    """Each configured logger, given the resolved config (wandb's config, CSV's hparams.yaml)."""
    from hydra.utils import instantiate

    loggers = [compat.quiet_wandb_logger(instantiate(spec)) for spec in cfg.logger.values()]
    for logger in loggers:
        logger.log_hyperparams(saved)
    return loggers


def build_module(cfg: TrainConfig, encoders, datamodule: CurriculumDataModule, saved: dict[str, Any]):
    from qwenimg_train.training.module import QwenImageModule

    scheduler = Path(cfg.model.pretrained_path) / "scheduler" / "scheduler_config.json"
    objective = cfg.objective.with_scheduler_line(json.loads(scheduler.read_text()) if scheduler.is_file() else {})
    return QwenImageModule(model=lambda rank: build_model(cfg.model, encoders, rank), objective=objective,
                           optim=cfg.optim, lr_scale=datamodule.lr_scale_at, config=saved, seed=cfg.seed)


def build_trainer(cfg: TrainConfig, callbacks: list, loggers: list, output_dir: Path):
    """The Trainer: one curriculum stage per epoch, the dataloader rebuilt at each."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from qwenimg_train.training.callbacks.progress import StageProgressBar

    strategy = instantiate(cfg.strategy) if cfg.strategy else "auto"
    if cfg.trainer.enable_progress_bar:  # labelled with the curriculum stage, not "Epoch 2/-2"
        callbacks = [*callbacks, StageProgressBar()]
    return pl.Trainer(**cfg.trainer.kwargs(), strategy=strategy, default_root_dir=str(output_dir), callbacks=callbacks,
                      logger=loggers or False, gradient_clip_val=cfg.optim.grad_clip,
                      reload_dataloaders_every_n_epochs=1, max_epochs=-1)


def resolve_ckpt(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """`ckpt_path` as a file to resume from: `last` is the run's last.ckpt (or its aside
    copy after a crash mid-replace; none yet: a fresh start)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        from qwenimg_train.training.checkpointing import resolve_checkpoint

        last = resolve_checkpoint(checkpoint_dir / "last.ckpt")
        if last is None:
            log.warning("ckpt_path=last but %s does not exist: starting from scratch", checkpoint_dir / "last.ckpt")
            return None
        return str(last)
    if not Path(ckpt_path).exists():
        raise ValueError(f"ckpt_path = {ckpt_path!r} does not exist; pass a checkpoint file or ckpt_path=last")
    return ckpt_path


@contextlib.contextmanager
def closing_loggers(loggers: list, trainer) -> Iterator[None]:
    """Lightning leaves the wandb run open: close it (also after a failure) so its files
    are complete and a later run in this process does not log into it."""
    from lightning.pytorch.loggers import WandbLogger

    try:
        yield
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and compat.wandb_run_started(logger):
                logger.experiment.finish()


def write_summary(cfg: TrainConfig, trainer, callbacks: RunCallbacks, output_dir: Path) -> dict[str, Any]:
    """The run summary over every rank (steps, losses per stage and task, throughput,
    stops, bad samples skipped per stage and reason, OCR scores, paths), written by rank 0
    to `<output_dir>/summary.json` and returned. Every rank calls it (a collective)."""
    checkpoint_dir = output_dir / "checkpoints"
    result = callbacks.summary.summary(trainer)
    if callbacks.graceful.stopped_at is not None:
        result["stopped_by"] = {"signal": "SIGTERM", "step": callbacks.graceful.stopped_at}
    if callbacks.nonfinite is not None:
        result["nonfinite_skipped"] = callbacks.nonfinite.skipped
    result["data_skipped"] = callbacks.curriculum.skipped_by_stage
    if callbacks.ocr_eval is not None:
        result["ocr_eval"] = callbacks.ocr_eval.history
    result["paths"] = {"output_dir": str(output_dir), "checkpoints": str(checkpoint_dir),
                       "last_checkpoint": str(checkpoint_dir / "last.ckpt") if cfg.callbacks.checkpoint.save_last
                       else None}
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def saved_config(cfg: Any) -> dict[str, Any]:
    """What goes into config.yaml, the loggers and every checkpoint: the composed config as
    plain containers, Hydra's own node dropped, credential-like values redacted."""
    from data_pipelines.core.config import to_plain

    plain = dict(to_plain(cfg))
    plain.pop("hydra", None)
    return redact_secrets(plain)
