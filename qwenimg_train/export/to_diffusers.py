"""`qwenimg-export`: a training checkpoint to a diffusers folder (or a LoRA file).

    qwenimg-export checkpoint=outputs/demo/train/checkpoints/last.ckpt out_dir=outputs/demo/export [weights=ema|raw]
    qwenimg-export checkpoint=RUN/checkpoints/last.ckpt out_dir=EXPORT lora=adapter|merged   (a LoRA run)

A ZeRO-3 checkpoint (a directory of per-rank shards) is consolidated in memory first.
The folder is the training run's base model folder (`model.pretrained_path`, read from
the config saved in the checkpoint) with `transformer/` replaced by the trained
weights: the EMA shadow (`weights=ema`, the default) or the raw weights. The frozen
components (VAE, text encoder, tokenizer, processor, scheduler, model_index.json) are
hard-linked when the file system allows (the 7B encoder is not copied), else copied.
`QwenImagePipeline.from_pretrained` / `QwenImageEditPipeline.from_pretrained` load the
result. It is written to a temporary sibling and renamed into place, so an
interrupted export never leaves a half-written folder at `out_dir`.

A LoRA run (`model.lora` set in the checkpoint's config) exports its adapter:
`lora=adapter` (what `auto` picks) writes `out_dir/pytorch_lora_weights.safetensors`
in diffusers' LoRA format, for `QwenImagePipeline.load_lora_weights(out_dir)` on the
base folder; `lora=merged` writes the full folder as above, its transformer the base
weights with the adapter folded in (`qwenimg_train.models.lora`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from typing import Any

from qwenimg_train.config.schema import saved_model_config
from qwenimg_train.models import get_family
from qwenimg_train.models.lora import LoraSettings, apply_lora, is_lora_key, merge_lora, save_adapter
from qwenimg_train.models.qwen_image.transformer import discarded_text_stream_names
from qwenimg_train.models.weights import DTYPES
from qwenimg_train.parallel.sharding import consolidate_zero_checkpoint, load_transformer

log = logging.getLogger("qwenimg-export")

TRANSFORMER_PREFIX = "model.transformer."
WEIGHTS = ("ema", "raw")
LORA_MODES = ("auto", "adapter", "merged")


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
    """dtype of the saved transformer or adapter (bfloat16 halves a released-size export)."""
    lora: str = "auto"
    """A LoRA run's export: adapter (diffusers' LoRA file, for `load_lora_weights`) or merged (a full
    folder, the adapter folded into transformer/); auto: adapter. A full fine-tune takes auto only."""

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights = {self.weights!r}; use one of {WEIGHTS}")
        if self.lora not in LORA_MODES:
            raise ValueError(f"lora = {self.lora!r}; use one of {LORA_MODES}")
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


def lora_state(checkpoint: dict, weights: str) -> dict[str, torch.Tensor]:
    """A LoRA run's adapter tensors (peft names, e.g. `...attn.to_q.lora_A.default.weight`)."""
    state = {k: v for k, v in transformer_state(checkpoint, weights).items() if is_lora_key(k)}
    if weights == "ema":
        # The EMA tracks trainable tensors only; the adapter's frozen ones (on the last block's
        # discarded text stream, lora_B still 0) come from the raw weights, so the file is whole.
        raw = {k: v for k, v in transformer_state(checkpoint, "raw").items() if is_lora_key(k)}
        state = {**raw, **state}
    if not state:
        raise ValueError(f"the checkpoint's {weights} weights hold no LoRA tensors, though its config sets model.lora")
    return state


def export_mode(lora: str, settings: LoraSettings | None) -> str:
    """full (a folder of trained weights), adapter or merged, from the job's `lora` and the run's."""
    if settings is None:
        if lora != "auto":
            raise ValueError(f"lora = {lora!r}, but the checkpoint was trained without LoRA (model.lora: null): "
                             "export with lora=auto (the full weights)")
        return "full"
    return "adapter" if lora == "auto" else lora


