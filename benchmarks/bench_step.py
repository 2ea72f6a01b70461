"""Training-step time of the framework against a bare PyTorch loop, fp32, CPU.

    (a) the framework: `lightning.pytorch.Trainer` (cpu, 32-true, CSVLogger with
        log_every_n_steps=1, gradient_clip_val=1.0, EMACallback, RunSummary, GracefulStop,
        NonFiniteGuard) fitting
        `QwenImageModule` (encode -> σ -> noise -> denoise -> per-sample loss ->
        per-task / per-σ-bucket / per-stage logging -> AdamW + LR schedule) on a
        DataLoader that yields one prebuilt mixed `Batch` every step;
    (b) the floor: a plain loop over the same model (same initial weights, same seed)
        and the same batch: `model.encode`, `FlowMatching.sample_sigmas`, `randn_like`,
        `flow_matching_loss(...).mean().backward()`, `clip_grad_norm_(1.0)`,
        `AdamW.step()` (same parameter groups), the same LR schedule, `zero_grad()`,
        and the same `EMA.update`: the same arithmetic and nothing else.

The model is a tiny Qwen-Image checkpoint (`qwenimg_train.models.qwen_image.tiny`) grown to a few million
trainable transformer parameters; the batch is 4 samples at 256x256 (2 t2i, 1 ti2i,
1 i2i, prompts of different lengths). A step's time is the wall time between
successive step starts (a callback's on_train_batch_start for (a), loop timestamps
for (b)), after dropping warm-up steps. Rounds run a and b alternately so drift hits
both (and alternately a or b first); prints the median step time per round and
side, and a/b as the median of the per-round ratios (each round pairs runs a few
seconds apart); the target is a/b <= 1.10. The ratio of the two sides' medians over
rounds is printed as well, but it pairs different rounds: on a shared 2-core machine
the step time drifts by 10-15 % between rounds and a busy neighbour can slow single
runs several-fold (see the 1-minute load average printed), so it is the noisier
figure; the median over rounds absorbs a minority of disturbed rounds. The
losses of both sides are compared too (same weights, seed and op order: they agree
exactly), so both sides are known to do the same work.
Usage: python benchmarks/bench_step.py [--rounds R] [--steps N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from data_pipelines.core.shards import derive_seed
from qwenimg_train.training.callbacks.graceful_stop import GracefulStop
from qwenimg_train.data.loader import Batch
from qwenimg_train.training.callbacks.nonfinite import NonFiniteGuard
from qwenimg_train.training.callbacks.ema import EMA, EMACallback
from qwenimg_train.models.qwen_image.model import QwenImageModel
from qwenimg_train.training.callbacks.run_summary import RunSummary
from qwenimg_train.training.module import QwenImageModule
from qwenimg_train.training.optim import Optim
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss
from qwenimg_train.models.qwen_image.tiny import TinySpec, build_tiny_checkpoint

SPEC = TinySpec(num_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
RESOLUTION = 256
WARMUP = 3  # step intervals dropped at the start of every run
TARGET = 1.10


def make_batch(seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (4, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    source = np.zeros_like(target)
    source[2] = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)  # ti2i: a different source image
    source[3] = target[3]  # i2i: reconstruct the source
    return Batch(
        task=["t2i", "t2i", "ti2i", "i2i"],
        target_bchw=torch.from_numpy(target).permute(0, 3, 1, 2),  # channels-last views, as the loader's
        source_bchw=torch.from_numpy(source).permute(0, 3, 1, 2),
        has_source=torch.tensor([False, False, True, True]),
        prompt=["A cat.",
                ("A long caption: a red bicycle leaning on a brick wall under a striped awning, "
                 "with a hand-painted sign that reads OPEN DAILY 9-5 in yellow letters."),
                "Make the sky blue and add the word HELLO.",
                "Reconstruct the image."],
        key=[f"bench/{i}" for i in range(4)],
        source=["bench"] * 4,
        text_class=["none", "complex", "simple", "none"],
        stage="bench",
    )


class SameBatch(torch.utils.data.Dataset):
    def __init__(self, batch: Batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        return self.batch


def optimizer_for(params: list[torch.nn.Parameter], optim: Optim, total: int):
    """QwenImageModule.configure_optimizers' optimizer and schedule (without a Trainer)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: optim.factor(step, total))


def reset(model: QwenImageModel, init: dict[str, torch.Tensor]) -> None:
    model.transformer.load_state_dict(init)
    model.zero_grad(set_to_none=True)
    model.train()


