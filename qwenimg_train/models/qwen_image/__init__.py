"""Qwen-Image (20B MMDiT, Qwen2.5-VL encoder, AutoencoderKLQwenImage) and its edit
models, Qwen-Image-Edit (one source image) and Edit-2511 (`zero_cond_t`).

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
    tiny_worlds = TINY_WORLDS

    @property
    def max_sequence_length(self) -> int:
        from qwenimg_train.models.qwen_image.encoding import MAX_SEQUENCE_LENGTH

        return MAX_SEQUENCE_LENGTH

    def check_folder(self, path: str | Path) -> Path:
        from qwenimg_train.models.qwen_image.model import check_checkpoint_folder

        return check_checkpoint_folder(path)

    def build_tiny(self, path: str | Path, *, variant: str = "QwenImageEditPipeline", world: str = "random") -> Path:
        if world == "glyphs":
            from qwenimg_train.models.qwen_image.glyph_world import ensure_glyph_world

            return ensure_glyph_world(path, pipeline_class=variant)
        if world != "random":
            raise ValueError(f"tiny world {world!r}; use one of {TINY_WORLDS}")
        from qwenimg_train.models.qwen_image.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(path, pipeline_class=variant)

    def load_encoders(self, path: str | Path, *, dtype: str, max_sequence_length: int):
        from qwenimg_train.models.qwen_image.model import load_encoders

        return load_encoders(path, dtype=dtype, max_sequence_length=max_sequence_length)

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
