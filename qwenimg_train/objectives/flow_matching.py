"""Rectified-flow objective: pure functions with injectable noise and generators.

Convention (diffusers, and so the released Qwen-Image scheduler): σ = 1 is pure
noise, x_σ = (1 − σ)·x0 + σ·ε, and the model predicts the velocity ε − x0 (Liu et
al., "Flow Straight and Fast", 2022; Esser et al., "Scaling Rectified Flow
Transformers", 2024, for the timestep densities and loss weightings). The transformer
takes σ itself as its `timestep` argument (the pipeline divides by 1000).

Timestep sampling draws u in (0, 1) from a density (logit-normal, uniform, or the
"mode" density of SD3), then shifts it towards noise: by a fixed shift s,
σ = s·u / (1 + (s − 1)·u), or resolution-dependently as the released scheduler does:
μ linear in the image-token count between (256 tokens, 0.5) and (8192, 0.9), and
σ = e^μ / (e^μ + 1/u − 1). The scheduler's `shift_terminal` (0.02) only stretches
the inference schedule and is not part of training.

Losses come back per sample (mean over the sample's valid target tokens), so tasks,
stages and σ buckets can be logged and weighted separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The released scheduler's dynamic-shift line (FlowMatchEulerDiscreteScheduler config).
BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 8192
BASE_SHIFT = 0.5
MAX_SHIFT = 0.9

DENSITIES = ("logit_normal", "uniform", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def image_seq_len(height: int, width: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Image tokens of an H x W image: (H/16)·(W/16) for the 8x VAE and 2x2 patches."""
    return (height // (vae_scale * patch)) * (width // (vae_scale * patch))


def compute_mu(
    seq_len: int | torch.Tensor,
    *,
    base_seq_len: int = BASE_IMAGE_SEQ_LEN,
    max_seq_len: int = MAX_IMAGE_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
):
    """μ of the dynamic shift: linear in the token count (diffusers `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift_exponential(mu: float | torch.Tensor, u: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """σ = e^μ / (e^μ + (1/u − 1)^sigma), the scheduler's exponential time shift."""
    mu = torch.as_tensor(mu, dtype=u.dtype, device=u.device)
    return torch.exp(mu) / (torch.exp(mu) + (1 / u - 1) ** sigma)


def sample_density(
    batch_size: int,
    *,
    density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """u in (0, 1) per sample, from the density (diffusers `compute_density_for_timestep_sampling`)."""
    if density == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch_size,), generator=generator, device=device))
    elif density == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    elif density == "mode":
        u = torch.rand(batch_size, generator=generator, device=device)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ValueError(f"objective.density = {density!r}; use one of {DENSITIES}")
    # Keep away from exactly 0 and 1: σ = 0 gives a trivial target, σ = 1 no signal.
    return u.clamp(1e-5, 1 - 1e-5)


