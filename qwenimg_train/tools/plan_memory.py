"""Measured memory of a transformer training step on CPU, to check the planner against.

torch keeps no allocator statistics for the CPU (no `torch.cuda.max_memory_allocated`
counterpart), and RSS mixes in the Python heap, the allocator's caching and untouched
pages. The profiler does see every CPU allocation and free: with `profile_memory=True`
each one is a "[memory]" event whose `nbytes` is positive (allocation) or negative
(free). Their running sum over time is the bytes allocated since profiling began; its
maximum is the peak of the profiled call, exact to the byte (`peak_allocated`).

`measure_step` runs a `QwenImageTransformer2DModel` (through the trainer's own forward,
`qwenimg_train.models.qwen_image.transformer.forward_mixed`) for one warm-up step and one measured step:
parameters, gradients and AdamW states are counted tensor by tensor; the activation peak
is the profiled forward + backward of the second step, with the gradients of the first
kept (zero_grad(set_to_none=False)), as ZeRO's gradient partitions and DDP's buckets
stay allocated on a GPU; the optimizer-step peak is the profiled second `step()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from data_pipelines.core.geometry import PIXELS_PER_TOKEN


def peak_allocated(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, net) bytes allocated on the CPU while `fn()` runs, relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak, current


@dataclass
class MeasuredStep:
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    """Peak bytes allocated during forward + backward, above what existed before."""
    optimizer_step_workspace: int
    """Peak bytes allocated during optimizer.step()."""
    step_seconds: float

    @property
    def total(self) -> int:
        static = self.parameters + self.gradients + self.optimizer_states
        return static + max(self.activations, self.optimizer_step_workspace)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure_step(transformer, *, batch: int, height: int, width: int, text_len: int, edit: bool = False,
                 checkpointing: bool = False, seed: int = 0) -> MeasuredStep:
    """One measured training step of `transformer` (a diffusers QwenImageTransformer2DModel,
    any dtype) on random inputs: `batch` samples of an HxW target (plus an HxW source when
    `edit`), `text_len` text tokens, a velocity-style MSE loss, AdamW (foreach, as on GPU)."""
    from qwenimg_train.models.qwen_image.transformer import forward_mixed

    config = transformer.config
    dtype = next(transformer.parameters()).dtype
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN  # the packed token grid
    shapes = [[(1, rows, cols)] + ([(1, rows, cols)] if edit else []) for _ in range(batch)]
    image_len = rows * cols * (2 if edit else 1)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, image_len, config.in_channels, generator=generator).to(dtype)
    text = torch.randn(batch, text_len, config.joint_attention_dim, generator=generator).to(dtype)
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    image_mask = torch.ones(batch, image_len, dtype=torch.bool)
    sigmas = torch.rand(batch, generator=generator)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()

    def forward_backward():
        out = forward_mixed(transformer, hidden_states_bld=hidden, text_btd=text, text_mask_bt=text_mask,
                            timestep_b=sigmas, img_shapes=shapes, image_mask_bl=image_mask)
        loss = (out.float() - 1).pow(2).mean()
        loss.backward()

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4, foreach=True)
    start = time.perf_counter()
    forward_backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as ZeRO's partitions do
    activations, _ = peak_allocated(forward_backward)
    step_peak, _ = peak_allocated(optimizer.step)
    params = list(transformer.parameters())
    return MeasuredStep(
        parameters=_tensor_bytes(params),
        gradients=_tensor_bytes(p.grad for p in params),
        optimizer_states=_tensor_bytes(v for state in optimizer.state.values() for v in state.values()),
        activations=activations,
        optimizer_step_workspace=step_peak,
        step_seconds=seconds,
    )
