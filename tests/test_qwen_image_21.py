"""The tiny Qwen-Image-2.1 checkpoint (qwenimg_train.models.qwen_image_21.tiny) loads and runs
in diffusers' own `QwenImage21Pipeline`, and `PromptEncoder21` encodes exactly as its
`encode_prompt` does. Offline, CPU, a few seconds in all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimg_train.models.qwen_image_21 import encoding, tiny

# Condition images are shown at about COND_RES^2 (the pipeline's `output_resolution`),
# kept small so the tiny VAE and vision tower stay fast.
COND_RES = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny21") / "qwen-image-2.1")


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline.from_pretrained(checkpoint, processor=tiny.load_processor(checkpoint))


@pytest.fixture(scope="module")
def encoder(pipe):
    return encoding.PromptEncoder21(pipe.text_encoder, pipe.processor, resolution=COND_RES)


def _image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = (np.random.RandomState(seed).rand(h, w, channels) * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode)


def test_folder_layout_and_configs(checkpoint, pipe):
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLForConditionalGeneration"]
    assert index["transformer"] == ["diffusers", "QwenImage21Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage21"]
    assert {p.name for p in checkpoint.iterdir()} >= {"transformer", "vae", "text_encoder", "processor", "scheduler"}

    sched = pipe.scheduler.config
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)
    assert (sched.base_shift, sched.max_shift) == (0.5, 1.15)
    assert sched.use_dynamic_shifting

    t_cfg, text_cfg = pipe.transformer.config, pipe.text_encoder.config.text_config
    assert t_cfg.context_in_dim == text_cfg.hidden_size
    assert t_cfg.in_channels == t_cfg.out_channels == pipe.vae.config.z_dim
    assert t_cfg.causal_condition
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 300_000
    total = sum(p.numel() for m in (pipe.transformer, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert total < 1_000_000

    # The VAE really compresses 16x (the pipeline hard-codes it).
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 4, 1, 32, 64)).latent_dist.mode()
    assert z.shape == (1, pipe.vae.config.z_dim, 1, 2, 4)


def test_build_is_atomic_and_ensure_reuses(checkpoint, tmp_path):
    assert tiny.ensure_tiny_checkpoint(checkpoint) == checkpoint
    with pytest.raises(FileExistsError):
        tiny.build_tiny_checkpoint(checkpoint)
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_processor_is_image_only_without_torchvision(pipe):
    from transformers import Qwen3VLProcessor

    from qwenimg_train.models.qwen_image.encoding import _torchvision_works

    assert isinstance(pipe.processor, Qwen3VLProcessor)
    if not _torchvision_works():
        assert pipe.processor.video_processor is None
    # Vision geometry: one merged token covers 32x32 pixels = one 2x2 group of 16x latents.
    ip = pipe.processor.image_processor
    assert (ip.patch_size, ip.merge_size) == (16, 2)


def test_template_constants_are_the_pipelines(pipe, encoder):
    assert pipe.sys_prompt == encoding.SYSTEM_PROMPT
    assert pipe.prompt_template_t2i == encoding.T2I_TEMPLATE
    assert pipe.prompt_template_ti2i == encoding.TI2I_TEMPLATE.format(slots=encoding.IMAGE_SLOT.format(1))
    assert pipe._drop_idx == encoder.drop == encoding.drop_index(pipe.processor)
    assert pipe._img_token_id == encoder.image_token_id


def test_drop_cuts_exactly_after_the_system_turn(pipe, encoder):
    tok = pipe.processor.tokenizer
    ids = tok(encoding.prompt_text("a red kite", 0)).input_ids
    assert tok.decode(ids[: encoder.drop]) == f"<|im_start|>system\n{encoding.SYSTEM_PROMPT}<|im_end|>\n"
    assert tok.decode(ids[encoder.drop :]).startswith("<|im_start|>user\na red kite")


def test_t2i_generates(pipe):
    out = pipe("a red kite over the sea", height=32, width=32, num_inference_steps=2, output_type="np",
               output_resolution=32, generator=torch.Generator().manual_seed(0))
    assert out.images.shape[:3] == (1, 32, 32)
    assert np.isfinite(out.images).all()


def test_conditioned_generates(pipe):
    out = pipe("make the sky green", image=_image(48, 64), height=32, width=32, num_inference_steps=2,
               output_type="np", output_resolution=COND_RES, generator=torch.Generator().manual_seed(0))
    assert out.images.shape[:3] == (1, 32, 32)
    assert np.isfinite(out.images).all()


PROMPTS = ["a red kite over the sea", "", "text reading 春节快乐"]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_encoder_equals_encode_prompt(pipe, encoder, num_images):
    sources = [_image(48, 64, seed=1), _image(64, 40, "RGBA", seed=2)][:num_images]
    # The pipeline's __call__ resizes the condition images before `encode_prompt`.
    prepared = [encoding.condition_image(im, COND_RES) for im in sources] or None
    ref_embeds, ref_mask, ref_slots = pipe.encode_prompt(PROMPTS, image=prepared)
    got = encoder.encode(PROMPTS, [sources] * len(PROMPTS) if sources else None)

    assert got.embeds.shape == ref_embeds.shape
    torch.testing.assert_close(got.embeds, ref_embeds, rtol=0, atol=1e-6)
    assert got.pipeline_mask is None if ref_mask is None else torch.equal(got.mask, ref_mask)
    assert got.mask.dtype == torch.long and bool(got.mask[:, 0].all())
    assert torch.equal(got.image_pad_mask, ref_slots)
    # Each slot stands for a 2x2 group of 16x latents: COND_RES images give (res/32)^2 slots each.
    expected_slots = sum((w // 32) * (h // 32) for w, h in (im.size for im in (prepared or [])))
    assert got.image_pad_mask.sum(1).tolist() == [expected_slots] * len(PROMPTS)


def test_encoder_mixed_batch_rows_match_their_groups(encoder):
    a, b = _image(48, 64, seed=1), _image(64, 40, "RGBA", seed=2)
    mixed = encoder.encode(["t2i one", "one source", "two sources", "t2i two"], [None, a, [a, b], None])
    t2i = encoder.encode(["t2i one", "t2i two"])
    cond = encoder.encode(["one source", "two sources"], [a, [a, b]])
    for rows, part in (([0, 3], t2i), ([1, 2], cond)):
        width = part.embeds.shape[1]
        assert torch.equal(mixed.embeds[rows, :width], part.embeds)
        assert not mixed.embeds[rows, width:].any()
        assert torch.equal(mixed.mask[rows, :width], part.mask)
        assert torch.equal(mixed.image_pad_mask[rows, :width], part.image_pad_mask)
    assert mixed.image_pad_mask[[0, 3]].sum() == 0
