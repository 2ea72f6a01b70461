"""The one way this project builds diffusers pipelines for sampling: a family's
text-to-image and edit pipelines over ONE set of modules (no copy of the weights),
either around the modules of a model being trained or loaded from an exported folder.
`qwenimg-eval`, `qwenimg-sample`, the demo and the OCR callback all come through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qwenimg_train.models import FAMILIES, ModelFamily, get_family
from qwenimg_train.models.weights import DTYPES, quiet_loading


def family_of_folder(folder: str | Path) -> ModelFamily:
    """The family whose pipelines load `folder` (from its model_index.json's class)."""
    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    for family_name in FAMILIES:
        family = get_family(family_name)
        if name in {cls.__name__ for cls in family.pipeline_classes()}:
            return family
    return get_family("qwen_image")


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """`auto`: CUDA in bfloat16 when there is a GPU, else the CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return device, DTYPES[dtype]


def pipelines_around(family: ModelFamily, *, scheduler, vae, text_encoder, tokenizer, transformer,
                     processor: Any | None):
    """(text-to-image, edit or None) around modules that already exist (a model being trained)."""
    components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    return family.pipelines(components, processor=processor)


def resolve_checkpoint(folder: str | Path, base_path: str | Path | None = None) -> tuple[Path, Path | None]:
    """(diffusers folder, adapter folder or None) of what a user points a tool at: a
    diffusers folder (an export, a released checkpoint) is itself; an adapter folder
    (`qwenimg-export lora=adapter`: pytorch_lora_weights.safetensors) needs its base,
    `base_path` or else the base its export record names."""
    from qwenimg_train.models.lora import LORA_WEIGHTS_NAME

    folder = Path(folder)
    if not (folder / LORA_WEIGHTS_NAME).is_file():
        if base_path is not None:
            raise ValueError(f"base_path = {str(base_path)!r} is set, but {str(folder)!r} holds no "
                             f"{LORA_WEIGHTS_NAME}: base_path goes with an adapter folder (qwenimg-export lora=adapter)")
        return folder, None
    if base_path is None:
        record = folder / "qwenimg_export.json"
        base_path = json.loads(record.read_text()).get("base_path") if record.is_file() else None
        if base_path is None:
            raise ValueError(f"{str(folder)!r} is a LoRA adapter whose base is not recorded: pass "
                             "base_path=<the base model's diffusers folder>")
    base = Path(base_path)
    if not (base / "model_index.json").is_file():
        raise ValueError(f"the adapter {str(folder)!r} needs its base model, but {str(base)!r} is not a diffusers "
                         "folder: pass base_path=<the base model's folder>")
    return base, folder


def load_pipelines(folder: str | Path, *, device: str = "auto", dtype: str = "auto", edit: bool = True,
                   base_path: str | Path | None = None, base_dtype: str | None = None):
    """(text-to-image, edit or None) over one set of modules loaded from a diffusers folder,
    or from an adapter folder on its base (`resolve_checkpoint`: diffusers'
    `load_lora_weights`); the edit pipeline only when `edit` and the folder has a
    processor (an edit model). `base_dtype` (int8, float8, nf4) loads the transformer
    quantized, as a QLoRA run trained it (qwenimg_train.models.quantize); the pipeline
    then computes in bfloat16."""
    from qwenimg_train.models.quantize import QUANTIZED_BASES, load_quantized

    folder, adapter = resolve_checkpoint(folder, base_path)
    family = family_of_folder(folder)
    folder = family.check_folder(folder)
    parts = {}
    if base_dtype is not None:
        if base_dtype not in QUANTIZED_BASES:
            raise ValueError(f"base_dtype = {base_dtype!r}; use null (the folder's weights in `dtype`) or one of "
                             f"{QUANTIZED_BASES}")
        if dtype not in ("auto", "bfloat16"):
            raise ValueError(f"base_dtype = {base_dtype!r} computes in bfloat16: use dtype=auto or bfloat16 "
                             f"(got {dtype!r})")
        dtype = "bfloat16"
    device, torch_dtype = resolve_device(device, dtype)
    quiet_loading()
    if base_dtype is not None:
        parts["transformer"] = load_quantized(family.transformer_class(), folder / "transformer", base_dtype, {})
    if family.processor_in_t2i:  # one pipeline for every task reads condition images through its processor
        parts["processor"] = family.load_processor(folder)
    t2i_class, _ = family.pipeline_classes()
    t2i = t2i_class.from_pretrained(folder, dtype=torch_dtype, **parts).to(device)
    if adapter is not None:
        t2i.load_lora_weights(adapter)
    processor = family.load_processor(folder) if edit else None
    t2i, edit_pipe = family.pipelines(t2i.components, processor=processor)
    for pipe in (t2i, edit_pipe):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return t2i, edit_pipe
