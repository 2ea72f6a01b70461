"""The typed configuration of `qwenimg-train`: one `TrainConfig` of dataclasses, built
once from the composed Hydra config (`TrainConfig.from_mapping`) and from a run's saved
`config.yaml` (`load_run_config`). Every field is documented here and validated when the
dataclass is built, so a typo or a wrong value is one `ValueError` naming the key, before
any weight loads. The YAML files under configs/ hold the same defaults as these
dataclasses (tests/test_config.py checks it), so either can be read as the reference.

Below `train(cfg)` nothing reads the config: builders take these records and hand
explicit arguments to the objects they build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data_pipelines.core.config import from_mapping, to_plain
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS
from qwenimg_train.data.curriculum import Curriculum
from qwenimg_train.models.lora import LoraSettings
from qwenimg_train.models.quantize import QUANTIZED_BASES
from qwenimg_train.models.weights import DTYPES
from qwenimg_train.objectives.flow_matching import FlowMatching
from qwenimg_train.training.optim import Optim

EDIT_FUSIONS = ("none", "gated")


def _unknown_keys(section: str, mapping: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known: {sorted(known)}")


def _section(cls, mapping: Any, section: str):
    """`cls` from one config section, unknown keys named as `<section>: unknown key(s) [...]`."""
    mapping = to_plain(mapping)
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{section} = {mapping!r:.80}: expected a mapping")
    _unknown_keys(section, mapping, cls)
    return from_mapping(cls, mapping, section)


@dataclass
class ModelConfig:
    """configs/model/: which checkpoint, which family, and how the model is assembled around it."""

    pretrained_path: str
    """A diffusers-format folder (transformer/, vae/, text_encoder/, tokenizer/, processor/, scheduler/)."""
    family: str = "qwen_image"
    """The model family (qwenimg_train.models.FAMILIES): how the folder is loaded, encoded and exported."""
    build_tiny: bool = False
    """Build the tiny random-weight folder at pretrained_path when it is missing (model=tiny)."""
    tiny_world: str = "random"
    """What the tiny builder writes: random weights (fast unit tests), or "glyphs", the learnable tiny
    world (a VAE fitted on glyph renders; model=glyphs); only read when build_tiny is true."""
    pipeline_class: str | None = None
    """What the tiny builder writes (its model_index class: QwenImagePipeline or QwenImageEditPipeline
    for qwen_image, QwenImageEditPlusPipeline for qwen_image_edit_plus; null: the family's edit
    pipeline); only read when build_tiny is true."""
    zero_cond_t: bool | None = None
    """Timestep-0 modulation of source tokens (Edit-2511); null keeps the checkpoint's setting."""
    edit_fusion: str = "none"
    """none (diffusers-compatible) or gated: a learned gate over the semantic/reconstruction streams."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (applied by the strategy layer)."""
    attention: str = "auto"
    """How the transformer's attention runs (the family's `attention_paths`): auto picks the family's
    best path on the training device; Qwen-Image-2.1 has sdpa (diffusers' exact multi-pass SDPA of its
    block-causal mask, any device) and flex (one compiled flex_attention call per layer; CUDA)."""
    encoder_dtype: str = "float32"
    """dtype of the frozen VAE and vision-language encoder (bfloat16 on GPU halves their memory)."""
    max_sequence_length: int = 1024
    """Prompt tokens kept after the template prefix (the released pipelines' cap is 1024)."""
    lora: LoraSettings | None = None
    """null: full fine-tuning (every transformer weight trains); a mapping {rank, alpha, dropout,
    target_modules}: a LoRA adapter trains and the transformer's weights stay frozen (qwenimg_train.models.lora)."""
    base_dtype: str | None = None
    """LoRA only: how the frozen transformer is stored. null: bfloat16 (half of fp32's bytes); float32;
    or quantized (qwenimg_train.models.quantize): int8 or float8 (torchao, weight-only) or nf4
    (bitsandbytes), a quarter and an eighth of fp32's bytes. The adapter (and a fusion gate) stay
    float32 with their optimizer state. Full fine-tuning keeps float32 master weights (null or
    float32). Under ZeRO-3 the strategy's precision decides instead, and a quantized base refuses it."""

    def __post_init__(self) -> None:
        from qwenimg_train.models import FAMILIES, get_family

        if self.family not in FAMILIES:
            raise ValueError(f"model.family = {self.family!r}; use one of {sorted(FAMILIES)}")
        if self.edit_fusion not in EDIT_FUSIONS:
            raise ValueError(f"model.edit_fusion = {self.edit_fusion!r}; use one of {EDIT_FUSIONS}")
        if self.encoder_dtype not in DTYPES:
            raise ValueError(f"model.encoder_dtype = {self.encoder_dtype!r}; use one of {sorted(DTYPES)}")
        family = get_family(self.family)
        if not 1 <= self.max_sequence_length <= family.max_sequence_length:
            raise ValueError(f"model.max_sequence_length = {self.max_sequence_length} must lie in "
                             f"[1, {family.max_sequence_length}]")
        if self.attention not in family.attention_paths:
            raise ValueError(f"model.attention = {self.attention!r}; model.family={self.family} has "
                             f"{', '.join(family.attention_paths)}")
        variants = family.tiny_variants
        if self.pipeline_class is None:
            self.pipeline_class = family.tiny_default_variant
        if self.pipeline_class not in variants:
            raise ValueError(f"model.pipeline_class = {self.pipeline_class!r}; use one of {', '.join(variants)}")
        if self.tiny_world not in family.tiny_worlds:
            raise ValueError(f"model.tiny_world = {self.tiny_world!r}; use one of {', '.join(family.tiny_worlds)}")
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise ValueError(f"model.lora = {self.lora!r}; use null (full fine-tuning) or a mapping "
                             "{rank, alpha, dropout, target_modules}")
        base_dtypes = sorted(DTYPES) + list(QUANTIZED_BASES)
        if self.base_dtype is not None and self.base_dtype not in base_dtypes:
            raise ValueError(f"model.base_dtype = {self.base_dtype!r}; use null or one of {base_dtypes}")
        if self.lora is None and self.base_dtype not in (None, "float32"):
            raise ValueError(f"model.base_dtype = {self.base_dtype!r} needs model.lora: full fine-tuning trains "
                             "float32 master weights (trainer.precision=bf16-mixed computes in bf16)")

    @property
    def frozen_base_dtype(self) -> str:
        """What the transformer's frozen weights are stored in: float32 unless LoRA."""
        if self.lora is None:
            return "float32"
        return self.base_dtype or "bfloat16"

    def options(self) -> dict[str, Any]:
        """What the family's `build_model` reads."""
        return {"zero_cond_t": self.zero_cond_t, "edit_fusion": self.edit_fusion, "lora": self.lora,
                "base_dtype": self.frozen_base_dtype, "attention": self.attention}


