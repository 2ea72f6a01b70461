"""`qwenimg-train`: the training entry point (a Hydra app over configs/train.yaml).

    qwenimg-train experiment=smoke                       the embedded default
    qwenimg-train experiment=smoke trainer.max_steps=30 paths.output_dir=outputs/x
    qwenimg-train model=qwen_image_edit model.pretrained_path=/data/Qwen-Image-Edit ...
    qwenimg-train ... ckpt_path=last                     resume the run in paths.output_dir

`train(cfg)` is the configuration boundary (STYLE.md, principle 3): every group is
turned into a validated dataclass or explicit arguments here, and nothing below reads
the config. The resolved config is saved with each checkpoint and as
`<output_dir>/config.yaml`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from data_pipelines.core.config import from_mapping, redact_secrets, to_plain, user_errors_exit
from qwenimg_train.models.lora import LoraSettings

log = logging.getLogger("qwenimg-train")


def config_dir() -> str:
    """configs/ of this checkout (the package is installed editable), or $QWENIMG_CONFIG_DIR."""
    root = os.environ.get("QWENIMG_CONFIG_DIR")
    return str(Path(root) if root else Path(__file__).resolve().parents[2] / "configs")


@dataclass
class ModelConfig:
    """configs/model/: which checkpoint and how the model is assembled around it."""

    pretrained_path: str
    """A diffusers-format folder (transformer/, vae/, text_encoder/, tokenizer/, processor/, scheduler/)."""
    build_tiny: bool = False
    """Build the tiny random-weight folder at pretrained_path when it is missing (model=tiny)."""
    pipeline_class: str = "QwenImageEditPipeline"
    """The tiny folder's model_index class (QwenImagePipeline or QwenImageEditPipeline)."""
    zero_cond_t: bool | None = None
    """Timestep-0 modulation of source tokens (Edit-2511); null keeps the checkpoint's setting."""
    edit_fusion: str = "none"
    """none (diffusers-compatible) or gated: a learned gate over the semantic/reconstruction streams."""
    gradient_checkpointing: bool = False
    encoder_dtype: str = "float32"
    """dtype of the frozen VAE and Qwen2.5-VL (bfloat16 on GPU halves their memory)."""
    max_sequence_length: int = 1024
    """Prompt tokens kept after the template prefix (the released pipelines' cap is 1024)."""
    lora: LoraSettings | None = None
    """null: full fine-tuning (every transformer weight trains); a mapping {rank, alpha, dropout,
    target_modules}: a LoRA adapter trains and the transformer's weights stay frozen (qwenimg_train.models.lora)."""

    def __post_init__(self) -> None:
        # Checked here, before any weights load.
        from qwenimg_train.models.qwen_image.encoding import MAX_SEQUENCE_LENGTH
        from qwenimg_train.models.qwen_image.model import DTYPES, EDIT_FUSIONS

        if self.edit_fusion not in EDIT_FUSIONS:
            raise ValueError(f"model.edit_fusion = {self.edit_fusion!r}; use one of {EDIT_FUSIONS}")
        if self.encoder_dtype not in DTYPES:
            raise ValueError(f"model.encoder_dtype = {self.encoder_dtype!r}; use one of {sorted(DTYPES)}")
        if not 1 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"model.max_sequence_length = {self.max_sequence_length} must lie in "
                             f"[1, {MAX_SEQUENCE_LENGTH}]")
        if self.pipeline_class not in ("QwenImagePipeline", "QwenImageEditPipeline"):
            raise ValueError(f"model.pipeline_class = {self.pipeline_class!r}; use QwenImagePipeline or "
                             "QwenImageEditPipeline")
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise ValueError(f"model.lora = {self.lora!r}; use null (full fine-tuning) or a mapping "
                             "{rank, alpha, dropout, target_modules}")


@dataclass
class CheckpointConfig:
    """callbacks.checkpoint: when checkpoints are written (all atomically: checkpointing.py)."""

    every_n_train_steps: int = 500
    """A periodic checkpoint `step<N>.ckpt` every this many optimizer steps."""
    keep_last: int = -1
    """How many periodic checkpoints to keep (the most recent); -1 keeps all."""
    save_last: bool = True
    """Also keep `last.ckpt`, rewritten at every save (what `ckpt_path=last` resumes)."""
    stage_end: bool = True
    """A checkpoint `stage<i>-step<N>.ckpt` at the end of every curriculum stage, always kept."""

    def __post_init__(self) -> None:
        if self.every_n_train_steps < 1:
            raise ValueError(f"callbacks.checkpoint.every_n_train_steps = {self.every_n_train_steps} must be >= 1")
        if self.keep_last == 0 or self.keep_last < -1:
            raise ValueError(f"callbacks.checkpoint.keep_last = {self.keep_last}: use -1 (all) or a positive count")


