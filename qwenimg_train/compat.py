"""The third-party versions this code is written against, and its touches of their private API.

The code reaches past the public API of diffusers, Lightning and DeepSpeed in a few
places. Every such place is listed here, with the versions it was written against and
tested with (`PINS`), so an upgrade is one review of one module:

diffusers (0.42)
    qwenimg_train/models/qwen_image/transformer.py re-runs `QwenImageTransformer2DModel`'s
    forward over its own submodules and re-implements `QwenDoubleStreamAttnProcessor2_0`
    with per-sample rotary frequencies and an image mask; it reads the rotary tables
    through `rope_device_freqs` / `rope_video_freqs` and checkpoints blocks through
    `checkpointed_block` below. qwenimg_train/models/qwen_image/encoding.py follows the
    pipelines' `_get_qwen_prompt_embeds`. `edit_source_area` swaps the module-level
    `calculate_dimensions` of pipeline_qwenimage_edit, which `QwenImageEditPipeline.__call__`
    calls to size its source image (always 1024², whatever the output size). Any minor
    release may change these.
Lightning (2.6)
    `wandb_run_started` and `quiet_wandb_logger` (WandbLogger's `_experiment` and
    `_wandb_init`), `save_last_checkpoint` (ModelCheckpoint's `_save_last_checkpoint` and
    `_monitor_candidates`); qwenimg_train/training/callbacks/checkpoint.py overrides
    ModelCheckpoint's `_save_checkpoint` / `_monitor_candidates` and sets
    `_last_global_step_saved` / `_last_checkpoint_saved`; the CPU DeepSpeed strategy
    overrides DeepSpeedStrategy's `_setup_model_and_optimizer` and
    `_get_process_group_backend` (qwenimg_train/parallel/).
DeepSpeed (0.19)
    qwenimg_train/parallel/deepspeed_compat.py: the stage-3 fp32-partition fix and the
    DeepSpeedStrategy internals the CPU strategy calls. DeepSpeed is imported only
    under qwenimg_train/parallel/; its version is checked here like the others.
torch (2.13)
    DDP's `_set_params_and_buffers_to_ignore_for_model` (the module's configure_model), and
    the DataLoader's `_get_iterator` / its worker iterator's `_shutdown_workers`
    (qwenimg_train/data/datamodule.py: workers that a failed fit leaves running are ended).
Pillow (13)
    `Image._getencoder`, which `Image.tobytes` itself calls: data_pipelines/core/images.py
    `rgb_array` packs a decoded image in one call (a fallback to `tobytes` otherwise).
transformers (5.x)
    No private names; `from_pretrained(dtype=...)` needs >= 4.56 (the earlier
    `torch_dtype` is deprecated in 5.x).
torchao (0.18), bitsandbytes (0.50)
    qwenimg_train/models/quantize.py skips diffusers' bitsandbytes GPU check while it
    loads an nf4 base on a CPU-only machine (`BnB4BitDiffusersQuantizer.validate_environment`)
    and sets `Linear4bit.support_avx512bf16_for_cpu`; `filter_import_chatter` drops the
    lines these libraries log when diffusers imports them.

`PRIVATE_NAMES` lists the private attributes by class, or by module for module-level
names (DeepSpeed's in `deepspeed_compat.PRIVATE_NAMES`), and `missing_private_names()`
checks that the installed classes and modules still have them (tests/test_compat.py).

Versions are checked on first use, not at import: `require(package)` raises
`IncompatibleVersionError` outside the `required` range (the code is known not to fit)
and warns once (`UntestedVersionWarning`) inside it but outside the `tested` range.
`check_versions()` checks every package at once (for an entry point).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version


class IncompatibleVersionError(RuntimeError):
    """An installed package lies outside the range this code is written for."""


class UntestedVersionWarning(UserWarning):
    """An installed package lies inside the supported range but outside the tested one."""


@dataclass(frozen=True)
class Pin:
    package: str
    tested_with: str
    """The version the test suite ran on (`pip show <package>` in the project's venv)."""
    tested: str
    """Versions treated as tested (no warning)."""
    required: str
    """Versions the code can work with; outside them `require` raises."""
    why: str


PINS: dict[str, Pin] = {
    pin.package: pin
    for pin in (
        Pin("diffusers", tested_with="0.42.1", tested=">=0.42,<0.43", required=">=0.42,<0.43",
            why="the transformer forward and attention processor re-implemented from diffusers 0.42"),
        Pin("lightning", tested_with="2.6.6", tested=">=2.6,<2.7", required=">=2.6,<3",
            why="ModelCheckpoint, WandbLogger and DeepSpeedStrategy internals of Lightning 2.6"),
        Pin("deepspeed", tested_with="0.19.8", tested=">=0.19,<0.20", required=">=0.19,<0.20",
            why="the ZeRO-3 fp32-partition fix targets DeepSpeed 0.19's stage-3 optimizer"),
        Pin("transformers", tested_with="5.25.0", tested=">=5.25,<6", required=">=4.56,<6",
            why="from_pretrained(dtype=...) (transformers >= 4.56)"),
        Pin("torchao", tested_with="0.18.0", tested=">=0.16,<0.19", required=">=0.16,<0.19",
            why="Int8WeightOnlyConfig(version=2) and peft's TorchaoLoraLinear (peft needs >= 0.16)"),
        Pin("bitsandbytes", tested_with="0.50.2", tested=">=0.48,<0.51", required=">=0.48,<0.51",
            why="4-bit quantization on the CPU (>= 0.48) and the CPU repack switch of quantize.py"),
    )
}

# Private attributes this code reads, calls or overrides, by "module:Class" (or "module"
# for module-level names).
QWEN_EDIT_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit"
QWEN_EDIT_PLUS_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    QWEN_EDIT_MODULE: ("calculate_dimensions",),
    QWEN_EDIT_PLUS_MODULE: ("calculate_dimensions", "VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"),
    "diffusers.models.transformers.transformer_qwenimage:QwenEmbedRope": (
        "_get_device_freqs", "_compute_video_freqs"),
    "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformer2DModel": (
        "_gradient_checkpointing_func",),
    "lightning.pytorch.callbacks:ModelCheckpoint": (
        "_save_checkpoint", "_save_last_checkpoint", "_monitor_candidates"),
    "lightning.pytorch.strategies:DeepSpeedStrategy": (
        "_setup_model_and_optimizer", "_init_deepspeed_distributed", "_get_process_group_backend"),
    # QwenImageModule.configure_model: DDP leaves the frozen base out of its broadcast
    "torch.nn.parallel:DistributedDataParallel": ("_set_params_and_buffers_to_ignore_for_model",),
    # CurriculumDataModule.shutdown_workers: ends loader workers a failed fit leaves running
    "torch.utils.data:DataLoader": ("_get_iterator",),
    "torch.utils.data.dataloader:_MultiProcessingDataLoaderIter": ("_shutdown_workers",),
    # training.callbacks.progress: the bar's label is the curriculum stage
    "lightning.pytorch.callbacks:RichProgressBar": ("_get_train_description",),
    # data_pipelines.core.images.rgb_array: one raw-encoder pass (what Image.tobytes calls)
    "PIL.Image": ("_getencoder",),
}
# DeepSpeed's own private names: qwenimg_train.parallel.deepspeed_compat.PRIVATE_NAMES.
# Set on instances (in __init__ or on first use), so not checkable on the class.
_INSTANCE_ATTRIBUTES = {"_gradient_checkpointing_func"}

