"""A quantized frozen base for LoRA (QLoRA-style): the transformer's weights stored in
8 or 4 bits, the adapter trained in fp32 on top.

The quantizers are the libraries made for it, reached the way diffusers exposes them
(`quantization_config` on `from_pretrained`); nothing here quantizes a tensor itself:

    model.base_dtype   library         diffusers config                          bytes/weight
    int8               torchao         TorchAoConfig(Int8WeightOnlyConfig)       1 (+ a scale per row)
    float8             torchao         TorchAoConfig(Float8WeightOnlyConfig)     1 (+ a scale per row)
    nf4                bitsandbytes    BitsAndBytesConfig(load_in_4bit, nf4)     0.5 (+ a scale per 64)

Every `nn.Linear` of the transformer is quantized, the other weights (norms,
modulation biases) are bf16. peft wraps the quantized layers in its own LoRA classes
(`TorchaoLoraLinear`, `lora.bnb.Linear4bit`), which add B·A to the dequantized
product, so the adapter API is the same as on a bf16 base (qwenimg_train.models.lora).

What to know (measured on the CPU here; benchmarks/bench_lora_memory.py):
- torchao's weight-only linears save a dequantized bf16 copy of each weight for the
  backward pass, so without gradient checkpointing an int8/float8 base saves nothing
  over bf16 in a training step; with `model.gradient_checkpointing=true` only one
  block's copies are alive at a time. bitsandbytes' 4-bit autograd saves none.
- diffusers' bitsandbytes quantizer refuses to load without a GPU ("No GPU found");
  on a CPU-only machine (tests, this project's CI) the check is skipped and the model
  is quantized on the CPU (`device_map="cpu"`), which bitsandbytes >= 0.48 supports.
- bitsandbytes >= 0.49 repacks a 4-bit weight in place into an inference layout the
  first time an eval-mode forward runs on an AVX512-BF16 CPU; a training step or a
  merge afterwards then reads a corrupted weight. The repack is switched off on load.
- DeepSpeed does not shard quantized tensors: a quantized base trains without ZeRO
  (one GPU, or DDP, where the frozen base is not broadcast: every rank loads it).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

QUANTIZED_BASES = ("int8", "float8", "nf4")
"""model.base_dtype values that quantize the frozen transformer."""

LIBRARY = {"int8": "torchao", "float8": "torchao", "nf4": "bitsandbytes"}

# Import-time chatter of the quantization libraries on a CPU-only torch: torchao's
# prebuilt CUDA extensions that cannot load ("Failed to load ..._C_mxfp8.so"), torch's
# pytree notes about torchao's enums, diffusers' note that torchao's old tensor classes
# moved, bitsandbytes' try at a Hub kernel for AVX512-BF16 CPUs. None of it matters to a
# run, and each would print once per process.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes", "bitsandbytes.backends.cpu.ops",
                  "diffusers.quantizers.torchao.torchao_quantizer", "diffusers.utils.import_utils")


def is_quantized_base(base_dtype: str | None) -> bool:
    return base_dtype in QUANTIZED_BASES


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_library(base_dtype: str):
    """The quantization library of `base_dtype`, imported once without its import-time
    chatter; a clear error when it is not installed."""
    name = LIBRARY[base_dtype]
    try:
        with _quiet_imports():
            if name == "torchao":
                import torchao.quantization as module
                from diffusers.quantizers.torchao import torchao_quantizer  # noqa: F401 (its import note)
            else:
                import bitsandbytes as module
    except ImportError as exc:
        raise ImportError(f"model.base_dtype = {base_dtype!r} needs {name} (pip install -e . installs it): {exc}") from exc
    return module


def quantization_config(base_dtype: str):
    """diffusers' `quantization_config` for `from_pretrained` that stores the frozen
    transformer as `base_dtype` (computing in bf16)."""
    if base_dtype not in QUANTIZED_BASES:
        raise ValueError(f"base_dtype = {base_dtype!r} is not a quantized base; use one of {QUANTIZED_BASES}")
    library = import_library(base_dtype)
    if base_dtype == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    from diffusers import TorchAoConfig

    if base_dtype == "int8":
        # version=2: torchao's Int8Tensor (version 1, the older AffineQuantizedTensor, is deprecated)
        return TorchAoConfig(quant_type=library.Int8WeightOnlyConfig(version=2))
    return TorchAoConfig(quant_type=library.Float8WeightOnlyConfig())


@contextlib.contextmanager
def _bitsandbytes_on_cpu() -> Iterator[None]:
    """diffusers' bitsandbytes quantizers raise "No GPU found" in `validate_environment`
    whenever CUDA is missing, though bitsandbytes quantizes on the CPU; the check is
    skipped for the load (only when there is no GPU; its version checks are met by the
    project's pins)."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer as q

    saved = q.BnB4BitDiffusersQuantizer.validate_environment
    q.BnB4BitDiffusersQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        q.BnB4BitDiffusersQuantizer.validate_environment = saved


def disable_cpu_repack(module: torch.nn.Module) -> None:
    """bitsandbytes >= 0.49 repacks a `Linear4bit` weight in place the first time an
    eval-mode forward without grad runs on an AVX512-BF16 CPU; training or merging after
    that reads a corrupted weight (measured: errors of 0.1 on weights of scale 0.06)."""
    import bitsandbytes as bnb

    for sub in module.modules():
        if isinstance(sub, bnb.nn.Linear4bit):
            sub.support_avx512bf16_for_cpu = False


def load_quantized(cls: type, folder: str | Path, base_dtype: str, overrides: Mapping[str, Any]) -> torch.nn.Module:
    """`cls.from_pretrained(folder, quantization_config=...)`: the frozen transformer
    stored as `base_dtype` (int8, float8, nf4), its other weights bf16. bitsandbytes
    quantizes where it places the weights: on this process's current GPU (a Lightning
    run sets it per rank before the model is built), or on the CPU where there is none.
    A torchao base is quantized on the CPU and moves with the module."""
    config = quantization_config(base_dtype)
    kwargs: dict[str, Any] = dict(quantization_config=config, dtype=torch.bfloat16, **overrides)
    if base_dtype == "nf4":
        on_gpu = torch.cuda.is_available()
        kwargs["device_map"] = {"": torch.cuda.current_device()} if on_gpu else "cpu"
        with (contextlib.nullcontext() if on_gpu else _bitsandbytes_on_cpu()), _quiet_imports():
            module = cls.from_pretrained(folder, **kwargs)
        disable_cpu_repack(module)
        return module
    with _quiet_imports():
        return cls.from_pretrained(folder, **kwargs)


def quantized_parameter_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters a quantizer replaced (torchao tensor subclasses,
    bitsandbytes' Params4bit): frozen, and not something DDP can broadcast."""
    names = []
    for name, param in module.named_parameters():
        if type(param) is not torch.nn.Parameter or type(param.data) is not torch.Tensor:
            names.append(name)
    return names


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers loaded `module` with a quantization_config."""
    return bool(getattr(module, "is_quantized", False))
