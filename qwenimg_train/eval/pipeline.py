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


def load_pipelines(folder: str | Path, *, device: str = "auto", dtype: str = "auto", edit: bool = True):
    """(text-to-image, edit or None) over one set of modules loaded from a diffusers folder;
    the edit pipeline only when `edit` and the folder has a processor (an edit model)."""
    folder = Path(folder)
    family = family_of_folder(folder)
    folder = family.check_folder(folder)
    device, torch_dtype = resolve_device(device, dtype)
    t2i_class, _ = family.pipeline_classes()
    quiet_loading()
    t2i = t2i_class.from_pretrained(folder, dtype=torch_dtype).to(device)
    processor = family.load_processor(folder) if edit else None
    t2i, edit_pipe = family.pipelines(t2i.components, processor=processor)
    for pipe in (t2i, edit_pipe):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return t2i, edit_pipe
