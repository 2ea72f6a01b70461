"""Qwen-Image (20B MMDiT, Qwen2.5-VL encoder, AutoencoderKLQwenImage) and its edit
models: Qwen-Image-Edit (one source image, `QwenImageFamily`) and the multi-image
Edit-Plus releases 2509 and 2511 (one to three sources announced as "Picture N",
`QwenImageEditPlusFamily`; 2511 sets `zero_cond_t`). One transformer class, one VAE,
one vision-language encoder: the families differ in the edit prompt and its pipeline.

- `encoding.py`: prompt templates and encoding as diffusers' pipelines do, latent packing;
- `transformer.py`: the mixed-batch forward (per-sample rotary, image-token mask);
- `model.py`: loading from a diffusers folder, the trainable model (encode, denoise);
- `tiny.py`: a tiny random-weight folder built in-process;
- `glyph_vae.py`, `glyph_world.py`: the learnable tiny world (a VAE fitted on glyphs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping


TINY_WORLDS = ("random", "glyphs")


class QwenImageFamily:
    name = "qwen_image"
    planner_preset = "qwen_image"
    tiny_variants = ("QwenImagePipeline", "QwenImageEditPipeline")
    tiny_default_variant = "QwenImageEditPipeline"
    tiny_worlds = TINY_WORLDS
    edit_style = "single"  # encoding.PromptEncoder: one source in the edit template
    max_sources = 1  # source images an edit sample may have (the loader filters edits with more out)
    processor_in_t2i = False  # QwenImagePipeline has no processor; the edit pipelines take it
    attention_paths = ("auto", "sdpa")  # its own processor (transformer.py) runs SDPA with a padding mask

    @property
    def max_sequence_length(self) -> int:
        from qwenimg_train.models.qwen_image.encoding import MAX_SEQUENCE_LENGTH

        return MAX_SEQUENCE_LENGTH

    def check_folder(self, path: str | Path) -> Path:
        from qwenimg_train.models.qwen_image.model import check_checkpoint_folder

        return check_checkpoint_folder(path)

    def build_tiny(self, path: str | Path, *, variant: str | None = None, world: str = "random") -> Path:
        variant = variant or self.tiny_default_variant
        if variant not in self.tiny_variants:
            raise ValueError(f"tiny variant {variant!r}; {self.name} builds {', '.join(self.tiny_variants)}")
        if world == "glyphs":
            from qwenimg_train.models.qwen_image.glyph_world import ensure_glyph_world

            return ensure_glyph_world(path, pipeline_class=variant)
        if world != "random":
            raise ValueError(f"tiny world {world!r}; use one of {TINY_WORLDS}")
        from qwenimg_train.models.qwen_image.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(path, pipeline_class=variant)

    def load_encoders(self, path: str | Path, *, dtype: str, max_sequence_length: int):
        from qwenimg_train.models.qwen_image.model import load_encoders

        return load_encoders(path, dtype=dtype, max_sequence_length=max_sequence_length, edit_style=self.edit_style)

    def transformer_class(self) -> type:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    def build_model(self, path: str | Path, encoders, *, options: Mapping[str, Any],
                    load_transformer: Callable):
        from qwenimg_train.models.qwen_image.model import QwenImageModel
        from qwenimg_train.models.weights import DTYPES

        folder = self.check_folder(path) / "transformer"
        base_dtype = options.get("base_dtype", "float32")  # a LoRA run's frozen base: bf16 or quantized
        extra = {} if base_dtype == "float32" else {"dtype": DTYPES.get(base_dtype, base_dtype)}
        transformer = load_transformer(self.transformer_class(), folder, self.transformer_overrides(options), **extra)
        return QwenImageModel(transformer, encoders, edit_fusion=options.get("edit_fusion", "none"),
                              gradient_checkpointing=options.get("gradient_checkpointing", False),
                              lora=options.get("lora"))

    def transformer_overrides(self, options: Mapping[str, Any]) -> dict[str, Any]:
        zero_cond_t = options.get("zero_cond_t")
        return {} if zero_cond_t is None else {"zero_cond_t": zero_cond_t}

    def prompt_fingerprint(self) -> str:
        from qwenimg_train.models.qwen_image.encoding import EDIT_DROP, EDIT_TEMPLATE, T2I_DROP, T2I_TEMPLATE

        blob = json.dumps([T2I_TEMPLATE, T2I_DROP, EDIT_TEMPLATE, EDIT_DROP]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import QwenImageEditPipeline, QwenImagePipeline

        return QwenImagePipeline, QwenImageEditPipeline

    def load_processor(self, folder: str | Path):
        """The folder's processor/ (an image-only fallback where torchvision is missing), or None."""
        from qwenimg_train.models.qwen_image.encoding import load_processor

        return load_processor(folder) if (Path(folder) / "processor").is_dir() else None

    def pipelines(self, components: Mapping[str, Any], *, processor: Any | None):
        t2i_class, edit_class = self.pipeline_classes()
        parts = {k: components[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")}
        t2i = t2i_class(**parts)
        edit = edit_class(**parts, processor=processor) if processor is not None else None
        return t2i, edit


class QwenImageEditPlusFamily(QwenImageFamily):
    """Qwen-Image-Edit-2509 / 2511 (`QwenImageEditPlusPipeline`): the Qwen-Image transformer
    (2511: `zero_cond_t`), edits with one to three source images. Each source is shown
    to Qwen2.5-VL at about 384² behind "Picture N:" (encoding.PromptEncoder.encode_edit_plus)
    and its VAE latents follow the target's, `img_shapes` listing target then sources."""

    name = "qwen_image_edit_plus"
    planner_preset = "qwen_image_edit"
    tiny_variants = ("QwenImageEditPlusPipeline",)
    tiny_default_variant = "QwenImageEditPlusPipeline"
    edit_style = "plus"
    max_sources = 3

    def check_folder(self, path: str | Path) -> Path:
        folder = super().check_folder(path)
        if not (folder / "processor").is_dir():
            raise ValueError(f"model.pretrained_path = {str(folder)!r} has no processor/: multi-image editing needs a "
                             "Qwen-Image-Edit-2509 or -2511 folder")
        return folder

    def prompt_fingerprint(self) -> str:
        from qwenimg_train.models.qwen_image.encoding import (EDIT_PLUS_DROP, EDIT_PLUS_PICTURE, EDIT_PLUS_TEMPLATE,
                                                              T2I_DROP, T2I_TEMPLATE, CONDITION_AREA)

        blob = json.dumps([T2I_TEMPLATE, T2I_DROP, EDIT_PLUS_TEMPLATE, EDIT_PLUS_PICTURE, EDIT_PLUS_DROP,
                           CONDITION_AREA]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

        return QwenImagePipeline, QwenImageEditPlusPipeline