def load_model_encoders(cfg: ModelConfig):
    """The frozen encoders, loaded before the Trainer exists: outside any sharded-init
    context, so ZeRO-3 never partitions them. Builds the tiny folder first if asked."""
    from qwenimg_train.models.qwen_image.model import load_encoders

    if cfg.build_tiny:
        from qwenimg_train.models.qwen_image.tiny import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(cfg.pretrained_path, pipeline_class=cfg.pipeline_class)
    return load_encoders(cfg.pretrained_path, dtype=cfg.encoder_dtype, max_sequence_length=cfg.max_sequence_length)


def build_model(cfg: ModelConfig, encoders, rank: int = 0):
    """The model; called from `QwenImageModule.configure_model`, inside the strategy's
    sharded-init context where there is one (the transformer is then built from its
    config, partitioned as it is constructed, and its weights loaded one parameter at a
    time: `strategies.load_weights`). `encoders`: from `load_model_encoders`, or None
    when the data is precomputed (the model then never holds them)."""
    from qwenimg_train.models.qwen_image.model import QwenImageModel, load_transformer, read_transformer_weights
    from qwenimg_train.parallel.strategies import load_weights, sharded_init_active

    if sharded_init_active():
        from diffusers import QwenImageTransformer2DModel

        path = Path(cfg.pretrained_path) / "transformer"
        config = QwenImageTransformer2DModel.load_config(path)
        if cfg.zero_cond_t is not None:
            config["zero_cond_t"] = cfg.zero_cond_t
        transformer = QwenImageTransformer2DModel.from_config(config)
        load_weights(transformer, read_transformer_weights(path), rank=rank)
    else:
        transformer = load_transformer(cfg.pretrained_path, zero_cond_t=cfg.zero_cond_t)
    model = QwenImageModel(transformer, encoders, edit_fusion=cfg.edit_fusion,
                           gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora)
    if cfg.lora is not None and sharded_init_active():
        # peft zeroes lora_B at creation (the adapter starts as the identity); on
        # partitioned parameters that write is lost: redo it on the gathered ones.
        from qwenimg_train.parallel.strategies import zero_parameters

        zero_parameters([p for n, p in model.transformer.named_parameters() if ".lora_B." in n], rank=rank)
    return model


