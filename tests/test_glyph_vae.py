"""The fitted glyph VAE decodes legibly: the OCR reads the round trip of glyphs it reads
on the renders themselves (the learnable tiny world's first piece)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from data_pipelines.sources.glyphs import glyph_vocabulary, render_glyph
from qwenimg_train.models.qwen_image.glyph_vae import GlyphVaeSpec, ensure_glyph_vae, round_trip_ocr


@pytest.mark.slow
def test_fitted_vae_round_trip_is_legible(glyph_vae):
    from diffusers import AutoencoderKLQwenImage

    spec = GlyphVaeSpec()
    folder = glyph_vae
    assert ensure_glyph_vae(folder, spec) == folder  # cached: a second call fits nothing
    fit = json.loads((folder / "fit.json").read_text())
    vae = AutoencoderKLQwenImage.from_pretrained(folder)
    assert 2 ** len(vae.temperal_downsample) == 4  # what the pipelines take as the VAE scale
    assert len(vae.config.latents_std) == spec.z_dim and min(vae.config.latents_std) > 0
    chars = "".join(random.Random(1).sample(glyph_vocabulary(spec.chinese), 40))
    scores = round_trip_ocr(vae, chars, spec.size)
    print(f"\nglyph VAE: fitted in {fit['seconds']} s ({fit['steps']} steps); OCR reads {scores['renders']}/40 "
          f"renders and {scores['round_trip']}/40 round trips")
    assert scores["renders"] >= 38, scores
    assert scores["round_trip_accuracy"] >= 0.85, scores


def test_glyph_renders_are_centred_and_jittered():
    centred = render_glyph("永", 48)
    assert centred.size == (48, 48) and centred.getpixel((0, 0)) == (255, 255, 255)
    assert np.asarray(centred.convert("L")).min() < 64  # ink was drawn
    a, b = render_glyph("永", 48, random.Random(0)), render_glyph("永", 48, random.Random(1))
    assert a.tobytes() != b.tobytes()