@dataclass
class DataConfig:
    """configs/data/: where the shards are and how they are read (qwenimg_train.data.datamodule).
    Mixing weights, text classes, resolutions and task mix are per stage (configs/curriculum/)."""

    sources: dict[str, str]
    """Shard folder (with manifest.json) per source name: synthetic, design, natural, edit; or a
    URL: https://host/prefix/, its manifest.json, s3://..., pipe:CMD {file} (docs/data.md, Remote sources)."""
    batch_size: int = 4
    """Samples per micro-batch and rank."""
    num_workers: int = 2
    """Loader worker processes per rank (0: read in the training process)."""
    seed: int = 0
    """Seed of shard order, shuffling and mixing (with the stage and rank)."""
    shuffle_buffer: int = 256
    """Samples held for shuffling per worker."""
    max_skip_fraction: float = 0.01
    """Stop when more than this share of the samples read were bad (counted by reason)."""
    precomputed: bool = False
    """The sources hold precomputed encoder outputs (`qwenimg-data --config-name precompute`): the
    encoders never load, and the folders' precompute tag must match the model folder and settings."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Larger images are skipped from their header (decompression bombs)."""
    remote_retries: int = 3
    """A remote source's manifest or shard that fails to open or read is tried this many more times..."""
    remote_backoff_s: float = 2.0
    """...waiting this long, then twice that, ... between tries; then the shard is skipped, counted as
    data/skipped/unreachable_shard."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size = {self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers = {self.num_workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer = {self.shuffle_buffer} must be >= 1")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction = {self.max_skip_fraction} must lie in [0, 1]")
        if self.max_image_pixels < 1:
            raise ValueError(f"data.max_image_pixels = {self.max_image_pixels} must be >= 1")
        if self.remote_retries < 0:
            raise ValueError(f"data.remote_retries = {self.remote_retries} must be >= 0")
        if self.remote_backoff_s < 0:
            raise ValueError(f"data.remote_backoff_s = {self.remote_backoff_s} must be >= 0")


@dataclass
class TrainerConfig:
    """configs/trainer/: the `lightning.pytorch.Trainer` arguments this framework sets."""

    accelerator: str = "cpu"
    """cpu | gpu | auto."""
    devices: int | str | list[int] = 1
    """Devices per node (an int, "auto", or a list of indices)."""
    num_nodes: int = 1
    precision: str = "32-true"
    """32-true on CPU; bf16-mixed on GPU (bf16 autocast, fp32 master weights)."""
    max_steps: int = 1000
    """Optimizer steps of the whole run; the curriculum's stage fractions divide it."""
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = False

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"trainer.num_nodes = {self.num_nodes} must be >= 1")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches = {self.accumulate_grad_batches} must be >= 1")
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps = {self.log_every_n_steps} must be >= 1")

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CheckpointConfig:
    """callbacks.checkpoint: when checkpoints are written (all atomically)."""

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


