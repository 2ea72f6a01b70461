"""Weights of a diffusers model folder, read lazily, and the dtype names configs use (any family)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Mapping

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes weights may be stored or exported in, by config name."""


class SafetensorsFolder(Mapping):
    """name -> tensor of a diffusers weights folder, read on access (one file or the
    shards of an index), so a sharded load holds one tensor at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = folder / "diffusion_pytorch_model.safetensors"
            if not single.is_file():
                raise ValueError(f"{str(folder)!r} holds no diffusion_pytorch_model.safetensors[.index.json]")
            with safe_open(single, framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        self.folder = folder
        self.weight_map = weight_map
        self._open = safe_open

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(self.folder / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def read_safetensors_folder(folder: str | Path) -> Mapping[str, torch.Tensor]:
    return SafetensorsFolder(Path(folder))


def quiet_loading() -> None:
    """Turn off transformers' and diffusers' progress bars for loading weights ("Loading
    weights", "Loading pipeline components"): one bar per frozen model per process is
    chatter in a training or evaluation log. Their warnings and errors still show, and a
    pipeline's sampling bar is set per pipeline (`set_progress_bar_config`)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its first floating-point parameter's. A quantized
    base's integer storage (bitsandbytes' uint8 Params4bit) is skipped; torchao's
    quantized weights report the dtype they dequantize to."""
    for param in module.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    raise ValueError(f"{type(module).__name__} has no floating-point parameter")


def build_folder(path: Path, write: Callable[[Path], None], *, exist_ok: bool) -> Path:
    """A diffusers folder at `path`, whole or not at all: `write(tmp)` fills a sibling
    temporary folder, which is then renamed into place, so concurrent test workers or
    ranks can race safely (if another process finished first, its folder is kept). A
    folder holding model_index.json is kept when `exist_ok`, an error otherwise."""
    def complete(folder: Path) -> bool:
        return (folder / "model_index.json").is_file()

    if complete(path):
        if exist_ok:
            return path
        raise FileExistsError(f"{path} already holds a checkpoint; delete it to rebuild")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, path)  # atomic; replaces only an empty folder
        except OSError:
            if not complete(path):
                raise
            logging.getLogger(__name__).info("another process built %s first; keeping its folder", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
