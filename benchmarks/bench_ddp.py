"""DDP step time on 2 CPU ranks (gloo): the last block's discarded text stream frozen at
build time and `find_unused_parameters=False` (what training does now) against
`find_unused_parameters=True` (what it needed before), same model, inputs and seed.

Each rank builds the glyph world's transformer shape (4 blocks, width 128; random
weights, no checkpoint), runs diffusers' forward + an MSE loss + backward + AdamW for
`--steps` steps on a fixed random batch of 64² images (16 tokens) and 16 text tokens,
and times the steps after a warm-up. Rounds alternate the two settings (drift hits
both); the result is the median over rounds of the per-round ratio
find_unused=True / find_unused=False (above 1: freezing is faster).
Usage: python benchmarks/bench_ddp.py [--rounds R] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, find_unused: bool, steps: int, out) -> None:
    from diffusers import QwenImageTransformer2DModel
    from torch.nn.parallel import DistributedDataParallel

    from qwenimg_train.models.qwen_image.glyph_world import glyph_world_spec
    from qwenimg_train.models.qwen_image.transformer import freeze_discarded_text_stream

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    spec = glyph_world_spec()
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * spec.z_dim, out_channels=spec.z_dim, num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden_size, axes_dims_rope=spec.axes_dims_rope)
    if not find_unused:
        freeze_discarded_text_stream(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    batch, rows = 8, 4
    hidden = torch.randn(batch, rows * rows, model.config.in_channels, generator=g)
    text = torch.randn(batch, 16, model.config.joint_attention_dim, generator=g)
    mask = torch.ones(batch, 16, dtype=torch.long)
    shapes = [[(1, rows, rows)] for _ in range(batch)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pred = ddp(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                   timestep=torch.full((batch,), 0.5), img_shapes=shapes, return_dict=False)[0]
        loss = pred.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(times[3:]))
    dist.destroy_process_group()


def run(find_unused: bool, steps: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_rank, args=(r, 2, init, find_unused, steps, queue)) for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    ratios = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        step = {unused: run(unused, args.steps) for unused in order}
        ratios.append(step[True] / step[False])
        print(f"round {r}: find_unused=True {step[True] * 1e3:.1f} ms, frozen + find_unused=False "
              f"{step[False] * 1e3:.1f} ms, ratio {ratios[-1]:.3f}", flush=True)
    print(f"DDP step, 2 CPU ranks: find_unused_parameters=True / frozen + False = {statistics.median(ratios):.3f}x "
          f"(median of {args.rounds} rounds; above 1: the frozen build is faster)")


if __name__ == "__main__":
    main()
