"""Distributed strategies, built from configs/strategy/*.yaml (`_target_` entries).

- `ddp`: Lightning's DDPStrategy (gloo on CPU, NCCL on GPU).
- `deepspeed`: Lightning's DeepSpeedStrategy with the DeepSpeed config from the YAML
  (ZeRO-3, optional CPU offload). Lightning refuses DeepSpeed on anything but CUDA;
  `CPUDeepSpeedStrategy` lifts exactly the three CUDA assumptions (the environment
  check, the device-index check, the root device) so ZeRO-3 runs on CPU ranks with
  gloo: the tests and the memory benchmark run the real partitioning. It is chosen
  only when the accelerator is the CPU.

This package is the one place that knows about DeepSpeed; model and objective code
never import it. What depends on ZeRO-3's partitioned parameters (building and loading
a model under it, a parameter's real shape, a rank's shard) is in `sharding.py`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from qwenimg_train.parallel import deepspeed_compat

log = logging.getLogger(__name__)


class FrozenAwareDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose checkpoints leave frozen parameters out
    (`exclude_frozen_parameters`): a LoRA run's base transformer, the discarded text
    stream. They are the base folder's weights, which the model was built from, so a
    resume loads the module non-strictly and keeps them as built."""

    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any):
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any):
        module = self.lightning_module
        strict = module.strict_loading
        module.strict_loading = strict and not self.exclude_frozen_parameters
        try:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            module.strict_loading = strict


class CPUDeepSpeedStrategy(FrozenAwareDeepSpeedStrategy):
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
        deepspeed_compat.init_distributed(self)

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the device index as the rank's device number (None breaks it);
        # CPU ranks all have device 0.
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return deepspeed_compat.process_group_backend(self) or "gloo"

    def _setup_model_and_optimizer(self, *args, **kwargs):
        with deepspeed_compat.fp32_master_shares_partition():
            return super()._setup_model_and_optimizer(*args, **kwargs)


def ddp(*, find_unused_parameters: bool = False, **kwargs: Any) -> Strategy:
    """DDP. Every trainable parameter gets a gradient: the last MMDiT block's discarded
    text stream is frozen when the model is built (`freeze_discarded_text_stream`), so
    DDP needs no `find_unused_parameters` (an extra graph traversal per step), and
    Lightning's default strategy for `trainer.devices=N` trains too."""
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
    return FrozenAwareDeepSpeedStrategy(config=config, **kwargs)


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