def shift_sigmas(u: torch.Tensor, *, shift: float | None = None, mu: torch.Tensor | float | None = None) -> torch.Tensor:
    """Shift u towards noise: a fixed `shift`, or the dynamic shift of `mu` (per sample)."""
    if (shift is None) == (mu is None):
        raise ValueError("give exactly one of shift (fixed) and mu (resolution-dependent)")
    if shift is not None:
        if shift <= 0:
            raise ValueError(f"objective.shift = {shift} must be > 0")
        return shift * u / (1 + (shift - 1) * u)
    return time_shift_exponential(mu, u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas_b: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, σ broadcast from [B] over the other dimensions."""
    sigmas = sigmas_b.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigmas) * x0 + sigmas * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ε − x0."""
    return noise - x0


def loss_weighting(sigmas_b: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights (diffusers `compute_loss_weighting_for_sd3`)."""
    if scheme == "none":
        return torch.ones_like(sigmas_b)
    if scheme == "sigma_sqrt":
        return sigmas_b.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas_b + 2 * sigmas_b**2))
    raise ValueError(f"objective.weighting = {scheme!r}; use one of {WEIGHTINGS}")


def per_sample_loss(
    pred_bld: torch.Tensor, target_bld: torch.Tensor, token_mask_bl: torch.Tensor | None = None, weights_b: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample over its valid target tokens: [B].

    `token_mask_bl` marks the target tokens of each sample (False for padding and for
    appended source-image tokens), so samples of different sizes and tasks in one
    batch give the loss each would give alone.
    """
    err = (pred_bld.float() - target_bld.float()) ** 2  # [B, L, D]
    if token_mask_bl is None:
        loss = err.mean(dim=(1, 2))
    else:
        mask = token_mask_bl.to(err.dtype).unsqueeze(-1)  # [B, L, 1]
        count = mask.sum(dim=(1, 2)).clamp_min(1) * err.shape[-1]
        loss = (err * mask).sum(dim=(1, 2)) / count
    return loss if weights_b is None else loss * weights_b


def flow_matching_loss(
    denoise,
    x0_bnc: torch.Tensor,
    noise_bnc: torch.Tensor,
    sigmas_b: torch.Tensor,
    token_mask_bn: torch.Tensor | None = None,
    weights_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample rectified-flow loss [B] of `denoise(x_σ, σ) -> velocity` (any callable).

    The noise is an argument, so a test (or a reference loss curve) fixes it.
    """
    x_t = add_noise(x0_bnc, noise_bnc, sigmas_b)
    pred = denoise(x_t, sigmas_b)
    return per_sample_loss(pred, velocity_target(x0_bnc, noise_bnc), token_mask_bn, weights_b)


@dataclass
class FlowMatching:
    """Timestep sampling and loss weighting (configs/objective/flow_matching.yaml)."""

    density: str = "logit_normal"
    """u ~ logit_normal(logit_mean, logit_std), uniform, or SD3's `mode` density."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | str = "dynamic"
    """"dynamic": μ from each sample's image-token count (the released scheduler); a number: fixed shift."""
    weighting: str = "none"
    """Per-sample loss weight: none, sigma_sqrt or cosmap (SD3)."""
    sigma_buckets: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Edges of the σ buckets that `train/loss/sigma_<lo>-<hi>` is logged over."""
    shift_line: tuple[float, float, float, float] | None = None
    """The dynamic shift's line (base_image_seq_len, max_image_seq_len, base_shift, max_shift); null:
    the model folder's scheduler config (`with_scheduler_line`; Qwen-Image 256 -> 8192 tokens,
    0.5 -> 0.9; Qwen-Image-2.1 256 -> 4096, 0.5 -> 1.15), or those Qwen-Image values."""

    def __post_init__(self) -> None:
        if self.density not in DENSITIES:
            raise ValueError(f"objective.density = {self.density!r}; use one of {DENSITIES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting = {self.weighting!r}; use one of {WEIGHTINGS}")
        if isinstance(self.shift, str) and self.shift != "dynamic":
            raise ValueError(f"objective.shift = {self.shift!r}; use \"dynamic\" or a positive number")
        if not isinstance(self.shift, str) and self.shift <= 0:
            raise ValueError(f"objective.shift = {self.shift} must be > 0")
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std = {self.logit_std} must be > 0")
        edges = tuple(float(e) for e in self.sigma_buckets)
        if list(edges) != sorted(edges) or any(not 0 < e < 1 for e in edges):
            raise ValueError(f"objective.sigma_buckets = {list(self.sigma_buckets)} must increase inside (0, 1)")
        self.sigma_buckets = edges
        if self.shift_line is not None:
            line = tuple(float(v) for v in self.shift_line)
            if len(line) != 4 or not 0 < line[0] < line[1]:
                raise ValueError(f"objective.shift_line = {list(self.shift_line)}: use [base_image_seq_len, "
                                 "max_image_seq_len, base_shift, max_shift] with 0 < base < max sequence length")
            self.shift_line = line

    def with_scheduler_line(self, scheduler_config: dict) -> "FlowMatching":
        """This objective with `shift_line` read from a scheduler config when it is unset
        (the model's own scheduler decides how sampling shifts, so training shifts alike)."""
        if self.shift_line is not None:
            return self
        import dataclasses

        line = (scheduler_config.get("base_image_seq_len", BASE_IMAGE_SEQ_LEN),
                scheduler_config.get("max_image_seq_len", MAX_IMAGE_SEQ_LEN),
                scheduler_config.get("base_shift", BASE_SHIFT), scheduler_config.get("max_shift", MAX_SHIFT))
        return dataclasses.replace(self, shift_line=line)

    def sample_sigmas(self, image_tokens_b: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """σ per sample: density, then the fixed or resolution-dependent shift."""
        u = sample_density(len(image_tokens_b), density=self.density, logit_mean=self.logit_mean,
                           logit_std=self.logit_std, mode_scale=self.mode_scale, generator=generator,
                           device=image_tokens_b.device)
        if self.shift == "dynamic":
            base_len, max_len, base_shift, max_shift = self.shift_line or (
                BASE_IMAGE_SEQ_LEN, MAX_IMAGE_SEQ_LEN, BASE_SHIFT, MAX_SHIFT)
            mu = compute_mu(image_tokens_b.to(u.dtype), base_seq_len=base_len, max_seq_len=max_len,
                            base_shift=base_shift, max_shift=max_shift)
            return shift_sigmas(u, mu=mu)
        return shift_sigmas(u, shift=float(self.shift))

    def weights(self, sigmas_b: torch.Tensor) -> torch.Tensor | None:
        return None if self.weighting == "none" else loss_weighting(sigmas_b, self.weighting)

    def bucket_names(self) -> list[str]:
        edges = (0.0, *self.sigma_buckets, 1.0)
        return [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges[:-1], edges[1:])]

    def bucket_index(self, sigmas_b: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(sigmas_b.float(), torch.tensor(self.sigma_buckets, device=sigmas_b.device))
