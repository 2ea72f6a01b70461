"""Exponential moving average of the trainable weights, as a Lightning callback.

    ema ← d·ema + (1 − d)·θ   after every `every`-th optimizer step, with
    d = min(decay, (1 + n) / (10 + n)) when `warmup` (n = updates so far), so early
    averages are not dominated by the random initialisation (the schedule of
    Tensorflow's ExponentialMovingAverage with num_updates, also used by timm/diffusers).

The shadow weights are fp32 copies of the parameters that require grad, keyed by
their names in the LightningModule; they are saved in the checkpoint under
`callbacks["ema"]`, and `qwenimg-export weights=ema` writes them as the model.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
import torch


class EMA:
    """The update rule over named tensors."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], *, decay: float = 0.999, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"ema.decay = {decay} must lie in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in named_params}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        d = self.current_decay()
        for name, p in named_params:
            self.shadow[name].lerp_(p.detach().float(), 1 - d)  # d·ema + (1 − d)·θ
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                             "the checkpoint was trained with other trainable parameters")
        self.updates = int(state["updates"])
        for name in self.shadow:
            self.shadow[name].copy_(state["shadow"][name])


def _trainable(module: torch.nn.Module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class EMACallback(pl.Callback):
    def __init__(self, *, decay: float = 0.999, every: int = 1, warmup: bool = True):
        if every < 1:
            raise ValueError(f"ema.every = {every} must be >= 1")
        if not 0 <= decay < 1:
            raise ValueError(f"ema.decay = {decay} must lie in [0, 1)")
        self.decay, self.every, self.warmup = decay, every, warmup
        self.ema: EMA | None = None
        self.params: list[tuple[str, torch.Tensor]] = []
        self._pending: dict[str, Any] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "ema"

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = _trainable(pl_module)  # walked once: named_parameters() per step costs ~0.5 ms
        self.ema = EMA(self.params, decay=self.decay, warmup=self.warmup)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Once per optimizer step: with gradient accumulation, batches that did not
        # step leave global_step unchanged.
        step = trainer.global_step
        if step == self._last_step or step % self.every:
            return
        self._last_step = step
        self.ema.update(self.params)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before on_fit_start on resume: keep it until the shadow exists.
        self._pending = state_dict
