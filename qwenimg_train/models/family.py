"""The model-family seam: what the trainer, the tools and the data jobs need from one
generation of the model, and nothing else.

A family loads its frozen encoders and its transformer from a diffusers folder, builds
a tiny folder in-process (tests, the demo), assembles the trainable model (whose
`encode_batch(batch)` encodes prompts and condition images exactly as the family's
pipelines do and whose `denoise(x, sigmas, inputs)` runs a mixed batch), names the
diffusers pipeline classes that load an export, fingerprints its prompt templates
(precomputed encoder outputs carry it) and gives the planner its preset name.

`training/`, `eval/`, `export/` and `tools/` reach a family only through
`get_family(name)`; none of them names a family's classes. A new generation is a new
module beside `qwen_image/` plus one line in `FAMILIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ModelFamily(Protocol):
    name: str
    """The `model.family` value that selects it."""
    planner_preset: str
    """The `qwenimg-plan` preset of the released model (qwenimg_train.tools.plan.PRESETS)."""
    tiny_variants: tuple[str, ...]
    """What `build_tiny(path, variant=...)` can build (its model_index pipeline class)."""
    tiny_default_variant: str
    """The variant `model.pipeline_class: null` builds."""
    max_sequence_length: int
    """The longest prompt (tokens after the template prefix) its pipelines encode."""
    max_sources: int
    """Source images one edit may have (1: single-image editing; the loader filters edits with more out)."""
    processor_in_t2i: bool
    """Whether its text-to-image pipeline takes the processor too (one pipeline for every task)."""
    attention_paths: tuple[str, ...]
    """The `model.attention` values it takes ("auto" first: the best path on the training device)."""

    def check_folder(self, path: str | Path) -> Path:
        """`path` if it is a complete diffusers folder of this family; a ValueError naming the fix otherwise."""

    tiny_worlds: tuple[str, ...]
    """What `build_tiny(path, world=...)` can build: "random" weights, or "glyphs" (a VAE fitted on
    glyph renders and a transformer sized to learn to draw them on a CPU)."""

    def build_tiny(self, path: str | Path, *, variant: str | None = None, world: str = "random") -> Path:
        """A tiny folder at `path` (built once; an existing one is reused)."""

    def load_encoders(self, path: str | Path, *, dtype: str, max_sequence_length: int) -> Any:
        """The frozen encoders (VAE, vision-language encoder, tokenizer, processor); their
        `encode_ahead(samples, null_prompts=)` gives the precompute job's tensors, which the
        model's `encode_batch` collates (data_pipelines.core.precomputed)."""

    def transformer_class(self) -> type:
        """The diffusers transformer class of its checkpoints."""

    def transformer_overrides(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Config entries of the transformer that the model options (`ModelConfig.options()`) override."""

    def build_model(self, path: str | Path, encoders: Any, *, options: Mapping[str, Any],
                    load_transformer: Callable[[type, Path, dict[str, Any]], "torch.nn.Module"]) -> "torch.nn.Module":
        """The trainable model around `encoders` (None: precomputed inputs). The strategy
        layer supplies `load_transformer(cls, folder, config_overrides)`, which builds the
        transformer plainly or partitioned as it is constructed (qwenimg_train.parallel)."""

    def prompt_fingerprint(self) -> str:
        """A digest of the prompt templates and dropped-prefix counts (precomputed shards carry it)."""

    def pipelines(self, components: Mapping[str, Any], *, processor: Any | None) -> tuple[Any, Any | None]:
        """(text-to-image pipeline, edit pipeline or None) over one set of modules, no copy of the weights."""

    def pipeline_classes(self) -> tuple[type, type]:
        """(text-to-image, edit) diffusers pipeline classes that load this family's exports."""


def get_family(name: str) -> ModelFamily:
    """The family called `name` (`model.family`)."""
    if name not in FAMILIES:
        raise ValueError(f"model.family = {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]()


def _qwen_image() -> ModelFamily:
    from qwenimg_train.models.qwen_image import QwenImageFamily

    return QwenImageFamily()


def _qwen_image_edit_plus() -> ModelFamily:
    from qwenimg_train.models.qwen_image import QwenImageEditPlusFamily

    return QwenImageEditPlusFamily()


def _qwen_image_21() -> ModelFamily:
    from qwenimg_train.models.qwen_image_21 import QwenImage21Family

    return QwenImage21Family()


FAMILIES: dict[str, Callable[[], ModelFamily]] = {
    "qwen_image": _qwen_image,
    "qwen_image_edit_plus": _qwen_image_edit_plus,
    "qwen_image_21": _qwen_image_21,
}
