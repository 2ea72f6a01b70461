"""Exponential moving average of the trainable weights, as a Lightning callback.

    ema ← d·ema + (1 − d)·θ   after every `every`-th optimizer step, with
    d = min(decay, (1 + n) / (10 + n)) when `warmup` (n = updates so far), so early
    averages are not dominated by the random initialisation (the schedule of
    Tensorflow's ExponentialMovingAverage with num_updates, also used by timm/diffusers).

The shadow weights are fp32 copies of the parameters that require grad, keyed by
their names in the LightningModule; they are saved in the checkpoint under
`callbacks["ema"]`, and `qwenimg-export weights=ema` writes them as the model.
Under ZeRO-3 each rank averages its own shard of every parameter (no gathering, no
full copy anywhere) and writes it to `ema_rank<r>.pt` inside the checkpoint
directory; `consolidate_shards` reassembles the full weights for export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch

from qwenimg_train.parallel.sharding import is_sharded, local_shard, parameter_shape


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


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the trainable parameters; under ZeRO-3 each rank's local flat
    shard, so the EMA is partitioned exactly like the weights."""
    return [(n, local_shard(p)) for n, p in module.named_parameters() if p.requires_grad]


def shard_file(checkpoint_dir: str | Path, rank: int) -> Path:
    return Path(checkpoint_dir) / f"ema_rank{rank:05d}.pt"


def consolidate_shards(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full EMA weights from the per-rank shard files of a ZeRO-3 checkpoint.

    DeepSpeed ZeRO-3 gives rank r the elements [r·s, (r+1)·s) of each flattened
    parameter, s = ceil(numel / world), the last shard zero-padded: the full tensor is
    the ranks' shards concatenated, cut to numel, reshaped."""
    files = sorted(Path(checkpoint_dir).glob("ema_rank*.pt"))
    if not files:
        raise ValueError(f"{str(checkpoint_dir)!r} holds no EMA shards (ema_rank*.pt)")
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    world = shards[0]["world_size"]
    if len(shards) != world:
        raise ValueError(f"{str(checkpoint_dir)!r}: {len(shards)} EMA shard files for a world of {world}")
    full = {}
    for name, shape in shards[0]["shapes"].items():
        flat = torch.cat([s["shadow"][name].flatten() for s in shards])
        numel = int(torch.Size(shape).numel())
        full[name] = flat[:numel].view(shape).clone()
    return full


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
        self.sharded = False
        self.rank, self.world_size = 0, 1
        self.shapes: dict[str, list[int]] = {}

    @property
    def state_key(self) -> str:
        return "ema"

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = _trainable(pl_module)  # walked once: named_parameters() per step costs ~0.5 ms
        self.ema = EMA(self.params, decay=self.decay, warmup=self.warmup)
        self.sharded = is_sharded(pl_module)
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self.shapes = {n: list(parameter_shape(p)) for n, p in pl_module.named_parameters()
                       if p.requires_grad}
        if self._pending is not None and not self._pending.get("sharded"):
            self.ema.load_state_dict(self._pending)
        elif self._pending is not None:
            # A ZeRO-3 checkpoint: rank 0's state says so; every rank reads its own shard.
            path = shard_file(trainer.ckpt_path, self.rank)
            if self._pending.get("world_size") != self.world_size or not path.exists():
                raise ValueError(f"cannot restore the EMA from {trainer.ckpt_path}: it was written by "
                                 f"{self._pending.get('world_size')} ranks, this run has {self.world_size}")
            self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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
        if self.ema is None:
            return {}
        if self.sharded:  # the shards go to per-rank files (save_shard), not rank 0's state
            return {"sharded": True, "world_size": self.world_size, "updates": self.ema.updates}
        return self.ema.state_dict()

    def save_shard(self, checkpoint_dir: str | Path) -> None:
        """Called by AtomicModelCheckpoint on every rank after a sharded (directory) save."""
        if self.ema is not None and self.sharded:
            state = dict(self.ema.state_dict(), world_size=self.world_size, rank=self.rank, shapes=self.shapes)
            torch.save(state, shard_file(checkpoint_dir, self.rank))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before on_fit_start on resume: keep it until the shadow exists.
        self._pending = state_dict
