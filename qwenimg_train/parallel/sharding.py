"""Sharded construction: everything that depends on whether ZeRO-3 partitions parameters.

Under DeepSpeed ZeRO-3 a module built inside its `zero.Init` context holds, on each
rank, a flat shard of every parameter (`ds_tensor`), with the real shape kept aside
(`ds_shape`); reading or writing a whole parameter means gathering it. Model, EMA and
optimizer code ask this module instead (`parameter_shape`, `local_shard`,
`is_sharded`), and build their transformer through `load_transformer`, which does the
right thing in both worlds. It is the only module outside the strategies that knows
the layout, so nothing else imports or duck-types DeepSpeed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


def _partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def sharded_init_active() -> bool:
    """Whether modules built now are partitioned at construction (deepspeed.zero.Init)."""
    if "deepspeed" not in sys.modules:
        return False
    import deepspeed.runtime.zero.partition_parameters as partition

    return bool(partition.zero_init_context)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is a ZeRO-3 partition."""
    return any(_partitioned(p) for p in module.parameters())


def parameter_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape (a ZeRO-3 partition is a flat shard of it)."""
    return getattr(param, "ds_shape", param.shape)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its flat shard under ZeRO-3
    (rank r holds elements [r*s, (r+1)*s) of the flattened parameter, zero-padded), the
    parameter itself otherwise."""
    return getattr(param, "ds_tensor", param)


def load_transformer(cls: type, folder: str | Path, overrides: Mapping[str, Any], *, rank: int = 0,
                     dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """`cls.from_pretrained(folder, **overrides)` in `dtype` (a LoRA run's frozen base: bf16,
    or a quantized base's name, int8/float8/nf4: qwenimg_train.models.quantize);
    inside a sharded-init context the module is built from its config instead
    (partitioned as it is constructed; DeepSpeed's precision sets its dtype, `dtype` is
    not used) and its weights are loaded one parameter at a time (`load_weights`), so no
    rank ever holds the whole model."""
    from qwenimg_train.models.quantize import QUANTIZED_BASES, load_quantized
    from qwenimg_train.models.weights import read_safetensors_folder

    folder = Path(folder)
    if dtype in QUANTIZED_BASES:
        if sharded_init_active():
            raise ValueError(f"a {dtype} base cannot be sharded by ZeRO-3: DeepSpeed does not partition quantized "
                             "weights (use model.base_dtype=bfloat16 under ZeRO-3)")
        return load_quantized(cls, folder, dtype, overrides)
    if not sharded_init_active():
        return cls.from_pretrained(folder, dtype=dtype, **overrides)
    config = dict(cls.load_config(folder), **overrides)
    module = cls.from_config(config)
    load_weights(module, read_safetensors_folder(folder), rank=rank)
    return module


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, rank: int = 0) -> None:
    """`module.load_state_dict(state_dict, strict=True)`, also when ZeRO-3 partitioned
    the module's parameters: each is gathered in turn, filled on rank 0 and
    re-partitioned (deepspeed.zero.GatheredParameters with modifier_rank=0), so no rank
    ever holds more than one full parameter beyond its shard."""
    params = dict(module.named_parameters())
    expected = set(module.state_dict().keys())
    buffers = {k: b for k, b in module.named_buffers() if k in expected}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if not any(_partitioned(p) for p in params.values()):
        module.load_state_dict(state_dict, strict=True)
        return
    import deepspeed

    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(state_dict[name].to(param.dtype))
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(state_dict[name])


def zero_parameters(params: Iterable[torch.Tensor], *, rank: int = 0) -> None:
    """Set parameters to zero, also when ZeRO-3 partitioned them (gathered in turn)."""
    params = list(params)
    if not any(_partitioned(p) for p in params):
        with torch.no_grad():
            for p in params:
                p.zero_()
        return
    import deepspeed

    for p in params:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.zero_()


def finish_lora(model: torch.nn.Module, *, rank: int = 0) -> None:
    """peft zeroes every `lora_B` at creation (the adapter starts as the identity); on
    partitioned parameters that write is lost, so it is redone on the gathered ones."""
    if is_sharded(model):
        zero_parameters([p for n, p in model.named_parameters() if ".lora_B." in n], rank=rank)


def apply_activation_checkpointing(transformer: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (diffusers' own switch:
    its blocks run under torch.utils.checkpoint)."""
    transformer.enable_gradient_checkpointing()


def consolidate_zero_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A DeepSpeed ZeRO-3 checkpoint directory as (fp32 state dict from every rank's
    partition, the Lightning state from rank 0's file)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_file

    tag = (path / "latest").read_text().strip()
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    checkpoint = torch.load(get_model_state_file(str(path / tag), 3), map_location="cpu", weights_only=True)
    return {k.removeprefix("_forward_module."): v for k, v in state_dict.items()}, checkpoint


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory (its `latest` file names the tag)."""
    return path.is_dir() and (path / "latest").is_file()
