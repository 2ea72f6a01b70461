"""The LightningModule: glue between model, objective, data and optimizer, nothing else.

    batch (uint8 images, prompts, tasks)
      -> model.encode_batch  frozen VAE + Qwen2.5-VL (dual encoding for edit samples),
                             or the batch's precomputed encoder outputs
      -> objective           σ per sample, noise, x_σ, velocity target
      -> model.denoise       the transformer over target (+ source) tokens
      -> per-sample loss     logged per task, σ bucket and stage; the mean is optimised

The optimizer and its schedule are built in `optim.py`; throughput and the run summary
are a callback (`callbacks/run_summary.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch

from data_pipelines.core.shards import derive_seed
from qwenimg_train.data.curriculum import TASKS
from qwenimg_train.data.loader import Batch
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss
from qwenimg_train.training.optim import Optim, build_optimizer


class QwenImageModule(pl.LightningModule):
    """`model` is a built model, or a factory `rank -> model` that `configure_model`
    calls, so that under ZeRO-3 the transformer is partitioned as it is constructed.

    Noise and σ of a step come from a generator seeded by (seed, global step, micro-batch
    in the accumulation window, rank): a resumed run draws what the uninterrupted run
    drew, with no RNG state to save.
    """

    def __init__(self, *, model: torch.nn.Module | Callable[[int], torch.nn.Module], objective: FlowMatching,
                 optim: Optim, lr_scale: Callable[[int], float] | None = None, config: dict[str, Any] | None = None,
                 seed: int = 0):
        super().__init__()
        if isinstance(model, torch.nn.Module):
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
        # DDP broadcasts every parameter and buffer from rank 0 when it wraps the module.
        # The frozen ones are the base folder's, loaded alike on every rank: broadcasting
        # them costs a pass over the whole base (40 GB for Qwen-Image in bf16) and fails
        # on a quantized base (torchao's and bitsandbytes' tensors are not broadcastable).
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, self._frozen_parameter_names())

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
        self.last_step_stats = {
            "stage": batch.stage, "by_task": by_task, "loss": float(loss.detach()), "samples": n,
            "tokens": inputs.token_count(),
        }

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1
        optimizer, schedule = build_optimizer(self.parameters(), self.optim, total_steps=total, lr_scale=self.lr_scale)
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
        # Called before Lightning loads checkpoint["state_dict"]. The frozen weights
        # on_save_checkpoint left out stay as the model loaded them from the base folder
        # (a quantized base could not be loaded into itself anyway: bitsandbytes reads its
        # quantization state only into a fresh layer), so the load is non-strict, and
        # strictness is checked here for everything else.
        state = checkpoint.get("state_dict")
        if state is None:
            return
        frozen = set(self._frozen_parameter_names())
        own = set(self.state_dict().keys())
        missing = sorted(own - frozen - set(state))
        unexpected = sorted(set(state) - own)
        if missing or unexpected:
            raise RuntimeError(f"the checkpoint does not match the model: missing {missing[:4]} "
                               f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})")
        for name in frozen & set(state):  # a checkpoint written before frozen weights were left out
            del state[name]
        self.strict_loading = not frozen

    def _frozen_parameter_names(self) -> list[str]:
        # Everything the base folder supplies: frozen weights, and a quantized base's
        # scales and quantization state (bitsandbytes keeps them beside the weight, not
        # as parameters). Frozen adapter tensors (on the last block's discarded text
        # stream) stay in the checkpoint: they are the adapter's, and are small.
        return [k for k, v in self.state_dict(keep_vars=True).items()
                if not (isinstance(v, torch.nn.Parameter) and v.requires_grad)
                and ".lora_A." not in k and ".lora_B." not in k]
