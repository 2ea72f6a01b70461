"""The learnable tiny world's checkpoint: a tiny Qwen-Image that can learn to write on a CPU.

The random tiny checkpoint (tiny.py) decodes every latent to texture, so nothing
trained through it can draw a character. This folder is the same layout and the same
classes, with three differences:

    vae/           the fitted glyph VAE (glyph_vae.py: 4x, 16 channels, legible round
                   trips), cached beside the folder as `glyph-vae/` and copied in
    transformer/   4 double-stream blocks of 4 heads x 32 (width 128, about 2.5M
                   parameters): what 2 CPU cores train to draw a few dozen glyphs in
                   minutes (benchmarks/glyph_learnability.py)
    text_encoder/  the tiny random Qwen2.5-VL, unchanged: distinct prompts give distinct
                   states, but a character's meaning is only what training attaches to
                   its token, so the model cannot generalise to characters it never saw
                   drawn (the held-out suite measures exactly that: near 0)

Built in-process on first use, deterministic by seed, atomic (tiny.py's builder) and
cached: an existing folder is reused as is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qwenimg_train.models.qwen_image.glyph_vae import GlyphVaeSpec, ensure_glyph_vae
from qwenimg_train.models.qwen_image.tiny import PipelineClass, TinySpec, _build

VAE_CACHE = "glyph-vae"
"""The fitted VAE's cache folder, a sibling of the checkpoint (fitted once, about 2.5 min)."""


def glyph_world_spec(vae: GlyphVaeSpec = GlyphVaeSpec()) -> TinySpec:
    """The tiny spec with the glyph world's transformer and the glyph VAE's shape."""
    return TinySpec(num_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                    vae_base_dim=vae.base_dim, z_dim=vae.z_dim, vae_dim_mult=tuple(vae.dim_mult),
                    vae_temperal_downsample=tuple(vae.temperal_downsample))


def ensure_glyph_world(path: str | os.PathLike, *, pipeline_class: PipelineClass = "QwenImageEditPipeline",
                       seed: int = 0, vae_folder: str | os.PathLike | None = None) -> Path:
    """`path` holding the glyph world's checkpoint, built first when it holds none (the
    VAE fitted first when `vae_folder`, by default `<path>/../glyph-vae`, holds none)."""
    from diffusers import AutoencoderKLQwenImage

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    spec = GlyphVaeSpec()
    folder = ensure_glyph_vae(Path(vae_folder) if vae_folder is not None else path.parent / VAE_CACHE, spec)
    vae = AutoencoderKLQwenImage.from_pretrained(folder)
    built = _build(path, glyph_world_spec(spec), pipeline_class, seed, exist_ok=True, vae=vae)
    fit = folder / "fit.json"
    if fit.is_file() and not (built / "vae" / "fit.json").exists():
        shutil.copyfile(fit, built / "vae" / "fit.json")  # provenance: how the VAE was fitted
    return built


def describe(path: str | os.PathLike) -> dict:
    """Sizes and the VAE's fit record of a glyph-world folder (for logs and docs)."""
    path = Path(path)
    config = json.loads((path / "transformer" / "config.json").read_text())
    fit = path / "vae" / "fit.json"
    return {"transformer": {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")},
            "vae_fit": json.loads(fit.read_text()) if fit.is_file() else None}
