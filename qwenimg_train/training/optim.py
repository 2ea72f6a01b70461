"""AdamW and its learning-rate schedule (configs/optim/).

No weight decay on biases and norm weights (parameters of fewer than two dimensions);
linear warm-up from 0, then cosine decay to `min_lr_ratio`·lr at the last step or a
constant rate; the curriculum stage's `lr_scale` multiplies the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from qwenimg_train.parallel.sharding import parameter_shape

SCHEDULES = ("cosine", "constant")


@dataclass
class Optim:
    """AdamW and its schedule (configs/optim/)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    """Applied to matrices only; biases and norm weights are not decayed."""
    eps: float = 1e-8
    warmup_steps: int = 100
    """Linear warm-up from 0 over this many optimizer steps."""
    schedule: str = "cosine"
    """After warm-up: cosine decay to `min_lr_ratio`·lr at the last step, or constant."""
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    """Gradient-norm clipping (passed to the Trainer as gradient_clip_val)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr = {self.lr} must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule = {self.schedule!r}; use one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps = {self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio = {self.min_lr_ratio} must lie in [0, 1]")
        self.betas = tuple(self.betas)

    def factor(self, step: int, total_steps: int) -> float:
        """The schedule's multiplier of `lr` at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim: Optim, *, total_steps: int,
                    lr_scale: Callable[[int], float] = lambda step: 1.0):
    """(AdamW over the trainable parameters in decay / no-decay groups, its LambdaLR schedule)."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if len(parameter_shape(p)) >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: optim.factor(step, total_steps) * lr_scale(step))
    return optimizer, schedule