_checked: set[str] = set()


def installed_version(package: str) -> str:
    """The installed distribution's version (raises PackageNotFoundError when missing)."""
    return metadata.version(package)


def require(package: str) -> None:
    """Check `package`'s installed version against `PINS` (once per process)."""
    if package in _checked:
        return
    pin = PINS[package]
    installed = installed_version(package)
    version = Version(installed)
    if version not in SpecifierSet(pin.required):
        raise IncompatibleVersionError(
            f"{package} {installed} is installed, but qwenimg-train needs {package}{pin.required} "
            f"({pin.why}; tested with {pin.tested_with}): pip install '{package}{pin.tested}'")
    if version not in SpecifierSet(pin.tested):
        warnings.warn(
            f"{package} {installed} is installed; qwenimg-train is tested with {package}{pin.tested} "
            f"(last: {pin.tested_with}). It should work, but {pin.why}: if something breaks, "
            f"pip install '{package}{pin.tested}'", UntestedVersionWarning, stacklevel=2)
    _checked.add(package)


def check_versions(packages: tuple[str, ...] | None = None) -> None:
    """`require` for each installed package of `PINS` (DeepSpeed is optional)."""
    for package in packages or tuple(PINS):
        try:
            require(package)
        except metadata.PackageNotFoundError:
            if package != "deepspeed":
                raise


def missing_private_names(table: dict[str, tuple[str, ...]] = PRIVATE_NAMES) -> list[str]:
    """The private names of `table` that the installed classes (or modules) lack ("module:Class.name")."""
    missing = []
    for where, names in table.items():
        module_name, _, class_name = where.partition(":")
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name) if class_name else module
        missing += [f"{where}.{name}" for name in names if name not in _INSTANCE_ATTRIBUTES and not hasattr(cls, name)]
    return missing


# --- Lightning -------------------------------------------------------------------------


