"""A tiny `AutoencoderKLQwenImage` fitted on glyph renders, so that what it decodes is legible.

The random tiny VAE (tiny.py) decodes any latent to texture: a model trained through it
can never draw a character, whatever it learns. This one is the same diffusers class,
4x spatial (three levels), 16 latent channels, fitted in-process for a fixed number of
steps on jittered single-glyph renders (`data_pipelines.sources.glyphs`), deterministic
by seed, and written as a diffusers folder (`save_pretrained`) with its latent
statistics in the config, as the released VAE carries them.

The loss is L1 with the ink weighted `ink_weight` times: plain L1 on a mostly white
canvas settles on an all-white decoder within the first hundred steps (measured: 0 of
40 glyphs legible after 150 s), because white is the median of every pixel.

    fit = fit_glyph_vae(GlyphVaeSpec())     # about 2.5 min on 2 CPU cores
    fit.vae.save_pretrained(folder)         # or ensure_glyph_vae(folder)
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipelines.sources.glyphs import glyph_vocabulary, render_glyph

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlyphVaeSpec:
    size: int = 48
    """Glyph canvas in pixels (latents are size/4 square)."""
    base_dim: int = 16
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4)
    """Three levels: two downsamples, 4x (the pipelines read the scale from temperal_downsample)."""
    temperal_downsample: tuple[bool, ...] = (False, True)
    steps: int = 680
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    ink_weight: float = 10.0
    chinese: int = 200
    """GB 2312 level-1 characters in the fitting vocabulary (plus digits and Latin capitals)."""
    vocabulary: str = field(default="", compare=False)

    def chars(self) -> str:
        return self.vocabulary or glyph_vocabulary(self.chinese)


@dataclass
class GlyphVaeFit:
    vae: torch.nn.Module
    steps: int
    seconds: float
    final_loss: float


def to_video(images) -> torch.Tensor:
    """PIL images -> [B, 3, 1, H, W] in [-1, 1] (the VAE is a video VAE: one frame)."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2)[:, :, None]


def fit_glyph_vae(spec: GlyphVaeSpec = GlyphVaeSpec(), *, seed: int = 0, log_every: int = 0) -> GlyphVaeFit:
    from diffusers import AutoencoderKLQwenImage

    chars = spec.chars()
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=spec.base_dim, z_dim=spec.z_dim, dim_mult=list(spec.dim_mult),
                                     num_res_blocks=1, attn_scales=[], dropout=0.0,
                                     temperal_downsample=list(spec.temperal_downsample))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / spec.warmup_steps))
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    vae.train()
    for step in range(spec.steps):
        x = to_video([render_glyph(rng.choice(chars), spec.size, rng) for _ in range(spec.batch_size)])
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample
        weight = 1 + (spec.ink_weight - 1) * (x < 0.5).float()  # ink pixels (dark) weigh ink_weight
        loss = (weight * (reconstruction - x).abs()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"glyph VAE step {step + 1}/{spec.steps}: loss {float(loss):.4f}", flush=True)
    vae.eval().requires_grad_(False)
    _set_latent_stats(vae, chars, spec.size, seed)
    return GlyphVaeFit(vae, spec.steps, time.perf_counter() - start, float(loss.detach()))


@torch.no_grad()
def _set_latent_stats(vae, chars: str, size: int, seed: int) -> None:
    """latents_mean / latents_std of the config: per channel over renders of every
    character, so normalised latents have unit scale as the released VAE's do."""
    rng = random.Random(seed + 1)
    latents = torch.cat([vae.encode(to_video([render_glyph(c, size, rng) for c in chars[i:i + 64]])).latent_dist.mode()
                         for i in range(0, len(chars), 64)])
    vae.register_to_config(latents_mean=latents.mean((0, 2, 3, 4)).tolist(),
                           latents_std=latents.std((0, 2, 3, 4)).clamp_min(1e-3).tolist())


@torch.no_grad()
def round_trip(vae, chars: str, size: int) -> list[tuple[object, object]]:
    """(render, decoded render) PIL pairs of centred glyphs through encode -> decode."""
    from PIL import Image

    pairs = []
    for ch in chars:
        original = render_glyph(ch, size)
        decoded = vae.decode(vae.encode(to_video([original])).latent_dist.mode()).sample[0, :, 0]
        array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        pairs.append((original, Image.fromarray(array)))
    return pairs


def round_trip_ocr(vae, chars: str, size: int, ocr=None, read_size: int = 256) -> dict[str, float | int]:
    """How many of `chars` the OCR reads on the renders and on their round trips (both
    upscaled to `read_size`², as the recogniser wants text of some height)."""
    from PIL import Image

    from data_pipelines.core.ocr import OcrEngine

    ocr = ocr or OcrEngine()
    read = {"renders": 0, "round_trip": 0}
    for ch, (original, decoded) in zip(chars, round_trip(vae, chars, size)):
        for key, image in (("renders", original), ("round_trip", decoded)):
            text, _ = ocr.recognize(image.resize((read_size, read_size), Image.BICUBIC))
            read[key] += text.strip() == ch
    return {"n": len(chars), **read, "renders_accuracy": read["renders"] / len(chars),
            "round_trip_accuracy": read["round_trip"] / len(chars)}


def ensure_glyph_vae(folder: str | Path, spec: GlyphVaeSpec = GlyphVaeSpec(), *, seed: int = 0) -> Path:
    """`folder` holding the fitted VAE (diffusers layout) and `fit.json`; fitted only when
    it holds none yet (a cache: delete it to refit)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    logger.info("fitting the glyph VAE into %s (once; about 3 minutes on 2 CPU cores)", folder)
    fit = fit_glyph_vae(spec, seed=seed)
    logger.info("glyph VAE fitted: %d steps in %.0f s, final loss %.4f", fit.steps, fit.seconds, fit.final_loss)
    tmp = folder.with_name(f".{folder.name}.tmp")
    fit.vae.save_pretrained(tmp)
    (tmp / "fit.json").write_text(json.dumps({"spec": {k: v for k, v in asdict(spec).items() if k != "vocabulary"},
                                              "seed": seed, "steps": fit.steps, "seconds": round(fit.seconds, 1),
                                              "final_loss": fit.final_loss}, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    return folder
