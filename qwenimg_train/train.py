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

from data_pipelines.config import from_mapping, to_plain, user_errors_exit

log = logging.getLogger("qwenimg-train")


def config_dir() -> str:
    """configs/ of this checkout (the package is installed editable), or $QWENIMG_CONFIG_DIR."""
    root = os.environ.get("QWENIMG_CONFIG_DIR")
    return str(Path(root) if root else Path(__file__).resolve().parents[1] / "configs")


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

    def __post_init__(self) -> None:
        # Checked here, before any weights load.
        from qwenimg_train.encoding import MAX_SEQUENCE_LENGTH
        from qwenimg_train.model import DTYPES, EDIT_FUSIONS

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


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 500
    save_last: bool = True
    save_top_k: int = -1
    """-1 keeps every periodic checkpoint; k keeps the k most recent."""


def build_model(cfg: ModelConfig):
    from qwenimg_train.model import QwenImageModel

    if cfg.build_tiny:
        from qwenimg_train.tiny import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(cfg.pretrained_path, pipeline_class=cfg.pipeline_class)
    return QwenImageModel.from_pretrained(
        cfg.pretrained_path, zero_cond_t=cfg.zero_cond_t, edit_fusion=cfg.edit_fusion,
        gradient_checkpointing=cfg.gradient_checkpointing, encoder_dtype=cfg.encoder_dtype,
        max_sequence_length=cfg.max_sequence_length,
    )


def _resolve_ckpt(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        if not last.exists():
            log.warning("ckpt_path=last but %s does not exist: starting from scratch", last)
            return None
        return str(last)
    if not Path(ckpt_path).exists():
        raise ValueError(f"ckpt_path = {ckpt_path!r} does not exist; pass a checkpoint file or ckpt_path=last")
    return ckpt_path


def train(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run a training job from a composed config; returns the run summary."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from qwenimg_train.curriculum import Curriculum
    from qwenimg_train.curriculum_lightning import CurriculumCallback, CurriculumDataModule
    from qwenimg_train.ema import EMACallback
    from qwenimg_train.module import Optim, QwenImageModule, RunSummary
    from qwenimg_train.objective import FlowMatching

    plain = to_plain(cfg)
    plain.pop("hydra", None)
    known = {"model", "objective", "optim", "curriculum", "data", "trainer", "logger", "callbacks", "paths",
             "seed", "ckpt_path", "experiment"}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; known: {sorted(known)}")
    out = Path(plain["paths"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))

    pl.seed_everything(int(plain.get("seed", 0)), workers=True)
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
    datamodule = CurriculumDataModule(
        curriculum=curriculum, sources=data.pop("sources"), batch_size=data.pop("batch_size"), total_steps=max_steps,
        accumulate_grad_batches=int(trainer_kwargs.get("accumulate_grad_batches", 1)), **data)

    callbacks_cfg = dict(plain.get("callbacks") or {})
    ckpt_cfg = from_mapping(CheckpointConfig, callbacks_cfg.pop("checkpoint", {}), "callbacks.checkpoint")
    ema_cfg = callbacks_cfg.pop("ema", None)
    if callbacks_cfg:
        raise ValueError(f"callbacks: unknown key(s) {sorted(callbacks_cfg)}; known: checkpoint, ema")
    checkpoint_dir = out / "checkpoints"
    summary = RunSummary()
    callbacks = [
        CurriculumCallback(datamodule),
        summary,
        ModelCheckpoint(dirpath=str(checkpoint_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=ckpt_cfg.every_n_train_steps, save_last=ckpt_cfg.save_last,
                        save_top_k=ckpt_cfg.save_top_k),
        LearningRateMonitor(logging_interval="step"),
    ]
    if ema_cfg is not None:
        callbacks.append(EMACallback(**ema_cfg))
    loggers = [instantiate(c) for c in (plain.get("logger") or {}).values()]

    model = build_model(model_cfg)
    edit_stages = [s.name for s in curriculum.stages if s.task_mix.get("ti2i", 0) + s.task_mix.get("i2i", 0) > 0]
    if edit_stages and model.encoders.processor is None:
        raise ValueError(f"stages {edit_stages} train TI2I/I2I, but {model_cfg.pretrained_path!r} has no processor/ "
                         "(a T2I checkpoint): use a Qwen-Image-Edit folder, or stages with task_mix {t2i: 1.0}")
    module = QwenImageModule(model=model, objective=objective, optim=optim, lr_scale=datamodule.lr_scale_at,
                             config=plain)
    trainer = pl.Trainer(
        **trainer_kwargs, default_root_dir=str(out), callbacks=callbacks, logger=loggers or False,
        gradient_clip_val=optim.grad_clip, reload_dataloaders_every_n_epochs=1, max_epochs=-1,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(plain.get("ckpt_path"), checkpoint_dir))
    result = summary.summary(trainer)
    result["paths"] = {"output_dir": str(out), "checkpoints": str(checkpoint_dir),
                       "last_checkpoint": str(checkpoint_dir / "last.ckpt") if ckpt_cfg.save_last else None}
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _main(cfg: DictConfig) -> None:
    with user_errors_exit(log):
        result = train(cfg)
    print(json.dumps(result, indent=1))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
