"""The LightningModule: glue between model, objective, data and optimizer, nothing else.

    batch (uint8 images, prompts, tasks)
      -> model.encode_batch  frozen VAE + Qwen2.5-VL (dual encoding for edit samples),
                             or the batch's precomputed encoder outputs
      -> objective           σ per sample, noise, x_σ, velocity target
      -> model.denoise       the transformer over target (+ source) tokens
      -> per-sample loss     logged per task, σ bucket and stage; the mean is optimised

The optimizer is AdamW (no weight decay on biases and norm weights) with linear warm-up
then cosine decay or a constant rate, multiplied by the curriculum stage's `lr_scale`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import lightning.pytorch as pl
import torch

from data_pipelines.core.shards import derive_seed
from qwenimg_train.data.curriculum import TASKS
from qwenimg_train.data.loader import Batch
from qwenimg_train.models.qwen_image.model import QwenImageModel
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss

SCHEDULES = ("cosine", "constant")


@dataclass
class Optim:
    """AdamW and its schedule (configs/optim/)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    """Applied to matrices only; biases and norm weights are not decayed."""
    eps: float = 1e-8
    warmup_steps: int = 0
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


class QwenImageModule(pl.LightningModule):
    """`model` is a built model, or a factory `rank -> model` that `configure_model`
    calls, so that under ZeRO-3 the transformer is partitioned as it is constructed.

    Noise and σ of a step come from a generator seeded by (seed, global step, micro-batch
    in the accumulation window, rank): a resumed run draws what the uninterrupted run
    drew, with no RNG state to save.
    """

    def __init__(self, *, model: QwenImageModel | Callable[[int], QwenImageModel], objective: FlowMatching,
                 optim: Optim, lr_scale: Callable[[int], float] | None = None, config: dict[str, Any] | None = None,
                 seed: int = 0):
        super().__init__()
        if isinstance(model, QwenImageModel):
            self.model, self._factory = model, None
        else:
            self.model, self._factory = None, model
        self.seed = seed
        self.objective = objective
        self.optim = optim
        self.lr_scale = lr_scale or (lambda step: 1.0)
        self.config = config or {}
        self.last_step_stats: dict[str, Any] = {}  # for RunSummary: this step's losses and token counts

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._factory(self.global_rank)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        micro = batch_idx % self.trainer.accumulate_grad_batches if self._trainer is not None else 0
        seed = derive_seed(self.seed, "noise", self.global_step, micro, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        inputs = self.model.encode_batch(batch)
        generator = self.step_generator(batch_idx)
        sigmas = self.objective.sample_sigmas(inputs.target_tokens_b, generator=generator)
        noise = torch.randn(inputs.target_bnc.shape, generator=generator, device=inputs.target_bnc.device,
                            dtype=inputs.target_bnc.dtype)
        losses = flow_matching_loss(lambda x, s: self.model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                    inputs.target_mask_bn, self.objective.weights(sigmas))
        loss = losses.mean()
        self._log(loss, losses.detach(), sigmas, batch, inputs)
        return loss

    def _log(self, loss, losses, sigmas, batch: Batch, inputs) -> None:
        # Few log calls: each self.log costs ~0.4 ms of Lightning bookkeeping
        # (benchmarks/bench_step.py). Step values only, so batch_size does not weigh them.
        n = len(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        metrics = {f"train/loss/stage/{batch.stage}": loss.detach()}
        by_task: dict[str, tuple[float, int]] = {}
        # Every task and σ bucket is logged every step, NaN where the batch has none:
        # Lightning would otherwise repeat a key's last value at the later steps of the
        # epoch (= stage) that do not log it.
        nan = losses.new_tensor(float("nan"))
        for task in TASKS:
            mask = torch.tensor([t == task for t in batch.task], device=losses.device)
            metrics[f"train/loss/{task}"] = losses[mask].mean() if mask.any() else nan
            if mask.any():
                by_task[task] = (float(losses[mask].sum()), int(mask.sum()))
        buckets = self.objective.bucket_index(sigmas)
        for k, name in enumerate(self.objective.bucket_names()):
            mask = buckets == k
            metrics[f"train/loss/sigma_{name}"] = losses[mask].mean() if mask.any() else nan
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)
        source_tokens = int(inputs.source_mask_bm.sum()) if inputs.source_mask_bm is not None else 0
        self.last_step_stats = {
            "stage": batch.stage, "by_task": by_task, "loss": float(loss.detach()), "samples": n,
            "tokens": int(inputs.target_mask_bn.sum()) + source_tokens + int(inputs.text_mask_bt.sum()),
        }

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                # A ZeRO-3 partitioned parameter is a flat shard; ds_shape is its real shape.
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": self.optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.optim.factor(step, total) * self.lr_scale(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved run config travels with the weights (export and resume read it).
        checkpoint["qwenimg_config"] = self.config
        # Frozen parameters (a LoRA run's base transformer) are the base folder's weights:
        # not saved (Qwen-Image's 20B in fp32 is 80 GB; a rank-16 adapter ~0.4 GB), put back
        # from the loaded model on resume. Under DeepSpeed the strategy writes the weights
        # itself (its exclude_frozen_parameters does the same); there is no state_dict here.
        state = checkpoint.get("state_dict")
        if state:
            for name in self._frozen_parameter_names():
                state.pop(name, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before Lightning loads checkpoint["state_dict"] (strictly): fill in the
        # frozen weights on_save_checkpoint left out, as the model loaded them.
        state = checkpoint.get("state_dict")
        if state is not None:
            own = self.state_dict()
            for name in self._frozen_parameter_names():
                state.setdefault(name, own[name])

    def _frozen_parameter_names(self) -> list[str]:
        return [k for k, v in self.state_dict(keep_vars=True).items()
                if isinstance(v, torch.nn.Parameter) and not v.requires_grad]


class RunSummary(pl.Callback):
    """Throughput (`perf/samples_per_s`, `perf/tokens_per_s`) and the run's summary.

    Lightning's ThroughputMonitor needs FLOP counts and a device with a known peak to
    be useful and logs under its own names; this is the few lines the run needs.
    `summary()` gives steps, mean loss per stage and per stage × task, and throughput;
    `train()` writes it to `<output_dir>/summary.json`.
    """

    def __init__(self):
        self.stages: dict[str, dict[str, Any]] = {}
        self._t0: float | None = None
        self._fit_start: float | None = None
        self.samples = 0
        self.tokens = 0
        self.timed = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = pl_module.last_step_stats
        if not stats or self._t0 is None:
            return
        elapsed = time.perf_counter() - self._t0
        self.samples += stats["samples"]
        self.tokens += stats["tokens"]
        self.timed += elapsed
        pl_module.log_dict({"perf/samples_per_s": stats["samples"] / elapsed, "perf/tokens_per_s": stats["tokens"] / elapsed},
                           on_step=True, on_epoch=False, batch_size=1)
        stage = self.stages.setdefault(stats["stage"], {"steps": 0, "loss_sum": 0.0, "tasks": {}})
        stage["steps"] += 1
        stage["loss_sum"] += stats["loss"]
        for task, (total, count) in stats["by_task"].items():
            t = stage["tasks"].setdefault(task, [0.0, 0])
            t[0] += total
            t[1] += count

    def summary(self, trainer) -> dict[str, Any]:
        stages = {
            name: {
                "steps": s["steps"],
                "loss": s["loss_sum"] / max(1, s["steps"]),
                "loss_by_task": {t: total / count for t, (total, count) in sorted(s["tasks"].items())},
                "samples_by_task": {t: count for t, (_, count) in sorted(s["tasks"].items())},
            }
            for name, s in self.stages.items()
        }
        return {
            "global_step": trainer.global_step,
            "stages": stages,
            "throughput": {
                "samples_per_s": self.samples / self.timed if self.timed else None,
                "tokens_per_s": self.tokens / self.timed if self.timed else None,
            },
            "fit_seconds": time.perf_counter() - self._fit_start if self._fit_start else None,
        }
