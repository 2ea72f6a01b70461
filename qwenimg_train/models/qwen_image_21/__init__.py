"""Qwen-Image-2.1: the first foundation of the second model family.

Qwen-Image-2.1 (diffusers `QwenImage21Pipeline`) differs from the first generation in
every component: a Qwen3-VL text encoder (`Qwen3VLForConditionalGeneration` with a
`Qwen3VLProcessor`) that reads condition images as vision tokens inside the prompt; a
single-stream, block-causal `QwenImage21Transformer2DModel` into whose `<|image_pad|>`
slots the condition latents are substituted (one slot = a 2x2 group of latents), with
`causal_condition` modulation and a prefix KV cache; a 16x RGBA VAE
(`AutoencoderKLQwenImage21`, 64-channel latents in the release, consumed unpatched);
and a flow-matching scheduler shifted over 256 -> 4096 tokens (0.5 -> 1.15).

Here now:

- `tiny`: `build_tiny_checkpoint` / `ensure_tiny_checkpoint` write a complete, tiny,
  random-weight diffusers folder that `QwenImage21Pipeline.from_pretrained(folder,
  processor=tiny.load_processor(folder))` loads unchanged; `load_processor` returns an
  image-only Qwen3VLProcessor where torchvision is missing.
- `encoding`: `PromptEncoder21`, the pipeline's `encode_prompt` without a pipeline
  (templates, left padding, system-turn drop derived from the processor, final-norm
  hook, condition images at the pipeline's condition size), for text-to-image prompts
  and prompts with one or more condition images; the template constants.

- `model`: `QwenImage21Model`, the trainable transformer around the frozen encoders:
  encoding per sample as the pipeline does it alone (conditions prepared, through
  Qwen3-VL and the VAE as RGBA, latents flattened unpatched) and a training forward run
  once per layout group (exact: each output is diffusers' own forward on the sample
  alone); the block-causal attention through diffusers' SDPA processor, or its flex
  processor with a compiled `flex_attention` on CUDA (`model.attention`).
- `QwenImage21Family`: the family seam (`model.family: qwen_image_21`, `model=tiny_21`).

Not here yet: RGBA targets and the glyph world. The planner's preset is
`qwen_image_21` (qwenimg_train/tools/plan.py, `SingleStreamSpec`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping


class QwenImage21Family:
    """Qwen-Image-2.1: one `QwenImage21Pipeline` for generation and editing (1-3 condition images)."""

    name = "qwen_image_21"
    planner_preset = "qwen_image_21"
    tiny_variants = ("QwenImage21Pipeline",)
    tiny_default_variant = "QwenImage21Pipeline"
    tiny_worlds = ("random",)
    max_sources = 3
    processor_in_t2i = True
    attention_paths = ("auto", "sdpa", "flex")  # model.attention_path_for: flex on CUDA, sdpa elsewhere
    max_sequence_length = 1024  # not a pipeline cap (2.1 does not truncate); the config's upper bound

    def check_folder(self, path: str | Path) -> Path:
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model.pretrained_path = {str(path)!r} is not a diffusers folder (no model_index.json): "
                             "download Qwen-Image-2.1 or use model=tiny_21")
        for part in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
            if not (path / part).is_dir():
                raise ValueError(f"model folder {str(path)!r} lacks {part}/: an incomplete download or export")
        return path

    def build_tiny(self, path: str | Path, *, variant: str | None = None, world: str = "random") -> Path:
        if world != "random":
            raise ValueError(f"tiny world {world!r}: Qwen-Image-2.1 has the random tiny model only")
        from qwenimg_train.models.qwen_image_21.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(path)

    def load_encoders(self, path: str | Path, *, dtype: str, max_sequence_length: int):
        from qwenimg_train.models.qwen_image_21.model import load_encoders

        return load_encoders(self.check_folder(path), dtype=dtype)

    def transformer_class(self) -> type:
        from diffusers import QwenImage21Transformer2DModel

        return QwenImage21Transformer2DModel

    def transformer_overrides(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def build_model(self, path: str | Path, encoders, *, options: Mapping[str, Any], load_transformer: Callable):
        from qwenimg_train.models.qwen_image_21.model import QwenImage21Model
        from qwenimg_train.models.weights import DTYPES

        if options.get("edit_fusion", "none") != "none":
            raise ValueError("model.edit_fusion applies to the first generation's dual-stream model only")
        folder = self.check_folder(path) / "transformer"
        base_dtype = options.get("base_dtype", "float32")
        extra = {} if base_dtype == "float32" else {"dtype": DTYPES.get(base_dtype, base_dtype)}
        transformer = load_transformer(self.transformer_class(), folder, {}, **extra)
        return QwenImage21Model(transformer, encoders, gradient_checkpointing=options.get("gradient_checkpointing", False),
                                lora=options.get("lora"), attention=options.get("attention", "auto"))

    def prompt_fingerprint(self) -> str:
        from qwenimg_train.models.qwen_image_21.encoding import IMAGE_SLOT, SYSTEM_PROMPT, T2I_TEMPLATE, TI2I_TEMPLATE

        return hashlib.sha256(json.dumps([SYSTEM_PROMPT, T2I_TEMPLATE, TI2I_TEMPLATE, IMAGE_SLOT]).encode()).hexdigest()[:16]

    def pipeline_classes(self) -> tuple[type, type]:
        from diffusers import QwenImage21Pipeline

        return QwenImage21Pipeline, QwenImage21Pipeline

    def load_processor(self, folder: str | Path):
        from qwenimg_train.models.qwen_image_21.tiny import load_processor

        return load_processor(folder)

    def pipelines(self, components: Mapping[str, Any], *, processor: Any | None):
        """One pipeline generates and edits: the same object serves both."""
        from diffusers import QwenImage21Pipeline

        parts = {k: components[k] for k in ("scheduler", "vae", "text_encoder", "transformer")}
        pipe = QwenImage21Pipeline(**parts, processor=processor if processor is not None else components["processor"])
        return pipe, pipe
