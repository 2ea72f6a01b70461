"""`qwenimg-export`: a training checkpoint to a diffusers folder.

    qwenimg-export checkpoint=outputs/demo/train/checkpoints/last.ckpt out_dir=outputs/demo/export [weights=ema|raw]

The folder is the training run's base model folder (`model.pretrained_path`, read from
the config saved in the checkpoint) with `transformer/` replaced by the trained
weights: the EMA shadow (`weights=ema`, the default) or the raw weights. The frozen
components (VAE, text encoder, tokenizer, processor, scheduler, model_index.json) are
hard-linked when the file system allows (the 7B encoder is not copied), else copied.
`QwenImagePipeline.from_pretrained` / `QwenImageEditPipeline.from_pretrained` load the
result. It is written to a temporary sibling and renamed into place, so an
interrupted export never leaves a half-written folder at `out_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from data_pipelines.config import from_mapping, user_errors_exit
from qwenimg_train.model import DTYPES, check_checkpoint_folder
from qwenimg_train.train import config_dir

log = logging.getLogger("qwenimg-export")

TRANSFORMER_PREFIX = "model.transformer."
WEIGHTS = ("ema", "raw")


@dataclass
class ExportJob:
    checkpoint: str
    """A Lightning checkpoint written by qwenimg-train (e.g. <run>/checkpoints/last.ckpt)."""
    out_dir: str
    """Where the diffusers folder goes; an existing one is replaced."""
    weights: str = "ema"
    """ema: the EMA shadow weights; raw: the optimised weights."""
    base_path: str | None = None
    """The base model folder; default: the run's model.pretrained_path."""
    dtype: str = "float32"
    """dtype of the saved transformer (bfloat16 halves a released-size export)."""

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights = {self.weights!r}; use one of {WEIGHTS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}; use one of {sorted(DTYPES)}")


def transformer_state(checkpoint: dict, weights: str) -> dict[str, torch.Tensor]:
    """The transformer's tensors from a checkpoint, under diffusers' names."""
    if weights == "ema":
        ema = checkpoint.get("callbacks", {}).get("ema")
        if not ema:
            raise ValueError("the checkpoint holds no EMA weights (run trained with callbacks.ema=null); "
                             "export with weights=raw")
        source = ema["shadow"]
    else:
        source = checkpoint["state_dict"]
    state = {k[len(TRANSFORMER_PREFIX):]: v for k, v in source.items() if k.startswith(TRANSFORMER_PREFIX)}
    other = sorted(k for k in source if not k.startswith(TRANSFORMER_PREFIX))
    if other:
        log.warning("not part of a diffusers export (e.g. the edit_fusion gate): %s", other[:4])
    if not state:
        raise ValueError("the checkpoint holds no transformer weights")
    return state


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def export(job: ExportJob) -> Path:
    from diffusers import QwenImageTransformer2DModel

    ckpt_path = Path(job.checkpoint)
    if not ckpt_path.is_file():
        raise ValueError(f"checkpoint = {job.checkpoint!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = checkpoint.get("qwenimg_config") or {}
    base = job.base_path or config.get("model", {}).get("pretrained_path")
    if base is None:
        raise ValueError("the checkpoint does not name its base model: pass base_path=<diffusers folder>")
    base = check_checkpoint_folder(base)
    state = transformer_state(checkpoint, job.weights)

    transformer_config = QwenImageTransformer2DModel.load_config(base / "transformer")
    zero_cond_t = config.get("model", {}).get("zero_cond_t")
    if zero_cond_t is not None:
        transformer_config["zero_cond_t"] = zero_cond_t
    transformer = QwenImageTransformer2DModel.from_config(transformer_config)
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the base transformer: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")

    out = Path(job.out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("transformer"), copy_function=_link_or_copy)
    if DTYPES[job.dtype] != torch.float32:
        transformer.to(DTYPES[job.dtype])
    transformer.save_pretrained(tmp / "transformer")
    (tmp / "qwenimg_export.json").write_text(json.dumps({
        "checkpoint": str(ckpt_path), "weights": job.weights, "global_step": checkpoint.get("global_step"),
        "base_path": str(base), "dtype": job.dtype,
    }, indent=1))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported %s (%s weights, step %s) to %s", ckpt_path, job.weights, checkpoint.get("global_step"), out)
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def _main(cfg: DictConfig) -> None:
    with user_errors_exit(log):
        plain = {k: v for k, v in dict(cfg).items() if k != "hydra"}
        out = export(from_mapping(ExportJob, plain, "export"))
    print(out)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