def _launcher_rank() -> int:
    """This process's global rank as its launcher set it before any Trainer exists:
    torchrun's RANK, srun's SLURM_PROCID, or LOCAL_RANK of the ranks Lightning starts
    itself on one node; 0 for a process started alone."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def precomputed_tag(cfg: ModelConfig):
    """The precompute tag this run's model folder and encoder settings give
    (qwenimg_train.data.precomputed): precomputed shards must carry the same."""
    from qwenimg_train.models.qwen_image.model import check_checkpoint_folder
    from qwenimg_train.data.precomputed import PrecomputeTag

    check_checkpoint_folder(cfg.pretrained_path)
    return PrecomputeTag.for_model(cfg.pretrained_path, dtype=cfg.encoder_dtype,
                                   max_sequence_length=cfg.max_sequence_length)


def _resolve_ckpt(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
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


def train(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run a training job from a composed config; returns the run summary."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor

    from qwenimg_train.training.checkpointing import AtomicModelCheckpoint, GracefulStop, StageEndCheckpoint, StopAtStep

    from qwenimg_train.data.curriculum import Curriculum
    from qwenimg_train.data.datamodule import CurriculumCallback, CurriculumDataModule
    from qwenimg_train.training.callbacks.ema import EMACallback
    from qwenimg_train.training.module import Optim, QwenImageModule, RunSummary
    from qwenimg_train.objectives.flow_matching import FlowMatching

    plain = to_plain(cfg)
    plain.pop("hydra", None)
    known = {"model", "objective", "optim", "curriculum", "data", "trainer", "logger", "callbacks", "paths",
             "seed", "ckpt_path", "experiment", "strategy"}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; known: {sorted(known)}")
    out = Path(plain["paths"]["output_dir"])
    try:  # before any heavy work: a run that cannot write its checkpoints is pointless
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"paths.output_dir = {str(out)!r} is not writable ({type(exc).__name__}: {exc}); "
                         "point it at a folder you can write to") from None
    os.environ["QWENIMG_RUN_DIR"] = str(out)  # ranks relaunched by the strategy resolve the same directory
    saved = redact_secrets(plain)  # what goes into config.yaml, the loggers and every checkpoint
    if _launcher_rank() == 0:  # one writer on a shared file system, and never a half-written file
        tmp = out / f"config.yaml.tmp-{os.getpid()}"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
        os.replace(tmp, out / "config.yaml")

    seed = int(plain.get("seed", 0))
    pl.seed_everything(seed, workers=True)
    model_cfg = from_mapping(ModelConfig, plain["model"], "model")
    objective = from_mapping(FlowMatching, plain["objective"], "objective")
    optim = from_mapping(Optim, plain["optim"], "optim")
    curriculum = Curriculum.from_config(plain["curriculum"])
    trainer_kwargs = dict(plain["trainer"])
    max_steps = int(trainer_kwargs.get("max_steps", -1))
    if max_steps < len(curriculum.stages):
        raise ValueError(f"trainer.max_steps = {max_steps}: the curriculum's {len(curriculum.stages)} stages need "
                         "at least one step each")
    data = dict(plain["data"])
    known_data = {"sources", "batch_size", "num_workers", "seed", "shuffle_buffer", "max_skip_fraction",
                  "precomputed", "max_image_pixels"}
    if set(data) - known_data:
        raise ValueError(f"data: unknown key(s) {sorted(set(data) - known_data)}; known: {sorted(known_data)}")
    datamodule = CurriculumDataModule(
        curriculum=curriculum, sources=data.pop("sources"), batch_size=data.pop("batch_size"), total_steps=max_steps,
        accumulate_grad_batches=int(trainer_kwargs.get("accumulate_grad_batches", 1)), **data)
    datamodule.setup()  # every shard folder a stage reads, checked now: before any model loads

    callbacks_cfg = dict(plain.get("callbacks") or {})
    ckpt_cfg = from_mapping(CheckpointConfig, callbacks_cfg.pop("checkpoint", {}), "callbacks.checkpoint")
    ema_cfg = callbacks_cfg.pop("ema", None)
    stop_at_step = callbacks_cfg.pop("stop_at_step", None)
    ocr_cfg = callbacks_cfg.pop("ocr_eval", None)
    nonfinite_cfg = callbacks_cfg.pop("nonfinite", None)
    if callbacks_cfg:
        raise ValueError(f"callbacks: unknown key(s) {sorted(callbacks_cfg)}; known: checkpoint, ema, nonfinite, "
                         "ocr_eval, stop_at_step")
    checkpoint_dir = out / "checkpoints"
    summary = RunSummary()
    graceful = GracefulStop()  # SIGTERM: last.ckpt at the step end, then a normal exit
    callbacks = [
        CurriculumCallback(datamodule),
        summary,
        graceful,
        # keep-last-K: rank periodic checkpoints by step (a candidate ModelCheckpoint always has).
        AtomicModelCheckpoint(dirpath=str(checkpoint_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                              every_n_train_steps=ckpt_cfg.every_n_train_steps, save_last=ckpt_cfg.save_last,
                              monitor="step", mode="max", save_top_k=ckpt_cfg.keep_last,
                              enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    if ckpt_cfg.stage_end:  # one stage = one epoch (curriculum_lightning)
        callbacks.append(StageEndCheckpoint(
            dirpath=str(checkpoint_dir), filename="stage{stage}-step{step:06d}", auto_insert_metric_name=False,
            enable_version_counter=False, stage_ending_at=datamodule.stage_ending_at))
    if ema_cfg is not None:
        callbacks.append(EMACallback(**ema_cfg))
    if stop_at_step is not None:
        callbacks.append(StopAtStep(int(stop_at_step)))
    if nonfinite_cfg is not None:
        from qwenimg_train.training.callbacks.nonfinite import NonFiniteGuard

        if set(nonfinite_cfg) - {"max_consecutive"}:
            raise ValueError(f"callbacks.nonfinite: unknown key(s) {sorted(set(nonfinite_cfg) - {'max_consecutive'})}; "
                             "known: max_consecutive")
        nonfinite = NonFiniteGuard(**nonfinite_cfg, checkpoint_dir=str(checkpoint_dir))
        callbacks.append(nonfinite)
    ocr_eval = None
    if ocr_cfg is not None:
        from qwenimg_train.training.callbacks.ocr_eval import OcrEvalCallback

        ocr_eval = OcrEvalCallback(output_dir=str(out), scheduler_dir=str(Path(model_cfg.pretrained_path) / "scheduler"),
                                   stage_ending_at=datamodule.stage_ending_at, **ocr_cfg)
        callbacks.append(ocr_eval)
    if datamodule.precomputed:
        # The encoders never load: the shards carry their outputs, made by the encoders
        # of this run's model folder at its dtype and sequence cap (checked by the tag).
        if ocr_eval is not None:
            raise ValueError("callbacks.ocr_eval generates images, which needs the encoders, but data.precomputed="
                             "true keeps them off this machine: set callbacks.ocr_eval=null and score exported "
                             "checkpoints with qwenimg-eval")
        if model_cfg.build_tiny:
            from qwenimg_train.models.qwen_image.tiny import ensure_tiny_checkpoint

            ensure_tiny_checkpoint(model_cfg.pretrained_path, pipeline_class=model_cfg.pipeline_class)
        datamodule.check_precomputed(precomputed_tag(model_cfg))
        encoders = None
    else:
        encoders = load_model_encoders(model_cfg)
    edit_stages = [s.name for s in curriculum.stages if s.task_mix.get("ti2i", 0) + s.task_mix.get("i2i", 0) > 0]
    if edit_stages and encoders is not None and encoders.processor is None:
        raise ValueError(f"stages {edit_stages} train TI2I/I2I, but {model_cfg.pretrained_path!r} has no processor/ "
                         "(a T2I checkpoint): use a Qwen-Image-Edit folder, or stages with task_mix {t2i: 1.0}")
    loggers = [instantiate(c) for c in (plain.get("logger") or {}).values()]
    for logger in loggers:  # the resolved config goes with the run (wandb config, CSV hparams.yaml)
        logger.log_hyperparams(saved)

    module = QwenImageModule(model=lambda rank: build_model(model_cfg, encoders, rank), objective=objective,
                             optim=optim, lr_scale=datamodule.lr_scale_at, config=saved, seed=seed)
    strategy = instantiate(plain["strategy"]) if plain.get("strategy") else "auto"
    trainer = pl.Trainer(
        **trainer_kwargs, strategy=strategy, default_root_dir=str(out), callbacks=callbacks, logger=loggers or False,
        gradient_clip_val=optim.grad_clip, reload_dataloaders_every_n_epochs=1, max_epochs=-1,
    )
    from lightning.pytorch.loggers import WandbLogger

    try:
        # weights_only: a checkpoint is tensors and plain containers, never code to run on load
        trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(plain.get("ckpt_path"), checkpoint_dir),
                    weights_only=True)
    finally:
        # Lightning leaves the wandb run open: close it (also after a failure) so its files
        # are complete and a later run in this process does not log into it.
        for logger in loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
                logger.experiment.finish()
    result = summary.summary(trainer)
    if graceful.stopped_at is not None:
        result["stopped_by"] = {"signal": "SIGTERM", "step": graceful.stopped_at}
    if nonfinite_cfg is not None:
        result["nonfinite_skipped"] = nonfinite.skipped
    if ocr_eval is not None:
        result["ocr_eval"] = ocr_eval.history
    result["paths"] = {"output_dir": str(out), "checkpoints": str(checkpoint_dir),
                       "last_checkpoint": str(checkpoint_dir / "last.ckpt") if ckpt_cfg.save_last else None}
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def _sweep_job(cfg: DictConfig) -> dict[str, Any]:
    """One job of a Hydra multirun (`-m`, `sweep=...`; docs/sweeps.md).

    - It writes to its own directory, <hydra.sweep.dir>/<hydra.sweep.subdir>: paths.output_dir
      would give every job the same one (an experiment's fixed path, or the QWENIMG_RUN_DIR
      that train() left set for the previous job of this process under the basic launcher).
    - Lightning relaunches DDP ranks with this process's command line plus `hydra.run.dir=
      <HydraConfig's run.dir>`; while the job runs, those are the job's own overrides in run
      mode and its directory, so each rank runs this job, not the sweep.
    - The basic launcher runs the jobs one after another in this process: each starts with
      the environment the sweep started with (Lightning's launcher leaves LOCAL_RANK,
      WORLD_SIZE, MASTER_PORT... set, which would tell the next job that its ranks already
      exist) and without the previous job's process group.
    - A failed job raises: Hydra records it, runs the other jobs and reports it at the end
      (user_errors_exit's SystemExit would end the whole sweep at the first failure).
    """
    import sys

    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    keys = [o.lstrip("+~").split("=", 1)[0] for o in hc.overrides.task]
    if "paths.output_dir" in keys:
        log.warning("paths.output_dir is ignored in a multirun: job %s writes to %s (hydra.sweep.dir=... chooses "
                    "where a sweep goes)", hc.job.num, job_dir)
    cfg.paths.output_dir = job_dir
    with read_write(hc.run):  # this job's HydraConfig only; run_job sets a fresh one per job
        hc.run.dir = job_dir
    argv, env = sys.argv, dict(os.environ)
    task = [o for o, key in zip(hc.overrides.task, keys) if key not in ("sweep", "paths.output_dir")]
    sys.argv = [argv[0], *task, f'paths.output_dir="{job_dir}"', "hydra.mode=RUN"]
    try:
        return train(cfg)
    except Exception as exc:
        # Into the job's log (<job dir>/<job name>.log), where qwenimg-sweep-report finds the cause.
        log.error("job %s failed: %s: %s", hc.job.num, type(exc).__name__, exc)
        raise
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        result = _sweep_job(cfg)
    else:
        with user_errors_exit(log):
            result = train(cfg)
    print(json.dumps(result, indent=1))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