@dataclass
class EMAConfig:
    """callbacks.ema: an exponential moving average of the trainable weights (export picks it by default)."""

    decay: float = 0.999
    every: int = 1
    """Update the average every this many optimizer steps."""
    warmup: bool = True
    """Use min(decay, (1 + n) / (10 + n)) over the first updates, so early weights fade fast."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"callbacks.ema.every = {self.every} must be >= 1")
        if not 0 <= self.decay < 1:
            raise ValueError(f"callbacks.ema.decay = {self.decay} must lie in [0, 1)")


@dataclass
class NonFiniteConfig:
    """callbacks.nonfinite: a step whose loss or gradients are not finite is skipped and counted."""

    max_consecutive: int = 5
    """This many skipped steps in a row save a checkpoint and stop the run with an error."""

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive = {self.max_consecutive} must be >= 1")


@dataclass
class OcrEvalConfig:
    """callbacks.ocr_eval: OCR text-rendering evaluation of the model being trained (docs/evaluation.md)."""

    every_n_steps: int | None = 1000
    """Evaluate every this many optimizer steps (null: stage ends only)."""
    stage_end: bool = True
    """Evaluate when a curriculum stage ends."""
    at_start: bool = False
    """Also evaluate before the first training step (logged at step 0; not on a resumed run)."""
    suites: str | list[str] = "all"
    """Prompt suites (qwenimg_train.eval.suites): a group (all: the open suites; glyph: the glyph
    world's), or a list of names."""
    limit: int = 2
    """Prompts per suite."""
    resolution: int = 512
    steps: int = 20
    """Sampling steps."""
    guidance: float = 4.0
    """True CFG scale (1: no guidance)."""
    seed: int = 0
    edit_source_area: int | None = None
    """Pixels the edit pipeline resizes a source image to (its VAE and vision-encoder input); null:
    the pipeline's own 1024 * 1024. The glyph world: resolution², e.g. 4096."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"callbacks.ocr_eval.every_n_steps = {self.every_n_steps} must be >= 1 (or null)")
        if self.limit < 1:
            raise ValueError(f"callbacks.ocr_eval.limit = {self.limit} must be >= 1")
        if self.edit_source_area is not None and self.edit_source_area < 32 * 32:
            raise ValueError(f"callbacks.ocr_eval.edit_source_area = {self.edit_source_area} must be >= 1024 "
                             "(32 * 32 pixels), or null")


@dataclass
class CallbacksConfig:
    """configs/callbacks/: checkpoints, EMA, the non-finite guard, a stop step, OCR evaluation
    (a null entry turns that callback off)."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig | None = None
    nonfinite: NonFiniteConfig | None = None
    stop_at_step: int | None = None
    """End the run after this step (last.ckpt written); schedules still follow trainer.max_steps."""
    ocr_eval: OcrEvalConfig | None = None


@dataclass
class PathsConfig:
    """configs/paths/: where a run writes (relative paths resolve against the working directory)."""

    output_dir: str
    """The run directory: config.yaml, checkpoints/, logs, summary.json."""
    models_dir: str = "outputs/models"
    """Where tiny model folders are built."""


@dataclass
class TrainConfig:
    """The root: every group of configs/train.yaml, validated."""

    model: ModelConfig
    objective: FlowMatching
    optim: Optim
    curriculum: Curriculum
    data: DataConfig
    trainer: TrainerConfig
    paths: PathsConfig
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    strategy: dict[str, Any] | None = None
    """A `_target_` mapping (configs/strategy/), instantiated by the strategy layer; null: Lightning's default."""
    logger: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Loggers by name, each a `_target_` mapping (configs/logger/)."""
    seed: int = 0
    ckpt_path: str | None = None
    """A checkpoint file, or `last` (the run in paths.output_dir)."""

    SECTIONS = ("model", "objective", "optim", "curriculum", "data", "trainer", "paths", "callbacks", "strategy",
                "logger", "seed", "ckpt_path")
    # Keys Hydra composes that are not settings: `experiment`/`sweep` name the files applied.
    IGNORED = ("hydra", "experiment", "sweep", "debug")

    def __post_init__(self) -> None:
        target = str((self.strategy or {}).get("_target_", ""))
        if self.model.base_dtype in QUANTIZED_BASES and "deepspeed" in target.lower():
            raise ValueError(f"model.base_dtype = {self.model.base_dtype!r} with strategy {target}: DeepSpeed cannot "
                             "shard or cast quantized weights; train a quantized base on one GPU or with "
                             "strategy=ddp, or use model.base_dtype=bfloat16 under ZeRO-3")
        stages = len(self.curriculum.stages)
        if self.trainer.max_steps < stages:
            raise ValueError(f"trainer.max_steps = {self.trainer.max_steps}: the curriculum's {stages} stages need "
                             "at least one step each")

    @classmethod
    def from_mapping(cls, cfg: Any) -> "TrainConfig":
        """From the composed config (a DictConfig or a plain mapping, e.g. a saved config.yaml)."""
        plain = dict(to_plain(cfg))
        for key in cls.IGNORED:
            plain.pop(key, None)
        unknown = sorted(set(plain) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(f"unknown top-level config key(s) {unknown}; known: {sorted(cls.SECTIONS)}")
        return cls(
            model=_section(ModelConfig, plain.get("model"), "model"),
            objective=_section(FlowMatching, plain.get("objective"), "objective"),
            optim=_section(Optim, plain.get("optim"), "optim"),
            curriculum=Curriculum.from_config(plain.get("curriculum") or {}),
            data=_section(DataConfig, plain.get("data"), "data"),
            trainer=_section(TrainerConfig, plain.get("trainer"), "trainer"),
            paths=_section(PathsConfig, plain.get("paths"), "paths"),
            callbacks=_section(CallbacksConfig, plain.get("callbacks"), "callbacks"),
            strategy=plain.get("strategy") or None,
            logger=dict(plain.get("logger") or {}),
            seed=int(plain.get("seed", 0)),
            ckpt_path=plain.get("ckpt_path"),
        )


def saved_model_config(saved: Mapping[str, Any]) -> ModelConfig:
    """The typed `model` section of a saved run config (what export needs of a checkpoint)."""
    return _section(ModelConfig, (saved or {}).get("model"), "model")


def load_run_config(run: str | Path) -> TrainConfig:
    """The typed config of a finished or running run: its folder (config.yaml inside) or the file."""
    import yaml

    path = Path(run)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: pass a run directory holding config.yaml")
    return TrainConfig.from_mapping(yaml.safe_load(path.read_text()))
