"""LoRA on a frozen base stored as float32, bfloat16, int8, float8 or nf4: the base's weight
bytes and one training step's memory, measured on the CPU, against the targets and the
planner (`qwenimg-plan finetune=lora base_dtype=...`).

One run, one process:
1. a QwenImageTransformer2DModel of ~96 M parameters (width 512 = 8 heads × 64, 10
   blocks, in_channels 64, out_channels 16, joint_attention_dim 512: every Linear's
   sides are multiples of 64, which bitsandbytes' CPU kernels want) is built with a fixed
   seed and saved in fp32 in the diffusers folder format, in a temporary directory;
2. for each base it is loaded through the trainer's path
   (`qwenimg_train.parallel.sharding.load_transformer`, which sends int8 / float8 / nf4 to
   `qwenimg_train.models.quantize.load_quantized`) and wrapped as the trainer wraps it
   (`QwenImageModel`: `apply_lora` + `cast_training_params(fp32)` +
   `freeze_discarded_text_stream`, gradient checkpointing on), LoRA rank 4;
   - weight bytes: the storage of the base's state dict, quantization state included
     (torchao's tensor subclasses through `__tensor_flatten__`: qdata, scale, zero point;
     bitsandbytes' packed uint8 weight, absmax and quant_map; bitsandbytes' serialized
     QuantState blob, a save-time copy of the metadata, is left out);
   - one step, in the order of Lightning's automatic optimization with
     accumulate_grad_batches=1 (`optimizer.step(closure)`, the closure = training_step,
     zero_grad, backward): the trainer's denoise (`forward_mixed`) + MSE, then
     `zero_grad(set_to_none=True)` (Lightning's `optimizer_zero_grad`: torch's default),
     backward, AdamW (foreach, as on a GPU); the previous step's gradients are alive
     through the forward. The float32 base runs in fp32 (`trainer.precision=32-true`),
     the others under bf16 autocast (`bf16-mixed`, as on a GPU). The second step is
     profiled (the first allocates AdamW's state); its peak is the largest running sum of
     the profiler's allocation events (torch 2.13: the nodes of
     `kineto_results.experimental_event_tree()` tagged Allocation, signed sizes, in time
     order; the "[memory]" events alone miss the allocations made inside ops). The
     profiler records no free of a block allocated before it started, so the first step's
     gradients are freed before it and made again (zeros) as it starts: the step peak is
     above weights + adapter + AdamW, the gradients included;
   - resident total = base weights + adapter + AdamW state + step peak;
3. each base's weight bytes and total as a ratio to the float32 base of the same run, and
   the targets on weight bytes: bf16 <= 0.55x, 8-bit <= 0.35x, 4-bit <= 0.25x of fp32;
4. the planner for the same transformer (its config.json), 256² (256 image tokens), 32
   text tokens, batch 1, rank 4, checkpointing, the same base and precision, one GPU,
   overhead 0: base weights, adapter + AdamW state, fwd+bwd (activations + autocast cache
   + frozen weight copies), step peak (the larger of the plan's training phase, which
   holds the gradients only where they outgrow the activation peak, and its
   optimizer-step phase, gradients + AdamW's sqrt(v)) and total, measured / predicted,
   PASS within 10%.

Usage: python benchmarks/bench_lora_memory.py [--rank 4] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes tries a Hub kernel at import on AVX512-BF16 CPUs

import torch

MiB = 2**20
MODEL_KW = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=10, attention_head_dim=64,
                num_attention_heads=8, joint_attention_dim=512, axes_dims_rope=(16, 24, 24))
RESOLUTION, TEXT_LEN, BATCH = 256, 32, 1
# (trainer's model.base_dtype, what load_transformer takes, planner precision)
BASES = (("float32", torch.float32, "fp32"), ("bfloat16", torch.bfloat16, "bf16-mixed"),
         ("int8", "int8", "bf16-mixed"), ("float8", "float8", "bf16-mixed"), ("nf4", "nf4", "bf16-mixed"))
WEIGHT_TARGETS = {"bfloat16": 0.55, "int8": 0.35, "float8": 0.35, "nf4": 0.25}  # x fp32's weight bytes
PLANNER_TOLERANCE = 0.10


def build(folder: Path) -> int:
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(**MODEL_KW)
    model.save_pretrained(folder)  # fp32, safetensors + config.json
    return sum(p.numel() for p in model.parameters())


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores: a wrapper subclass (torchao's Int8Tensor / Float8Tensor) is the
    sum of its inner tensors (`__tensor_flatten__`), a plain tensor its elements."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """The frozen base's bytes from its state dict (before the adapter is added). A
    bitsandbytes 4-bit weight contributes its packed uint8 data, `.absmax` and `.quant_map`
    (and the nested ones with double quantization); its `.quant_state.bitsandbytes__nf4`
    entry is the QuantState's metadata serialized for saving, not held while training."""
    return sum(storage_bytes(t) for key, t in module.state_dict().items() if ".quant_state." not in key)


