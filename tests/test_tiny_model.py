"""The tiny checkpoint (qwenimg_train.models.qwen_image.tiny) loads and runs in diffusers' own pipelines.

Everything offline and on CPU; the edit call dominates (the edit pipeline VAE-encodes
its source at about 1024x1024 whatever the input size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimg_train.models.qwen_image import tiny


@pytest.fixture(scope="module")
def t2i_pipe(tiny_checkpoint):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def edit_pipe(tiny_checkpoint):
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline.from_pretrained(tiny_checkpoint, processor=tiny.load_processor(tiny_checkpoint))


def _transformer_calls(pipe) -> tuple[list[dict], object]:
    calls: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw), with_kwargs=True)
    return calls, handle


def test_template_constants_are_the_pipelines(t2i_pipe, edit_pipe):
    assert t2i_pipe.prompt_template_encode == tiny.T2I_PROMPT_TEMPLATE
    assert t2i_pipe.prompt_template_encode_start_idx == tiny.T2I_DROP_TOKENS == 34
    assert edit_pipe.prompt_template_encode == tiny.EDIT_PROMPT_TEMPLATE
    assert edit_pipe.prompt_template_encode_start_idx == tiny.EDIT_DROP_TOKENS == 64


def test_drop_counts_cut_exactly_at_the_user_turn(t2i_pipe, edit_pipe):
    tok = t2i_pipe.tokenizer
    # Text-to-image: the 34 dropped tokens are the system turn and "<|im_start|>user\n".
    template, drop = t2i_pipe.prompt_template_encode, t2i_pipe.prompt_template_encode_start_idx
    prefix = template.split("{}")[0]
    assert prefix.endswith("<|im_start|>user\n")
    assert len(tok(prefix).input_ids) == drop
    prompt = "A neon sign reading 春节快乐"
    full = tok(template.format(prompt)).input_ids
    assert full[:drop] == tok(prefix).input_ids
    assert tok.decode(full[drop:]).startswith(prompt)
    # Edit: the 64 dropped tokens end right before <|vision_start|>.
    template, drop = edit_pipe.prompt_template_encode, edit_pipe.prompt_template_encode_start_idx
    prefix = template.split("<|vision_start|>")[0]
    assert len(edit_pipe.tokenizer(prefix).input_ids) == drop
    full = edit_pipe.tokenizer(template.format("make it red")).input_ids
    assert full[drop] == edit_pipe.tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_tokenizer_round_trips_any_text(tiny_checkpoint, t2i_pipe):
    text = "春节快乐 Hello, world! 𝒳 한국어 日本語"
    built = tiny.build_tokenizer()
    loaded = t2i_pipe.tokenizer
    ids = built(text).input_ids
    assert loaded(text).input_ids == ids
    assert built.decode(ids) == loaded.decode(ids) == text
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"
    for token in tiny.SPECIAL_TOKENS:  # each special token is one id, never split
        assert len(loaded(token).input_ids) == 1


def test_text_encoder_config_matches_tokenizer(tiny_checkpoint, t2i_pipe):
    tok, config = t2i_pipe.tokenizer, t2i_pipe.text_encoder.config
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tok)
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert t2i_pipe.transformer.config.joint_attention_dim == config.text_config.hidden_size


def test_vae_and_scheduler_follow_the_release(t2i_pipe):
    vae = t2i_pipe.vae
    assert t2i_pipe.vae_scale_factor == 8
    assert t2i_pipe.transformer.config.in_channels == 4 * vae.config.z_dim
    assert t2i_pipe.transformer.config.out_channels == vae.config.z_dim
    mean, std = np.array(vae.config.latents_mean), np.array(vae.config.latents_std)
    assert len(mean) == len(std) == vae.config.z_dim
    assert np.abs(mean).max() <= 0.1 and np.abs(mean).max() > 0.01  # non-trivial, so a skipped
    assert np.all((std >= 0.8) & (std <= 1.2)) and np.abs(std - 1).max() > 0.05  # normalisation shows
    config = t2i_pipe.scheduler.config
    assert type(t2i_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (config.use_dynamic_shifting, config.time_shift_type, config.shift_terminal) == (True, "exponential", 0.02)
    assert (config.base_image_seq_len, config.base_shift, config.max_image_seq_len, config.max_shift) == (
        256, 0.5, 8192, 0.9)


def test_text_to_image_generates(t2i_pipe):
    prompt = "a red sign that says 春节快乐"
    calls, handle = _transformer_calls(t2i_pipe)
    try:
        image = t2i_pipe(prompt, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(calls) == 2
    assert calls[0]["img_shapes"] == [[(1, 4, 4)]]
    assert calls[0]["hidden_states"].shape == (1, 16, 16)  # (64/16)^2 tokens of 4 * z_dim
    # Kept text: the prompt and the template's tail ("<|im_end|>\n<|im_start|>assistant\n").
    tail = tiny.T2I_PROMPT_TEMPLATE.split("{}")[1]
    tok = t2i_pipe.tokenizer
    assert calls[0]["encoder_hidden_states"].shape[1] == len(tok(prompt).input_ids) + len(tok(tail).input_ids)


def test_text_to_image_true_cfg(t2i_pipe):
    calls, handle = _transformer_calls(t2i_pipe)
    try:
        image = t2i_pipe("a red sign", negative_prompt="blurry", height=64, width=96, num_inference_steps=2,
                         true_cfg_scale=4.0, output_type="pil").images
    finally:
        handle.remove()
    assert image[0].size == (96, 64)
    assert len(calls) == 4  # conditional and unconditional pass per step
    assert calls[0]["img_shapes"] == [[(1, 4, 6)]]


def test_edit_generates(edit_pipe):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompt = "make it red"
    calls, handle = _transformer_calls(edit_pipe)
    try:
        image = edit_pipe(image=source, prompt=prompt, height=64, width=64, num_inference_steps=2,
                          true_cfg_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # The source is resized to ~1024x1024 area for both the VAE and Qwen2.5-VL,
    # whatever its size: target tokens (64/16)^2 = 16, then source tokens 64 x 64.
    assert calls[0]["img_shapes"] == [[(1, 4, 4), (1, 64, 64)]]
    assert calls[0]["hidden_states"].shape[1] == 16 + 64 * 64
    # Qwen2.5-VL: 1024 -> 1036 (multiple of 28), a 74 x 74 patch grid, 2x2 merged to
    # 37 * 37 = 1369 image tokens between <|vision_start|> and <|vision_end|>.
    tok = edit_pipe.tokenizer
    tail = tiny.EDIT_PROMPT_TEMPLATE.split("{}")[1]
    expected = 1 + 37 * 37 + 1 + len(tok(prompt).input_ids) + len(tok(tail).input_ids)
    assert calls[0]["encoder_hidden_states"].shape[1] == expected


def test_processor_expands_image_tokens(tiny_checkpoint):
    processor = tiny.load_processor(tiny_checkpoint)
    text = tiny.EDIT_PROMPT_TEMPLATE.format("x")
    out = processor(text=[text], images=[Image.new("RGB", (384, 256))], padding=True, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 18, 28]]  # (t, h/14, w/14) after rounding to 28
    assert (out["input_ids"] == processor.image_token_id).sum() == 18 * 28 // 4
    assert out["pixel_values"].shape == (18 * 28, 3 * 2 * 14 * 14)


@pytest.mark.skipif(not tiny._torchvision_works(), reason="Qwen2VLProcessor needs torchvision in transformers 5")
def test_edit_pipeline_loads_folder_unchanged(tiny_checkpoint):
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLProcessor

    assert isinstance(QwenImageEditPipeline.from_pretrained(tiny_checkpoint).processor, Qwen2VLProcessor)


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_build_is_deterministic_and_keeps_the_caller_rng(tmp_path, tiny_checkpoint):
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny.build_tiny_checkpoint(tmp_path / "a", pipeline_class="QwenImagePipeline", seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b = tiny.build_tiny_checkpoint(tmp_path / "b", pipeline_class="QwenImagePipeline", seed=1)
    # The same seed gives the same weights whatever the pipeline class.
    assert _weights(a) == _weights(tiny_checkpoint)
    assert _weights(a)["transformer/diffusion_pytorch_model.safetensors"] != \
        _weights(b)["transformer/diffusion_pytorch_model.safetensors"]
    # The text-to-image folder: no processor; QwenImagePipeline loads it, the edit
    # pipeline only when handed a processor.
    assert json.loads((a / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    assert not (a / "processor").exists()
    assert QwenImagePipeline.from_pretrained(a).tokenizer is not None
    edit = QwenImageEditPipeline.from_pretrained(a, processor=tiny.load_processor(tiny_checkpoint))
    assert edit.processor is not None


def test_ensure_reuses_and_build_never_replaces(tmp_path, tiny_checkpoint, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an existing checkpoint")

    monkeypatch.setattr(tiny, "_write_checkpoint", no_build)
    assert tiny.ensure_tiny_checkpoint(tiny_checkpoint) == tiny_checkpoint
    with pytest.raises(FileExistsError):
        tiny.build_tiny_checkpoint(tiny_checkpoint)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone else's")
    with pytest.raises(FileExistsError):
        tiny.ensure_tiny_checkpoint(tmp_path / "taken")


def test_losing_a_build_race_keeps_the_winner(tmp_path, monkeypatch):
    target = tmp_path / "shared"

    def write_while_another_process_wins(directory, *args):
        directory.mkdir()
        (directory / "model_index.json").write_text("{\"ours\": true}")
        target.mkdir()
        (target / "model_index.json").write_text("{\"theirs\": true}")

    monkeypatch.setattr(tiny, "_write_checkpoint", write_while_another_process_wins)
    assert tiny.ensure_tiny_checkpoint(target) == target
    assert json.loads((target / "model_index.json").read_text()) == {"theirs": True}
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # our temporary folder is gone
