"""The planner's memory model (`qwenimg_train.tools.plan`) against measured CPU memory.

Single process: a QwenImageTransformer2DModel of width 256 (4 heads × 64), 4 blocks,
joint_attention_dim 64 (9.8M parameters, 37 MiB in fp32) trains one step through the
trainer's forward (`forward_mixed`) with AdamW (foreach, as on GPU);
`qwenimg_train.tools.plan_memory.measure_step` counts parameters, gradients and AdamW states
tensor by tensor and takes the activation and optimizer-step peaks from the profiler's
allocation events (exact bytes; RSS would be noise). The planner gets the same
transformer's config.json and the same step (`zero_stage=0` on 1 GPU: no DDP buckets;
`overhead_gb=0`), and each component is printed predicted / measured. Cases: fp32 with
and without activation checkpointing; bf16 weights (DeepSpeed's bf16 mode: the whole
transformer in bf16, activations compared); an edit step (target + source tokens) with
`zero_cond_t`; LoRA (rank 4, the trainer's `apply_lora` + fp32 adapter + the discarded text
stream frozen) on a bf16 base under bf16 autocast (`bf16-mixed`), and on an fp32 base in
fp32 with checkpointing: base + adapter bytes, gradients, AdamW state, the training phase
(activations + autocast cache + frozen weight copies) and the total. The quantized bases
are measured by `bench_lora_memory.py`.

Two ranks: `bench_zero.py` (DeepSpeed ZeRO-3 on 2 CPU ranks, fp32) is run and its
per-rank bytes compared with the planner's ZeRO-3 prediction for the same model:
parameter shards + persistent full copies + Adam (the master is the shard itself in
fp32), and gradient partitions. `--skip-zero` leaves it out (it takes about a minute).

Usage: python benchmarks/bench_plan.py [--skip-zero] [--resolution 256] [--batch 2] [--text-len 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qwenimg_train.tools.plan_memory import measure_step
from qwenimg_train.tools.plan import PlanConfig, TransformerSpec, ZeroSettings, activation_bytes, plan

MiB = 2**20
TOLERANCE = 0.20
WIDTH_KW = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(16, 24, 24))


def build(dtype=torch.float32, zero_cond_t=False):
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(**WIDTH_KW, zero_cond_t=zero_cond_t)
    return model.to(dtype)


def row(name: str, predicted: float, measured: float) -> dict:
    ratio = predicted / measured if measured else float("nan")
    print(f"  {name:<26}{predicted / MiB:>12.2f}{measured / MiB:>12.2f}{ratio:>9.3f}")
    return {"predicted_mib": round(predicted / MiB, 3), "measured_mib": round(measured / MiB, 3),
            "ratio": round(ratio, 4)}


LORA_RANK = 4


def lora_model(model, base_dtype: torch.dtype):
    """The trainer's LoRA wrapping (QwenImageModel): adapter, fp32 upcast, the last block's
    discarded text stream frozen; the base stored as `base_dtype`."""
    from diffusers.training_utils import cast_training_params

    from qwenimg_train.models.lora import LoraSettings, apply_lora
    from qwenimg_train.models.qwen_image.transformer import freeze_discarded_text_stream

    model.to(base_dtype)
    apply_lora(model, LoraSettings(rank=LORA_RANK, alpha=float(LORA_RANK)))
    cast_training_params(model, torch.float32)
    freeze_discarded_text_stream(model)
    return model


def single_process(args, folder: Path) -> dict:
    # name, dtype (a LoRA case's base), checkpointing, edit, zero_cond_t, LoRA precision (None: full)
    cases = [
        ("fp32", torch.float32, False, False, False, None),
        ("fp32 + checkpointing", torch.float32, True, False, False, None),
        ("bf16 weights", torch.bfloat16, False, False, False, None),
        ("bf16 weights + checkpointing", torch.bfloat16, True, False, False, None),
        ("edit, zero_cond_t, fp32", torch.float32, False, True, True, None),
        ("LoRA r4, bf16 base, bf16-mixed", torch.bfloat16, False, False, False, "bf16-mixed"),
        ("LoRA r4, fp32 base + checkpointing", torch.float32, True, False, False, "fp32"),
    ]
    results = {}
    for name, dtype, ckpt, edit, zero_cond_t, lora in cases:
        model = build(dtype if lora is None else torch.float32, zero_cond_t)
        config_dir = folder / name.replace(" ", "_").replace(",", "").replace("+", "")
        model.save_config(config_dir)
        if lora is not None:
            model = lora_model(model, dtype)
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if lora == "bf16-mixed" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with mixed:
            measured = measure_step(model, batch=args.batch, height=args.resolution, width=args.resolution,
                                    text_len=args.text_len, edit=edit, checkpointing=ckpt)
        seconds = time.perf_counter() - t0
        print(f"\n{name}: {args.batch} x {args.resolution}² {'edit' if edit else 't2i'}, {args.text_len} text tokens "
              f"({seconds:.1f} s)")
        print(f"  {'component (MiB)':<26}{'predicted':>12}{'measured':>12}{'ratio':>9}")
        out = {}
        if lora is not None:
            p = plan(PlanConfig(model=str(config_dir), resolution=args.resolution, micro_batch=args.batch,
                                gpus_per_node=1, nodes=1, zero_stage=0, precision=lora, activation_checkpointing=ckpt,
                                prompt_length=args.text_len, overhead_gb=0, finetune="lora", lora_rank=LORA_RANK,
                                base_dtype=str(dtype).removeprefix("torch.")))  # the trainer's spelling
            m = p.memory
            out["base_plus_adapter"] = row("base + adapter", m["base_weights"] + m["parameters"], measured.parameters)
            # the planner also counts the frozen discarded text stream's adapters (no gradient, no AdamW state)
            out["gradients"] = row("gradients", m["gradients"], measured.gradients)
            out["optimizer_states"] = row("optimizer_states", m["optimizer_states"], measured.optimizer_states)
            training = m["activations"] + m.get("autocast_weight_cache", 0) + m.get("frozen_weight_copies", 0)
            out["activations"] = row("activations (+ copies)", training, measured.activations)
            out["total"] = row("total (peak)", p.peak_bytes, measured.total)
        elif dtype == torch.float32:
            p = plan(PlanConfig(model=str(config_dir), resolution=args.resolution, micro_batch=args.batch,
                                gpus_per_node=1, nodes=1, zero_stage=0, precision="fp32",
                                task="edit" if edit else "t2i", activation_checkpointing=ckpt,
                                prompt_length=args.text_len, overhead_gb=0))
            for key in ("parameters", "gradients", "optimizer_states", "activations", "optimizer_step_workspace"):
                out[key] = row(key, p.memory[key], getattr(measured, key))
            out["total"] = row("total (peak)", p.peak_bytes, measured.total)
        else:
            spec = TransformerSpec.from_config(dict(model.config))
            tokens = (args.resolution // 16) ** 2 * (2 if edit else 1)
            predicted = activation_bytes(spec, batch=args.batch, image_len=tokens, text_len=args.text_len,
                                         dtype_bytes=2, checkpointing=ckpt)["total"]
            out["activations"] = row("activations", predicted, measured.activations)
        results[name] = out
    return results


def zero3(args) -> dict:
    from bench_zero import RANKS, SPEC_KW

    from qwenimg_train.models.qwen_image.tiny import TinySpec

    print("\nZeRO-3, 2 CPU ranks (benchmarks/bench_zero.py) ...", flush=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_zero.py"))], capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode != 0:
        sys.exit(f"bench_zero.py failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    tiny = TinySpec(**SPEC_KW)
    spec_config = dict(num_layers=tiny.num_layers, num_attention_heads=tiny.num_attention_heads,
                       attention_head_dim=tiny.attention_head_dim, in_channels=4 * tiny.z_dim, out_channels=tiny.z_dim,
                       joint_attention_dim=tiny.text_hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(spec_config))
        p = plan(PlanConfig(model=tmp, gpus_per_node=RANKS, nodes=1, zero_stage=3, precision="fp32", resolution=64,
                            micro_batch=2, overhead_gb=0, zero=ZeroSettings(param_persistence_threshold=1e6)))
    z = report["deepspeed_zero3"]["classes_mib_per_rank"]
    measured_state = max(a + b + c + d for a, b, c, d in zip(z["params"], z.get("master", [0] * RANKS),
                                                             z["optimizer_state"], z["gathered_params"])) * MiB
    measured_grads = max(z["gradients"]) * MiB
    print(f"  transformer parameters: planner {p.params:,}, measured {report['model']['transformer_params']:,}")
    print(f"  {'per rank (MiB)':<26}{'predicted':>12}{'measured':>12}{'ratio':>9}")
    out = {
        "params_shard_plus_persistent_plus_adam": row("params + persistent + Adam",
                                                      p.memory["parameters"] + p.memory["optimizer_states"],
                                                      measured_state),
        "gradients": row("gradient partitions", p.memory["gradients"], measured_grads),
        "ddp_params_plus_adam": row("DDP params + Adam (12P)", 12 * p.params, report["ddp_mib_max_rank"] * MiB),
    }
    out["params_match"] = p.params == report["model"]["transformer_params"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-zero", action="store_true", help="leave out the 2-rank ZeRO-3 comparison")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        results = {"single_process": single_process(args, Path(tmp))}
    if not args.skip_zero:
        results["zero3_2_ranks"] = zero3(args)
    ratios = [v["ratio"] for case in results["single_process"].values() for k, v in case.items()
              if k in ("activations", "total")]
    if "zero3_2_ranks" in results:
        ratios += [results["zero3_2_ranks"]["params_shard_plus_persistent_plus_adam"]["ratio"]]
    worst = max(abs(r - 1) for r in ratios)
    results["worst_relative_error_total_and_activations"] = round(worst, 4)
    results["within_20_percent"] = worst <= TOLERANCE
    results["wall_s"] = round(time.perf_counter() - wall, 1)
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