def profiled_peak(fn) -> int:
    """Peak bytes allocated on the CPU while `fn()` runs, above what existed before it."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocations.sort(key=lambda a: a[0])
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return peak


def measure(folder: Path, base: str, load_dtype, precision: str, rank: int) -> dict:
    from diffusers import QwenImageTransformer2DModel

    from qwenimg_train.models.lora import LoraSettings
    from qwenimg_train.models.qwen_image.model import QwenImageModel, assemble_inputs
    from qwenimg_train.models.weights import compute_dtype
    from qwenimg_train.parallel.sharding import load_transformer

    t0 = time.perf_counter()
    transformer = load_transformer(QwenImageTransformer2DModel, folder, {}, dtype=load_dtype)
    load_s = time.perf_counter() - t0
    to_q = transformer.transformer_blocks[0].attn.to_q  # how the quantizer stored a Linear
    base_bytes = weight_bytes(transformer)
    base_params = sum(p.numel() for p in transformer.parameters())
    model = QwenImageModel(transformer, None, gradient_checkpointing=True,
                           lora=LoraSettings(rank=rank, alpha=float(rank)))
    adapter = [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in adapter), "the adapter is not fp32"
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad), "a base weight trains"
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)

    g = torch.Generator().manual_seed(0)
    z, side = MODEL_KW["out_channels"], RESOLUTION // 8
    target = torch.randn(BATCH, z, side, side, generator=g)  # latents; packed: 256 tokens × 64
    text = torch.randn(BATCH, TEXT_LEN, MODEL_KW["joint_attention_dim"], generator=g)
    inputs = assemble_inputs(target, None, None, text, torch.ones(BATCH, TEXT_LEN, dtype=torch.long))
    noise = torch.randn(inputs.target_bnc.shape, generator=g)
    sigmas = torch.rand(BATCH, generator=g)
    noisy = (1 - sigmas[:, None, None]) * inputs.target_bnc + sigmas[:, None, None] * noise
    velocity = noise - inputs.target_bnc
    mixed = precision == "bf16-mixed"
    assert compute_dtype(transformer) == (torch.float32 if base == "float32" else torch.bfloat16)
    losses = []

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
            pred = model.denoise(noisy, sigmas, inputs)
        return (pred.float() - velocity).pow(2).mean()

    def forward_backward():
        loss = forward()
        loss.backward()
        return loss.item()

    def step():
        # Lightning's closure order (accumulate_grad_batches=1): training_step, zero_grad
        # (set_to_none=True, torch's default), backward; then the optimizer's update
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    def grad_bytes_now() -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)

    t0 = time.perf_counter()
    step()  # AdamW allocates its state here
    step_s = time.perf_counter() - t0
    # The previous step's gradients are alive when a step starts, but the profiler records
    # no free of a block allocated before it started: free them, and make them again (the
    # same tensors, as zeros) first thing inside the profiled step, so that both their
    # allocation and their free (at zero_grad) are seen.
    stepped = [p for p in trainable if p.grad is not None]
    optimizer.zero_grad(set_to_none=True)

    def next_step():
        for p in stepped:
            p.grad = torch.zeros_like(p)
        step()

    peak = profiled_peak(next_step)
    # Forward + backward alone, with the gradients already allocated (kept by
    # zero_grad(set_to_none=False)), as bench_plan.py and plan_memory.measure_step measure
    # it: the planner's activations + autocast cache + frozen weight copies.
    forward_backward()
    optimizer.zero_grad(set_to_none=False)
    training_peak = profiled_peak(forward_backward)
    grad_bytes = grad_bytes_now()
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter)
    adam_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                     if torch.is_tensor(v))
    grad_params = sum(p.numel() for p in optimizer.state)  # parameters that got a gradient (and AdamW state)
    result = dict(base=base, precision=precision, base_params=base_params, weight_bytes=base_bytes,
                  adapter_bytes=adapter_bytes, adam_bytes=adam_bytes, step_peak_bytes=peak,
                  training_peak_bytes=training_peak, grad_bytes=grad_bytes,
                  total_bytes=base_bytes + adapter_bytes + adam_bytes + peak,
                  adapter_params=sum(p.numel() for p in adapter), stepped_params=grad_params,
                  linear_type=f"{type(to_q).__name__}, {type(to_q.weight).__name__} {str(to_q.weight.dtype)[6:]}",
                  load_s=round(load_s, 2), step_s=round(step_s, 2), losses=[round(v, 6) for v in losses])
    del model, transformer, optimizer, adapter, trainable, to_q
    gc.collect()
    return result


def predict(folder: Path, base: str, precision: str, rank: int) -> dict:
    from qwenimg_train.tools.plan import PlanConfig, plan

    # the trainer's spelling (float32, bfloat16, int8, float8, nf4): the planner accepts it
    p = plan(PlanConfig(model=str(folder), resolution=RESOLUTION, micro_batch=BATCH, gpus_per_node=1, nodes=1,
                        zero_stage=0, precision=precision, activation_checkpointing=True, prompt_length=TEXT_LEN,
                        overhead_gb=0, finetune="lora", lora_rank=rank, base_dtype=base))
    m, phases = p.memory, p.phase_bytes
    # fwd+bwd as measured (the gradients allocated before it): without the gradients
    training = m["activations"] + m.get("autocast_weight_cache", 0) + m.get("frozen_weight_copies", 0)
    return dict(weight_bytes=m["base_weights"], adapter_adam_bytes=m["parameters"] + m["optimizer_states"],
                training_bytes=training, step_peak_bytes=max(phases["training"], phases["step"]),
                total_bytes=p.peak_bytes, activations=m["activations"],
                frozen_weight_copies=m.get("frozen_weight_copies", 0),
                autocast_weight_cache=m.get("autocast_weight_cache", 0), gradients=m["gradients"],
                gradients_in_training=m.get("gradients_in_training", 0),
                optimizer_step_workspace=m["optimizer_step_workspace"], params=p.params, frozen_params=p.frozen_params,
                phases=phases)


def failure_notes(results: dict) -> list[str]:
    """A line per planner comparison that misses 10% (none did on 2026-12-06; the causes
    of the earlier misses, now modelled by the planner, are in benchmarks/RESULTS.md)."""
    notes = []
    for base, r in results.items():
        for part, c in r["planner"].items():
            if not c["pass_"]:
                notes.append(f"{base} {part}: measured / predicted {c['ratio']:.3f}; the planner's model of this part "
                             "(docs/planner.md, \"LoRA and quantized bases\") misses what happened here")
    return notes


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print every number as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import diffusers

    from qwenimg_train import compat

    compat.filter_import_chatter()
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    import bitsandbytes
    import torchao

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, torchao {torchao.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; {args.threads} threads")
    results, predictions = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_lora_memory_") as tmp:
        folder = Path(tmp) / "transformer"
        params = build(folder)
        print(f"transformer: {params / 1e6:.1f}M parameters ({MODEL_KW['num_layers']} blocks, width "
              f"{MODEL_KW['num_attention_heads'] * MODEL_KW['attention_head_dim']}), fp32 folder "
              f"{sum(f.stat().st_size for f in folder.iterdir()) / MiB:.1f} MiB; LoRA rank {args.rank}, "
              f"{RESOLUTION}² ({(RESOLUTION // 16) ** 2} image tokens) + {TEXT_LEN} text tokens, batch {BATCH}, "
              "gradient checkpointing on, AdamW foreach")
        for base, load_dtype, precision in BASES:
            results[base] = measure(folder, base, load_dtype, precision, args.rank)
            predictions[base] = predict(folder, base, precision, args.rank)
            r = results[base]
            print(f"  {base:<9} {r['linear_type']:<34} load {r['load_s']:5.2f} s, step {r['step_s']:5.2f} s, "
                  f"loss {r['losses'][0]:.4f} -> {r['losses'][1]:.4f}", flush=True)

    ref = results["float32"]
    print("\nmeasured (MiB; ratios to the float32 base of this run)")
    print(f"{'base':<9}{'precision':>11}{'weights':>10}{'/fp32':>7}{'target':>9}{'':>6}{'adapter':>9}{'AdamW':>8}"
          f"{'step peak':>11}{'total':>9}{'/fp32':>7}")
    targets_ok = True
    for base, r in results.items():
        ratio = r["weight_bytes"] / ref["weight_bytes"]
        target = WEIGHT_TARGETS.get(base)
        ok = target is None or ratio <= target
        targets_ok &= ok
        r["weight_ratio_to_fp32"], r["total_ratio_to_fp32"] = ratio, r["total_bytes"] / ref["total_bytes"]
        r["weight_target"], r["weight_target_pass"] = target, ok if target is not None else None
        print(f"{base:<9}{r['precision']:>11}{r['weight_bytes'] / MiB:>10.1f}{ratio:>7.3f}"
              f"{('<= ' + format(target, '.2f')) if target else '-':>9}{verdict(ok) if target else '':>6}"
              f"{r['adapter_bytes'] / MiB:>9.2f}{r['adam_bytes'] / MiB:>8.2f}{r['step_peak_bytes'] / MiB:>11.2f}"
              f"{r['total_bytes'] / MiB:>9.1f}{r['total_bytes'] / ref['total_bytes']:>7.3f}")

    print(f"\nplanner (qwenimg-plan finetune=lora, same config.json and step) vs measured: measured / predicted, "
          f"PASS within {PLANNER_TOLERANCE:.0%}")
    print(f"{'base':<9}{'part':<18}{'measured MiB':>13}{'planner MiB':>13}{'ratio':>8}")
    planner_ok = True
    for base, r in results.items():
        p = predictions[base]
        pairs = (("base weights", r["weight_bytes"], p["weight_bytes"]),
                 ("adapter + AdamW", r["adapter_bytes"] + r["adam_bytes"], p["adapter_adam_bytes"]),
                 ("fwd+bwd", r["training_peak_bytes"], p["training_bytes"]),
                 ("step peak", r["step_peak_bytes"], p["step_peak_bytes"]),
                 ("total", r["total_bytes"], p["total_bytes"]))
        r["planner"] = {}
        for i, (name, measured, predicted) in enumerate(pairs):
            ratio = measured / predicted
            ok = abs(ratio - 1) <= PLANNER_TOLERANCE
            planner_ok &= ok
            r["planner"][name] = dict(measured=measured, predicted=predicted, ratio=round(ratio, 4), pass_=ok)
            print(f"{base if i == 0 else '':<9}{name:<18}{measured / MiB:>13.2f}{predicted / MiB:>13.2f}"
                  f"{ratio:>8.3f}  {verdict(ok)}")
    print("  base weights: the state dict's storage / base_weight_bytes; adapter + AdamW: every lora_A/B (fp32) and "
          "AdamW's m, v, step / 4T + 8G (G: the adapter less the last block's frozen discarded text stream's); "
          "fwd+bwd: forward + backward with the gradients already allocated / activations + autocast cache + "
          "frozen weight copies; step peak: the whole step in Lightning's order (forward, zero_grad(set_to_none=True), "
          "backward, AdamW), above weights + adapter + AdamW / max(training phase, optimizer-step phase) of the plan; "
          "total: weights + adapter + AdamW + step peak / the plan's peak")
    notes = failure_notes(results)
    for note in notes:
        print("  note: " + note)
    print(f"\nweight-byte targets: {verdict(targets_ok)}; planner within {PLANNER_TOLERANCE:.0%}: "
          f"{verdict(planner_ok)}; wall {time.perf_counter() - wall:.0f} s")
    if args.json:
        print(json.dumps({"results": results, "predictions": predictions}, indent=1, default=str))


if __name__ == "__main__":
    main()