def wandb_run_started(logger) -> bool:
    """Whether a Lightning WandbLogger has started its wandb run (reading `logger.experiment`
    would start one)."""
    require("lightning")
    return getattr(logger, "_experiment", None) is not None


def quiet_wandb_logger(logger):
    """Drop the `anonymous=None` that Lightning's WandbLogger always passes to `wandb.init`:
    wandb >= 0.23 removed anonymous mode and warns on any value (wandb/wandb pull request
    "refactor: remove anonymous mode support"). Other loggers pass through unchanged."""
    require("lightning")
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", "unset") is None:
        del init["anonymous"]
    return logger


def save_last_checkpoint(callback, trainer) -> None:
    """Have a ModelCheckpoint write its `last` checkpoint now (as it does at a save)."""
    require("lightning")
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# --- diffusers -------------------------------------------------------------------------


def rope_device_freqs(pos_embed, device):
    """`QwenEmbedRope`'s (positive, negative) frequency tables on `device`."""
    require("diffusers")
    return pos_embed._get_device_freqs(device)


def rope_video_freqs(pos_embed, frames: int, rows: int, cols: int, frame_index: int, device):
    """`QwenEmbedRope`'s frequencies of one (frames, rows, cols) image at `frame_index`: [frames*rows*cols, D/2]."""
    require("diffusers")
    return pos_embed._compute_video_freqs(frames, rows, cols, frame_index, device)


def checkpointed_block(transformer, block, *args):
    """`block(*args)` under the activation checkpointing that diffusers' ModelMixin set up
    (`enable_gradient_checkpointing`)."""
    require("diffusers")
    return transformer._gradient_checkpointing_func(block, *args)


@contextlib.contextmanager
def edit_source_area(area: int | None):
    """Within the block, `QwenImageEditPipeline` sizes its source image (the VAE's and the
    vision encoder's input), and `QwenImageEditPlusPipeline` its sources' VAE input, to
    about `area` pixels, aspect kept, instead of their fixed 1024 * 1024: the module-level `calculate_dimensions` of pipeline_qwenimage_edit, which
    `__call__` calls as `calculate_dimensions(1024 * 1024, ratio)`, is swapped for one
    that ignores the area asked for and uses `area` (sides still rounded to multiples
    of 32). `None` changes nothing. Not thread-safe: the swap is module-wide."""
    if area is None:
        yield
        return
    if area < 32 * 32:
        raise ValueError(f"edit_source_area = {area} must be at least 32 * 32 = 1024 pixels (or null)")
    require("diffusers")
    module = importlib.import_module(QWEN_EDIT_MODULE)
    call = inspect.unwrap(module.QwenImageEditPipeline.__call__)
    if "calculate_dimensions" not in call.__code__.co_names:
        raise IncompatibleVersionError(
            "QwenImageEditPipeline.__call__ no longer calls calculate_dimensions: edit_source_area cannot "
            f"resize the source (diffusers {installed_version('diffusers')}; written for {PINS['diffusers'].tested})")
    original = module.calculate_dimensions
    plus = importlib.import_module(QWEN_EDIT_PLUS_MODULE)
    plus_original = plus.calculate_dimensions
    vae_area = plus.VAE_IMAGE_SIZE

    def calculate_dimensions(target_area, ratio):
        return original(area, ratio)

    def plus_calculate_dimensions(target_area, ratio):
        # QwenImageEditPlusPipeline sizes each source twice: ~384² for the vision encoder
        # (CONDITION_IMAGE_SIZE, kept: training shows it that) and VAE_IMAGE_SIZE (swapped).
        return plus_original(area if target_area == vae_area else target_area, ratio)

    module.calculate_dimensions = calculate_dimensions
    plus.calculate_dimensions = plus_calculate_dimensions
    try:
        yield
    finally:
        module.calculate_dimensions = original
        plus.calculate_dimensions = plus_original


# What the quantization libraries log when diffusers or peft imports them (every
# process that loads a model, quantized or not), on a CPU-only torch: torchao's prebuilt
# CUDA extensions that cannot load, torch's notes about torchao's enums, bitsandbytes'
# try at a Hub kernel for AVX512-BF16 CPUs, and diffusers' note that old torchao tensor
# classes moved (it only matters for pickled torchao checkpoints, which nothing here
# reads). Exact messages are dropped; anything else these loggers say still shows.
IMPORT_CHATTER = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropChatter:
    def __init__(self, fragments: tuple[str, ...]):
        self.fragments = fragments

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def filter_import_chatter() -> None:
    """Install the `IMPORT_CHATTER` filters (once; before the libraries are imported)."""
    import logging

    for name, fragments in IMPORT_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropChatter) for f in logger.filters):
            logger.addFilter(_DropChatter(fragments))