def run_bare(model, init, batch: Batch, steps: int, seed: int) -> tuple[list[float], list[float]]:
    reset(model, init)
    objective, optim = FlowMatching(), Optim()
    named = [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]  # EMACallback's names
    opt, schedule = optimizer_for([p for _, p in named], optim, steps)
    params = [p for group in opt.param_groups for p in group["params"]]  # clipped in the optimizer's order, as Lightning
    ema = EMA(named)
    starts, losses = [], []
    for step in range(steps):
        starts.append(time.perf_counter())
        inputs = model.encode(target_bchw=batch.target_bchw, prompts=batch.prompt,
                              source_bchw=batch.source_bchw, has_source=batch.has_source)
        # σ and noise from the per-step generator QwenImageModule.step_generator seeds
        # (seed, "noise", step, micro-batch 0, rank 0): the same draws as the framework side.
        generator = torch.Generator().manual_seed(derive_seed(seed, "noise", step, 0, 0))
        sigmas = objective.sample_sigmas(inputs.target_tokens_b, generator=generator)
        noise = torch.randn(inputs.target_bnc.shape, generator=generator, dtype=inputs.target_bnc.dtype)
        loss = flow_matching_loss(lambda x, s, inputs=inputs: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                  inputs.target_mask_bn, objective.weights(sigmas)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        ema.update(named)
        losses.append(loss.detach())
    return np.diff(starts).tolist(), [float(x) for x in losses]


class StepTimer:
    """Timestamps every step start; keeps the loss the module computed."""

    def __init__(self):
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                self.starts.append(time.perf_counter())

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(pl_module.last_step_stats["loss"])

        self.starts: list[float] = []
        self.losses: list[float] = []
        self.callback = _Timer()


def run_framework(model, init, batch: Batch, steps: int, seed: int, log_dir: Path) -> tuple[list[float], list[float]]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    reset(model, init)
    module = QwenImageModule(model=model, objective=FlowMatching(), optim=Optim(), seed=seed)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, max_epochs=1,
        logger=CSVLogger(str(log_dir), name="bench"), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        # the per-step callbacks train() adds by default: EMA, summary, SIGTERM and non-finite guards
        callbacks=[timer.callback, EMACallback(), RunSummary(), GracefulStop(), NonFiniteGuard()],
        default_root_dir=str(log_dir),
    )
    # The loader draws its base seed from its own generator, so the global RNG (σ,
    # noise) runs as in the bare loop and the losses can be compared.
    loader = torch.utils.data.DataLoader(SameBatch(batch, steps), batch_size=None, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    trainer.fit(module, train_dataloaders=loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"the trainer ran {trainer.global_step} steps, expected {steps}")
    return np.diff(timer.starts).tolist(), timer.losses


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=12, help=f"steps per run; the first {WARMUP} intervals are dropped")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    args = parser.parse_args()
    if args.steps < WARMUP + 3:
        parser.error(f"--steps must be at least {WARMUP + 3}")
    quiet()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        tmp = Path(tmp)
        path = build_tiny_checkpoint(tmp / "tiny", spec=SPEC, pipeline_class="QwenImageEditPipeline", seed=0)
        model = QwenImageModel.from_pretrained(path, max_sequence_length=512)
        init = {k: v.detach().clone() for k, v in model.transformer.state_dict().items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for m in (model.encoders.vae, model.encoders.text_encoder) for p in m.parameters())
        batch = make_batch()

        a_med, b_med, ratios = [], [], []
        first_loss_diff = max_loss_diff = 0.0
        for r in range(args.rounds):
            seed = 1000 + r
            runs = {}
            for side in ("ba" if r % 2 == 0 else "ab"):  # alternate which side goes first (b a, a b, b a, ...)
                if side == "b":
                    runs[side] = run_bare(model, init, batch, args.steps, seed)
                else:
                    runs[side] = run_framework(model, init, batch, args.steps, seed, tmp / "logs")
            (a_times, a_losses), (b_times, b_losses) = runs["a"], runs["b"]
            a, b = statistics.median(a_times[WARMUP:]), statistics.median(b_times[WARMUP:])
            a_med.append(a)
            b_med.append(b)
            ratios.append(a / b)
            diffs = [abs(x - y) for x, y in zip(a_losses, b_losses)]
            first_loss_diff = max(first_loss_diff, diffs[0])
            max_loss_diff = max(max_loss_diff, max(diffs))
            print(f"round {r + 1}/{args.rounds} ({'bare first' if r % 2 == 0 else 'framework first'}): "
                  f"framework {1000 * a:7.1f} ms  bare {1000 * b:7.1f} ms  ratio {a / b:.3f}", flush=True)

    a, b = statistics.median(a_med), statistics.median(b_med)
    ratio = statistics.median(ratios)
    print(json.dumps({
        "includes": {
            "a_framework": "Trainer(cpu, 32-true, CSVLogger, log_every_n_steps=1, gradient_clip_val=1.0) + "
                           "EMACallback + RunSummary + timer; QwenImageModule.training_step (encode, sigmas, noise, "
                           "denoise, per-sample loss, per-task/sigma-bucket/stage self.log, last_step_stats); "
                           "AdamW (decay/no-decay groups) + LambdaLR; DataLoader yielding one prebuilt Batch",
            "b_bare": "encode, sample_sigmas, randn_like, flow_matching_loss().mean().backward(), clip_grad_norm_(1.0), "
                      "AdamW.step (same groups), LambdaLR.step, zero_grad, EMA.update; same model, batch and seed",
        },
        "trainable_params": trainable,
        "frozen_encoder_params": frozen,
        "batch": f"4 x {RESOLUTION}x{RESOLUTION} (t2i, t2i, ti2i, i2i)",
        "threads": torch.get_num_threads(),
        "steps_per_run": args.steps,
        "timed_steps_per_run": args.steps - 1 - WARMUP,
        "round_ratios": [round(x, 3) for x in ratios],
        "a_framework_step_ms": round(1000 * a, 1),
        "b_bare_step_ms": round(1000 * b, 1),
        "ratio_of_medians": round(a / b, 3),
        "ratio_a_over_b": round(ratio, 3),
        "target_a_over_b": TARGET,
        "meets_target": ratio <= TARGET,
        "loss_max_abs_diff_first_step": first_loss_diff,
        "loss_max_abs_diff_all_steps": max_loss_diff,
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - wall, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