def merged_transformer(family, base: Path, state: dict[str, torch.Tensor], settings: LoraSettings,
                       overrides: dict[str, Any]):
    """The base folder's transformer with the adapter `state` folded into its weights."""
    transformer = load_transformer(family.transformer_class(), base / "transformer", overrides)
    apply_lora(transformer, settings)
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    # a ZeRO-3 checkpoint leaves out the frozen adapter tensors of the discarded text stream
    # (lora_B 0 there: the freshly built adapter is what they were)
    frozen = set(discarded_text_stream_names(transformer))
    missing = [k for k in missing if is_lora_key(k) and k not in frozen]
    if missing or unexpected:
        raise ValueError(f"the adapter does not match model.lora on the base transformer: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    merge_lora(transformer)
    return transformer


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def load_training_checkpoint(path: Path) -> dict:
    """A training checkpoint as one dict: a Lightning file as is; a DeepSpeed ZeRO-3
    directory consolidated in memory (fp32 weights from every rank's partition, the
    Lightning state from rank 0's file, the EMA from its per-rank shard files)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not (path / "latest").is_file():
        raise ValueError(f"checkpoint = {str(path)!r} is neither a checkpoint file nor a DeepSpeed checkpoint directory")
    from qwenimg_train.training.callbacks.ema import consolidate_shards

    state_dict, checkpoint = consolidate_zero_checkpoint(path)
    checkpoint["state_dict"] = state_dict
    ema = checkpoint.get("callbacks", {}).get("ema")
    if ema and ema.get("sharded"):
        checkpoint["callbacks"]["ema"] = {"shadow": consolidate_shards(path), "updates": ema.get("updates")}
    return checkpoint


def export(job: ExportJob) -> Path:
    ckpt_path = Path(job.checkpoint)
    if not ckpt_path.exists():
        raise ValueError(f"checkpoint = {job.checkpoint!r} does not exist")
    checkpoint = load_training_checkpoint(ckpt_path)
    if not checkpoint.get("qwenimg_config"):
        raise ValueError(f"checkpoint = {job.checkpoint!r} carries no run config (qwenimg_config): it was not "
                         "written by qwenimg-train")
    model_cfg = saved_model_config(checkpoint["qwenimg_config"])
    family = get_family(model_cfg.family)
    settings = model_cfg.lora
    mode = export_mode(job.lora, settings)
    base = job.base_path or model_cfg.pretrained_path
    overrides = family.transformer_overrides(model_cfg.options())
    record = {"checkpoint": str(ckpt_path), "weights": job.weights, "global_step": checkpoint.get("global_step"),
              "base_path": str(base) if base is not None else None, "dtype": job.dtype, "lora": mode}
    dtype = DTYPES[job.dtype]

    out = Path(job.out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if mode == "adapter":
        # The adapter alone: the base folder is not needed (nor read) to write it.
        if overrides:
            log.warning("the run set %s, which a LoRA file cannot carry: load the base transformer with the same, "
                        "or export lora=merged", ", ".join(f"model.{k}={v}" for k, v in overrides.items()))
        state = {k: v.to(dtype) for k, v in lora_state(checkpoint, job.weights).items()}
        tmp.mkdir(parents=True)
        save_adapter(tmp, state, settings)
        record["lora_settings"] = dataclasses.asdict(settings)
    else:
        if base is None:
            raise ValueError("the checkpoint does not name its base model: pass base_path=<diffusers folder>")
        base = family.check_folder(base)
        if mode == "merged":
            transformer = merged_transformer(family, base, lora_state(checkpoint, job.weights), settings, overrides)
            record["lora_settings"] = dataclasses.asdict(settings)
        else:
            state = transformer_state(checkpoint, job.weights)
            # The base's weights first: what training froze (the last block's discarded text
            # stream, `freeze_discarded_text_stream`) is not in the checkpoint and keeps them.
            transformer = load_transformer(family.transformer_class(), base / "transformer", overrides)
            missing, unexpected = transformer.load_state_dict(state, strict=False)
            frozen = set(discarded_text_stream_names(transformer))
            missing = [k for k in missing if k not in frozen]
            if missing or unexpected:
                raise ValueError(f"checkpoint does not match the base transformer: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}")
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("transformer"), copy_function=_link_or_copy)
        if dtype != torch.float32:
            transformer.to(dtype)
        transformer.save_pretrained(tmp / "transformer")
    (tmp / "qwenimg_export.json").write_text(json.dumps(record, indent=1))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported %s (%s weights, step %s, %s) to %s", ckpt_path, job.weights, checkpoint.get("global_step"),
             mode, out)
    return out


if __name__ == "__main__":
    from qwenimg_train.cli import export as main

    main()
