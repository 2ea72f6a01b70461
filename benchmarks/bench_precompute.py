"""Training-step time with precomputed inputs against online encoding, same model, same batch.

    (a) online: `QwenImageModel.encode_batch` runs the frozen VAE and Qwen2.5-VL on the
        batch's decoded images and prompts (dual encoding for the edit samples), then
        σ, noise, denoise, per-sample loss, backward, AdamW;
    (b) precomputed: the same batch read from shards that `qwenimg-data --config-name
        precompute` wrote (`data.precomputed=true`); `encode_batch` only assembles the
        stored tensors; the rest of the step is identical.

Both batches come from the real loader (`StageStream`, same seed) over the same shards:
a few synthetic renders and edit pairs, precomputed by the real job. The model is a
tiny transformer (2 blocks, width 128, 1.3 M parameters) beside a larger tiny encoder
(Qwen2.5-VL with 8 layers of width 256 and a 4-block vision tower, a VAE of base width
16: 16 M parameters), so that the encoders' cost is well above timer noise. Here the
encoders dominate the online step; how large their share is for a real model (a 7B
encoder beside the 20B transformer) is the planner's estimate (docs/planner.md), so
the ratio printed is this configuration's, not a promise for every model.

Rounds alternate a and b so machine drift hits both; printed: the median step time per
side, a/b (the median of per-round ratios), and the largest loss difference between the
two sides over every step (same weights, same σ and noise: the target is 1e-5).
Usage: python benchmarks/bench_precompute.py [--rounds R] [--steps N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data_pipelines.jobs.edit_pairs import EditPairsJob, run as run_edit
from data_pipelines.jobs.precompute import PrecomputeJob, run as run_precompute
from data_pipelines.jobs.synthetic import SyntheticJob, run as run_synthetic
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SourceShards, StageStream
from qwenimg_train.models.qwen_image.model import QwenImageModel, load_encoders, load_transformer
from qwenimg_train.training.optim import Optim
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss
from qwenimg_train.models.qwen_image.tiny import TinySpec, build_tiny_checkpoint

SPEC = TinySpec(
    num_layers=2, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
    vae_base_dim=16,
    text_hidden_size=256, text_layers=8, text_heads=8, text_kv_heads=2, text_intermediate_size=1024,
    mrope_section=(4, 6, 6), vision_depth=4, vision_hidden_size=256, vision_heads=8, vision_intermediate_size=1024,
)
RESOLUTION = 256
SEQ = 256
WARMUP = 2


def build_data(root: Path, model: Path) -> tuple[dict[str, str], dict[str, str]]:
    run_synthetic(SyntheticJob(out_dir=str(root / "synthetic"), num_shards=1, samples_per_shard=8, progress=False))
    run_edit(EditPairsJob(out_dir=str(root / "edit"), num_shards=1, samples_per_shard=8, progress=False))
    plain = {"synthetic": str(root / "synthetic"), "edit": str(root / "edit")}
    pre = {}
    for name, folder in plain.items():
        pre[name] = str(root / "pre" / name)
        run_precompute(PrecomputeJob(in_dir=folder, out_dir=pre[name], pretrained_path=str(model),
                                     max_sequence_length=SEQ, resolutions=[RESOLUTION], progress=False))
    return plain, pre


def first_batch(sources: dict[str, str], precomputed: bool):
    stage = Stage(name="bench", fraction=1.0, resolution=RESOLUTION, source_weights={"synthetic": 1.0},
                  task_mix={"t2i": 0.5, "ti2i": 0.25, "i2i": 0.25}, caption_dropout=0.0)
    stream = StageStream(stage=stage, stage_index=0, batch_size=4, seed=1, shuffle_buffer=8, num_batches=1,
                         sources={k: SourceShards.from_folder(k, v) for k, v in sources.items()},
                         precomputed=precomputed)
    return next(iter(stream))


def run_side(model: QwenImageModel, init, batch, steps: int) -> tuple[list[float], list[float]]:
    """`steps` training steps on one batch from the initial weights: step times, losses."""
    model.transformer.load_state_dict(init)
    model.zero_grad(set_to_none=True)
    objective, optim = FlowMatching(), Optim()
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps)
    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        inputs = model.encode_batch(batch)
        generator = torch.Generator().manual_seed(step)
        sigmas = objective.sample_sigmas(inputs.target_tokens_b, generator=generator)
        noise = torch.randn(inputs.target_bnc.shape, generator=generator)
        loss = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                  inputs.target_mask_bn).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return times[WARMUP:], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_checkpoint(root / "model", spec=SPEC, pipeline_class="QwenImageEditPipeline")
        plain, pre = build_data(root, model_dir)
        online, cached = first_batch(plain, False), first_batch(pre, True)
        assert online.key == cached.key and online.task == cached.task, "the two streams differ"
        model = QwenImageModel(load_transformer(model_dir), load_encoders(model_dir, max_sequence_length=SEQ))
        init = {k: v.clone() for k, v in model.transformer.state_dict().items()}
        encoder_params = sum(p.numel() for p in model.encoders.text_encoder.parameters())
        encoder_params += sum(p.numel() for p in model.encoders.vae.parameters())
        print(f"transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f} M parameters, "
              f"encoders {encoder_params / 1e6:.2f} M; batch {online.task} at {RESOLUTION}², threads {args.threads}")
        medians = {"online": [], "precomputed": []}
        ratios, diff = [], 0.0
        for r in range(args.rounds):
            order = [("online", online), ("precomputed", cached)]
            if r % 2:
                order.reverse()
            losses = {}
            for name, batch in order:
                times, losses[name] = run_side(model, init, batch, args.steps)
                medians[name].append(statistics.median(times))
            ratios.append(medians["online"][-1] / medians["precomputed"][-1])
            diff = max(diff, max(abs(a - b) for a, b in zip(losses["online"], losses["precomputed"])))
            print(f"round {r}: online {medians['online'][-1] * 1e3:.1f} ms, precomputed "
                  f"{medians['precomputed'][-1] * 1e3:.1f} ms, ratio {ratios[-1]:.2f}  (load {os.getloadavg()[0]:.1f})")
        result = {
            "online_ms": round(statistics.median(medians["online"]) * 1e3, 1),
            "precomputed_ms": round(statistics.median(medians["precomputed"]) * 1e3, 1),
            "online_over_precomputed": round(statistics.median(ratios), 2),
            "max_loss_difference": diff,
            "losses_equal_1e-5": diff <= 1e-5,
        }
        print(json.dumps(result, indent=1))
        if diff > 1e-5:
            raise SystemExit(f"losses differ by {diff:.3g} > 1e-5")


if __name__ == "__main__":
    main()
