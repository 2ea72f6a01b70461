"""The model against diffusers: prompt encoding, packing, mixed batches; overfitting; EMA."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimg_train.training.callbacks.ema import EMA
from qwenimg_train.models.qwen_image.encoding import EDIT_DROP, EDIT_TEMPLATE, T2I_DROP, T2I_TEMPLATE, pack_latents, unpack_latents
from qwenimg_train.models.qwen_image.model import QwenImageModel
from qwenimg_train.objectives.flow_matching import flow_matching_loss
from qwenimg_train.models.qwen_image.transformer import forward_mixed

PROMPTS = ["a poster with the title “春节快乐”", "海报"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    torch.manual_seed(0)
    return QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=64)


def _image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _u8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


def _pipeline(cls, model):
    enc = model.encoders
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=enc.vae, text_encoder=enc.text_encoder,
                  tokenizer=enc.tokenizer, transformer=model.transformer)
    if cls.__name__ == "QwenImageEditPipeline":
        kwargs["processor"] = enc.processor
    return cls(**kwargs)


def test_templates_equal_the_pipelines(model):
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    t2i, edit = _pipeline(QwenImagePipeline, model), _pipeline(QwenImageEditPipeline, model)
    assert (t2i.prompt_template_encode, t2i.prompt_template_encode_start_idx) == (T2I_TEMPLATE, T2I_DROP)
    assert (edit.prompt_template_encode, edit.prompt_template_encode_start_idx) == (EDIT_TEMPLATE, EDIT_DROP)


def test_t2i_prompt_embeddings_equal_the_pipeline(model):
    from diffusers import QwenImagePipeline

    ref, ref_mask = _pipeline(QwenImagePipeline, model).encode_prompt(PROMPTS, device="cpu")
    ours, mask = model.encoders.prompts.encode(PROMPTS)
    torch.testing.assert_close(ours, ref)
    assert torch.equal(mask, ref_mask.long())
    assert mask[1].sum() < mask[0].sum()  # the short prompt is padded and masked


def test_edit_prompt_embeddings_equal_the_pipeline(model):
    from diffusers import QwenImageEditPipeline

    images = [_image(1), _image(2, (96, 64))]
    pipe = _pipeline(QwenImageEditPipeline, model)
    for prompt, image in zip(PROMPTS, images):
        ref, _ = pipe.encode_prompt(prompt, image=image, device="cpu")
        ours, mask = model.encoders.prompts.encode_edit([prompt], [image])
        torch.testing.assert_close(ours, ref)
        assert mask.all()


def test_mixed_prompt_batch_rows_equal_their_own_encoding(model):
    image = _u8([_image(3)])[0]
    embeds, mask = model.encoders.prompts.encode(PROMPTS, [None, image])
    alone_t2i, _ = model.encoders.prompts.encode_t2i(PROMPTS[:1])
    alone_edit, _ = model.encoders.prompts.encode_edit(PROMPTS[1:], [image])
    torch.testing.assert_close(embeds[0, : int(mask[0].sum())], alone_t2i[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embeds[1, : int(mask[1].sum())], alone_edit[0], atol=1e-5, rtol=1e-4)


def test_prompt_length_is_capped(tiny_checkpoint):
    model = QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=8)
    embeds, mask = model.encoders.prompts.encode(["word " * 50])
    assert embeds.shape[1] == 8 and mask.all()
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=2048)


def test_packing_equals_the_pipeline():
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    ref = QwenImagePipeline._pack_latents(latents, 2, 4, 6, 8)
    assert torch.equal(packed, ref)
    assert torch.equal(unpack_latents(packed, 6, 8), latents)


def test_latents_are_normalised_like_the_edit_pipeline(model):
    from diffusers import QwenImageEditPipeline

    pipe = _pipeline(QwenImageEditPipeline, model)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    ref = pipe._encode_vae_image(image.unsqueeze(2), generator=None)[:, :, 0]
    torch.testing.assert_close(model.encoders.codec.encode(image), ref)


def _two_sample_batch():
    target = _u8([_image(10), _image(11)])
    source = _u8([_image(0), _image(12)])
    return dict(target_bchw=target, prompts=["a red square with the word “早安”", "make it blue"],
                source_bchw=source, has_source=torch.tensor([False, True]))


def test_mixed_batch_loss_equals_each_sample_alone(model):
    """T2I and TI2I samples with prompts of different lengths in one batch: each
    sample's loss is the loss it has alone (text padding, image padding, rotary)."""
    batch = _two_sample_batch()
    inputs = model.encode(**batch)
    assert inputs.text_mask_bt[0].sum() != inputs.text_mask_bt[1].sum()
    assert [len(s) for s in inputs.img_shapes] == [1, 2]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(inputs.target_bnc.shape, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                      inputs.target_mask_bn)
        for i in range(2):
            alone = model.encode(target_bchw=batch["target_bchw"][i : i + 1], prompts=batch["prompts"][i : i + 1],
                                 source_bchw=batch["source_bchw"][i : i + 1], has_source=batch["has_source"][i : i + 1])
            loss = flow_matching_loss(lambda x, s: model.denoise(x, s, alone), alone.target_bnc, noise[i : i + 1],
                                      sigmas[i : i + 1], alone.target_mask_bn)
            torch.testing.assert_close(together[i], loss[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_ragged_shapes_equal_diffusers_alone(zero_cond_t):
    """Different target and source sizes in one batch: each sample's output is what
    diffusers' own forward gives for that sample alone."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                                     zero_cond_t=zero_cond_t).eval()
    shapes = [[(1, 4, 6)], [(1, 3, 4), (1, 5, 4)]]  # a 24-token target; a 12-token target with a 20-token source
    lengths, text_lengths = [24, 32], [7, 4]
    x = torch.randn(2, 32, 16)
    text = torch.randn(2, 7, 32)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    image_mask = torch.arange(32)[None] < torch.tensor(lengths)[:, None]
    sigmas = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        out = forward_mixed(tr, hidden_states_bld=x, text_btd=text, text_mask_bt=text_mask, timestep_b=sigmas,
                            img_shapes=shapes, image_mask_bl=image_mask)
        for i in range(2):
            n, t = lengths[i], text_lengths[i]
            ref = tr(hidden_states=x[i : i + 1, :n], encoder_hidden_states=text[i : i + 1, :t],
                     encoder_hidden_states_mask=text_mask[i : i + 1, :t], timestep=sigmas[i : i + 1],
                     img_shapes=[shapes[i]]).sample
            torch.testing.assert_close(out[i, :n], ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["t2i", "ti2i", "i2i"])
def test_loss_goes_down_on_a_tiny_overfit_set(tiny_checkpoint, task):
    torch.manual_seed(0)
    model = QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=32)
    batch = _two_sample_batch()
    has_source = torch.tensor([task != "t2i"] * 2)
    if task == "i2i":
        batch["source_bchw"] = batch["target_bchw"].clone()
        batch["prompts"] = ["reconstruct the image"] * 2
    inputs = model.encode(target_bchw=batch["target_bchw"], prompts=batch["prompts"],
                          source_bchw=batch["source_bchw"], has_source=has_source)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(inputs.target_bnc.shape, generator=gen)
    sigmas = torch.tensor([0.4, 0.7])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                  inputs.target_mask_bn).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_frozen_encoders_are_not_parameters(model):
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("transformer.") for n in names)
    assert not any(p.requires_grad for p in model.encoders.text_encoder.parameters())


def test_gated_fusion_starts_as_the_ungated_model(tiny_checkpoint, model):
    gated = QwenImageModel.from_pretrained(tiny_checkpoint, edit_fusion="gated", max_sequence_length=64)
    gated.transformer.load_state_dict(model.transformer.state_dict())
    inputs = model.encode(**_two_sample_batch())
    x, sigmas = torch.randn(inputs.target_bnc.shape), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(gated.denoise(x, sigmas, inputs), model.denoise(x, sigmas, inputs))
    assert {n for n, _ in gated.named_parameters() if n.startswith("fusion.")} == {"fusion.semantic",
                                                                                  "fusion.reconstruction"}
    with pytest.raises(ValueError, match="edit_fusion"):
        QwenImageModel(model.transformer, None, edit_fusion="concat")


def test_ema_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([("w", p)], decay=0.9, warmup=False)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    ema.update([("w", p)])
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    warm = EMA([("w", p)], decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    warm.update([("w", p)])
    assert warm.current_decay() == pytest.approx(2 / 11)
    restored = EMA([("w", p)], decay=0.999)
    restored.load_state_dict(warm.state_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["w"], warm.shadow["w"])
    with pytest.raises(ValueError, match="decay"):
        EMA([("w", p)], decay=1.0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    grads = []
    for checkpointing in (False, True):
        model = QwenImageModel.from_pretrained(tiny_checkpoint, gradient_checkpointing=checkpointing,
                                               max_sequence_length=32)
        assert model.transformer.gradient_checkpointing is checkpointing
        inputs = model.encode(**_two_sample_batch())
        noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(0))
        flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise,
                           torch.tensor([0.3, 0.6]), inputs.target_mask_bn).mean().backward()
        # (the last block's text-stream MLP feeds nothing: its grads stay None)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)
