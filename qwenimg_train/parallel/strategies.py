"""Distributed strategies, built from configs/strategy/*.yaml (`_target_` entries).

- `ddp`: Lightning's DDPStrategy (gloo on CPU, NCCL on GPU).
- `deepspeed`: Lightning's DeepSpeedStrategy with the DeepSpeed config from the YAML
  (ZeRO-3, optional CPU offload). Lightning refuses DeepSpeed on anything but CUDA;
  `CPUDeepSpeedStrategy` lifts exactly the three CUDA assumptions (the environment
  check, the device-index check, the root device) so ZeRO-3 runs on CPU ranks with
  gloo: the tests and the memory benchmark run the real partitioning. It is chosen
  only when the accelerator is the CPU.

This is the one place that knows about DeepSpeed; model and objective code never
import it. `load_weights` loads a state dict into a module whose parameters ZeRO-3
partitioned at construction (gathering one parameter at a time).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

log = logging.getLogger(__name__)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy on CPU ranks (gloo). Only the CUDA-only checks differ."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment refuses non-CUDA accelerators; run what
        # its parent does instead (accelerator environment, then setup_distributed).
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # The device-index check compares CUDA indices with local ranks; CPU devices
        # have no index.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the device index as the rank's device number (None breaks it);
        # CPU ranks all have device 0.
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or "gloo"

    def _setup_model_and_optimizer(self, *args, **kwargs):
        with _fp32_master_shares_partition():
            return super()._setup_model_and_optimizer(*args, **kwargs)


@contextlib.contextmanager
def _fp32_master_shares_partition():
    """Let ZeRO-3's fp32 master weights be the fp32 parameter partition itself.

    DeepSpeed 0.19 means to skip the master copy when the partition already has the
    master dtype and device, but compares a torch.device with the device *string*
    (always unequal), so fp32 training keeps a second fp32 copy of every partition:
    16 instead of 12 bytes per parameter and rank (benchmarks/bench_zero.py; fixed
    upstream by deepspeedai/DeepSpeed#7651). While the optimizer is built, the
    comparison sees a torch.device.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

    def create(optimizer):
        device = optimizer.device
        optimizer.device = torch.device(device)
        try:
            return original(optimizer)
        finally:
            optimizer.device = device

    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = original


def ddp(*, accelerator: str = "auto", find_unused_parameters: bool = True, **kwargs: Any) -> Strategy:
    """DDP. `find_unused_parameters` defaults on: the last MMDiT block's text-stream MLP
    feeds nothing (diffusers discards the text stream after the last block), so those
    parameters get no gradient, and DDP without it stops with an error."""
    return DDPStrategy(find_unused_parameters=find_unused_parameters, **kwargs)


def deepspeed(*, accelerator: str = "auto", precision: str = "32-true", config: Mapping[str, Any],
              **kwargs: Any) -> Strategy:
    """DeepSpeed with the YAML's config; its `bf16.enabled` follows trainer.precision
    (bf16-mixed on GPU; fp32 on CPU, where DeepSpeed's bf16 path is not supported)."""
    from omegaconf import OmegaConf

    # Plain containers: DeepSpeed stores its config in every checkpoint, which must load
    # with torch.load(weights_only=True) (no OmegaConf objects to unpickle).
    config = OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)
    bf16 = dict(config.get("bf16") or {})
    bf16["enabled"] = str(precision).startswith("bf16")
    config["bf16"] = bf16
    if accelerator == "cpu":
        for key in ("offload_optimizer", "offload_param"):
            offload = config.get("zero_optimization", {}).get(key)
            if offload and offload.get("pin_memory"):
                offload["pin_memory"] = False  # pinned memory needs CUDA
        return CPUDeepSpeedStrategy(config=config, **kwargs)
    return DeepSpeedStrategy(config=config, **kwargs)


def optimizer_step_skipped(trainer) -> bool:
    """Whether DeepSpeed skipped the optimizer step just taken (a non-finite gradient
    norm; qwenimg_train.training.callbacks.nonfinite). Its engine counts skips in `skipped_steps`; without
    DeepSpeed there is no engine and this is False (the guard drops bad gradients itself)."""
    engine = trainer.model
    count = getattr(engine, "skipped_steps", None)
    if not isinstance(count, int):
        return False
    seen = getattr(engine, "_qwenimg_skipped_seen", 0)
    engine._qwenimg_skipped_seen = count
    return count > seen


def _partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def sharded_init_active() -> bool:
    """Whether modules built now are partitioned at construction (deepspeed.zero.Init)."""
    if "deepspeed" not in sys.modules:
        return False
    import deepspeed.runtime.zero.partition_parameters as partition

    return bool(partition.zero_init_context)


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


def zero_parameters(params: list[torch.Tensor], *, rank: int = 0) -> None:
    """Set parameters to zero, also when ZeRO-3 partitioned them (gathered in turn)."""
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
