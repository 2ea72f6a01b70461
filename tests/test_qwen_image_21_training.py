"""Qwen-Image-2.1 in training (`model.family=qwen_image_21`): each sample's encoding and
forward equal `QwenImage21Pipeline`'s own for that sample alone (T2I, one and two
condition images, different prompt lengths, in one batch); the smoke experiment trains
through every stage and task, exports, and the export generates in the pipeline; a LoRA
adapter loads with the pipeline's `load_lora_weights`."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimg_train.models import get_family
from qwenimg_train.objectives.flow_matching import flow_matching_loss


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return get_family("qwen_image_21").build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-21")


@pytest.fixture(scope="module")
def model(folder):
    from qwenimg_train.models.qwen_image_21.model import QwenImage21Model, load_encoders
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    return QwenImage21Model(QwenImage21Transformer2DModel.from_pretrained(folder / "transformer"),
                            load_encoders(folder))


def _u8(seed: int, size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).permute(2, 0, 1)


def _batch():
    return dict(target_bchw=torch.stack([_u8(1), _u8(2), _u8(3)]),
                prompts=["a poster reading “春节快乐” in red", "make it blue",
                         "the title of Picture 1 in the colour of Picture 2"],
                source_bchw=torch.stack([_u8(4), _u8(5), _u8(6)]), has_source=torch.tensor([False, True, True]),
                extra_sources_bkchw=torch.stack([_u8(7), _u8(8), _u8(9)])[:, None],
                num_sources=torch.tensor([0, 1, 2]))


def test_each_sample_is_the_pipelines_own_forward(folder, model):
    """A sample's velocity is the transformer's output on what QwenImage21Pipeline builds
    for that sample alone: its encode_prompt, its VAE latents of the conditions (RGBA),
    img_shapes conditions-then-target, img_mask with the target's slots appended."""
    from diffusers import QwenImage21Pipeline

    from qwenimg_train.models.qwen_image_21.encoding import condition_image
    from qwenimg_train.models.qwen_image_21.tiny import load_processor

    pipe = QwenImage21Pipeline.from_pretrained(folder, processor=load_processor(folder))
    batch = _batch()
    inputs = model.encode(**batch)
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad():
        ours = model.denoise(noise, sigmas, inputs)
        for i, count in enumerate(batch["num_sources"].tolist()):
            sources = [batch["source_bchw"][i], *batch["extra_sources_bkchw"][i, : count - 1]][:count]
            images = [condition_image(s, 32) for s in sources]
            embeds, mask, slots = pipe.encode_prompt(prompt=batch["prompts"][i], image=images or None)
            hidden, shapes = noise[i : i + 1], []
            if images:
                vae_images = [pipe.image_processor.preprocess(im, width=32, height=32).unsqueeze(2) for im in images]
                _, conditions = pipe.prepare_latents(vae_images, 1, 16, 32, 32, torch.float32, torch.device("cpu"),
                                                     None, noise[i : i + 1])
                hidden = torch.cat([conditions, hidden], dim=1)
                shapes = [(1, 2, 2)] * len(images)
            img_mask = torch.cat([slots, slots.new_ones(1, noise.shape[1] // 4)], dim=1)
            ref = pipe.transformer(hidden_states=hidden, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                   timestep=sigmas[i : i + 1], img_shapes=[[*shapes, (1, 2, 2)]], img_mask=img_mask,
                                   return_dict=False)[0][:, -noise.shape[1]:]
            torch.testing.assert_close(ours[i], ref[0], atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_gives_each_sample_its_own_loss(model):
    batch = _batch()
    inputs = model.encode(**batch)
    assert len({t.shape[0] for t in inputs.text}) == 3  # three prompt lengths
    assert [len(s) for s in inputs.condition_shapes] == [0, 1, 2]
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        together = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                      inputs.target_mask_bn)
        for i in range(3):
            alone = model.encode(**{k: v[i : i + 1] for k, v in batch.items()})
            loss = flow_matching_loss(lambda x, s: model.denoise(x, s, alone), alone.target_bnc, noise[i : i + 1],
                                      sigmas[i : i + 1], alone.target_mask_bn)
            torch.testing.assert_close(together[i], loss[0], atol=1e-5, rtol=1e-5)


def _repeated_layouts():
    """Five samples, three layouts: two T2I with one prompt, two one-source edits with one
    prompt (different images), one T2I with another prompt."""
    return dict(target_bchw=torch.stack([_u8(i) for i in range(1, 6)]),
                prompts=["a sign reading OPEN", "make it blue", "a sign reading OPEN", "make it blue", "a cat"],
                source_bchw=torch.stack([_u8(i) for i in range(11, 16)]),
                has_source=torch.tensor([False, True, False, True, False]),
                num_sources=torch.tensor([0, 1, 0, 1, 0]))


def test_samples_of_one_layout_share_a_forward_and_keep_their_own_loss(model):
    batch = _repeated_layouts()
    inputs = model.encode(**batch)
    assert model.layout_groups(inputs) == [[0, 2], [1, 3], [4]]
    calls = []
    hook = model.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                                   with_kwargs=True)
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])  # one group, different timesteps
    try:
        with torch.no_grad():
            together = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                          inputs.target_mask_bn)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]
    with torch.no_grad():
        for i in range(5):
            alone = model.encode(**{k: v[i : i + 1] for k, v in batch.items()})
            loss = flow_matching_loss(lambda x, s: model.denoise(x, s, alone), alone.target_bnc, noise[i : i + 1],
                                      sigmas[i : i + 1], alone.target_mask_bn)
            torch.testing.assert_close(together[i], loss[0], atol=1e-5, rtol=1e-5)


def test_under_zero3_every_sample_runs_alone(folder, model, monkeypatch):
    """ZeRO-3 gathers weights with collectives in every forward, which each rank must make
    alike: with partitioned weights (`parallel.sharding.is_sharded`) the batch is not grouped."""
    from diffusers import QwenImage21Transformer2DModel

    from qwenimg_train.models.qwen_image_21.model import QwenImage21Model

    inputs = model.encode(**_repeated_layouts())
    sharded = QwenImage21Model(QwenImage21Transformer2DModel.from_pretrained(folder / "transformer"), None)
    monkeypatch.setattr("qwenimg_train.parallel.sharding.is_sharded", lambda module: module is sharded.transformer)
    assert sharded.layout_groups(inputs) == [[0], [1], [2], [3], [4]]


def test_the_flex_path_gives_the_sdpa_paths_output(folder):
    """diffusers' flex processor (one flex_attention call over the block-causal BlockMask)
    and its SDPA processor agree on a mixed batch. Uncompiled and forward only here: torch's
    flex_attention has no backward on CPU, and on CUDA the model compiles it."""
    from diffusers import QwenImage21Transformer2DModel

    from qwenimg_train.models.qwen_image_21.model import QwenImage21Model, load_encoders, use_attention

    model = QwenImage21Model(QwenImage21Transformer2DModel.from_pretrained(folder / "transformer"), load_encoders(folder),
                             attention="sdpa")
    inputs = model.encode(**_batch())
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        sdpa = model.denoise(noise, sigmas, inputs)
        assert model.attention_path == "sdpa"
        use_attention(model.transformer, "flex", torch.device("cpu"))
        flex = torch.cat([model.forward_group(noise[i : i + 1], sigmas[i : i + 1], inputs, [i]) for i in range(3)])
    torch.testing.assert_close(flex.float(), sdpa, atol=1e-5, rtol=1e-5)


def test_attention_auto_is_flex_on_cuda_and_sdpa_elsewhere(tmp_path, shard_sources):
    from conftest import compose_debug
    from qwenimg_train.config.schema import TrainConfig
    from qwenimg_train.models.qwen_image_21.model import attention_path_for, flex_available

    assert flex_available()
    assert attention_path_for("auto", torch.device("cpu")) == "sdpa"
    assert attention_path_for("auto", torch.device("cuda")) == "flex"
    assert attention_path_for("sdpa", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="CUDA only"):
        attention_path_for("flex", torch.device("cpu"))
    with pytest.raises(ValueError, match="model.attention = 'flex'; model.family=qwen_image has auto, sdpa"):
        TrainConfig.from_mapping(compose_debug(shard_sources, "model.attention=flex", out=tmp_path / "t",
                                               models=tmp_path / "m"))
    cfg = TrainConfig.from_mapping(compose_debug(shard_sources, "model=tiny_21", "model.attention=flex",
                                                 out=tmp_path / "t", models=tmp_path / "m"))
    assert cfg.model.options()["attention"] == "flex"


def test_sides_must_be_multiples_of_32(model):
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode(target_bchw=torch.stack([_u8(1, 48)]), prompts=["x"])


def test_the_smoke_experiment_trains_exports_and_generates(tmp_path, shard_sources):
    from diffusers import QwenImage21Pipeline

    from conftest import STAGES, compose_debug
    from qwenimg_train.export.to_diffusers import ExportJob, export
    from qwenimg_train.training.train import train

    ocr = ("callbacks.ocr_eval={every_n_steps: null, stage_end: true, suites: [en_word, edit_zh], limit: 1, "
           "resolution: 32, steps: 2, guidance: 1.0, seed: 0, edit_source_area: 1024}")
    summary = train(compose_debug(shard_sources, "model=tiny_21", ocr, out=tmp_path / "train", models=tmp_path / "m"))
    assert list(summary["stages"]) == list(STAGES)
    assert all(set(s["loss_by_task"]) == {"t2i", "ti2i", "i2i"} for s in summary["stages"].values())
    assert [e["step"] for e in summary["ocr_eval"]] == [3, 6, 9]
    out = export(ExportJob(checkpoint=str(tmp_path / "train" / "checkpoints" / "last.ckpt"), out_dir=str(tmp_path / "x")))
    pipe = QwenImage21Pipeline.from_pretrained(out, processor=get_family("qwen_image_21").load_processor(out))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a sign", image=[Image.new("RGB", (32, 32), "blue")], height=32, width=32,
                 num_inference_steps=2, output_type="np").images
    assert image.shape[:3] == (1, 32, 32) and np.isfinite(image).all()


def test_a_lora_adapter_loads_with_load_lora_weights(tmp_path, shard_sources):
    from diffusers import QwenImage21Pipeline

    from conftest import compose_debug
    from qwenimg_train.export.to_diffusers import ExportJob, export
    from qwenimg_train.training.train import train

    cfg = compose_debug(shard_sources, "model=tiny_21",
                        "model.lora={rank: 4, alpha: 4, target_modules: [to_q, to_k, to_v, to_out.0, img_mlp.proj]}",
                        out=tmp_path / "train", models=tmp_path / "m")
    train(cfg)
    adapter = export(ExportJob(checkpoint=str(tmp_path / "train" / "checkpoints" / "last.ckpt"),
                               out_dir=str(tmp_path / "adapter")))
    base = tmp_path / "m" / "tiny-21"
    pipe = QwenImage21Pipeline.from_pretrained(base, processor=get_family("qwen_image_21").load_processor(base))
    pipe.load_lora_weights(adapter)
    assert pipe.transformer.peft_config


def test_qwenimg_sample_draws_t2i_and_edits(folder, tmp_path):
    from qwenimg_train.tools.sample import SampleJob, sample

    source = tmp_path / "source.png"
    Image.new("RGB", (32, 32), "red").save(source)
    result = sample(SampleJob(checkpoint_dir=str(folder), out_dir=str(tmp_path / "out"), prompts=["a sign", "make it blue"],
                              source_images=[None, str(source)], steps=2, resolution=32, guidance=1.0, progress=False))
    assert [r["task"] for r in result["samples"]] == ["t2i", "edit"] and all(r["finite"] for r in result["samples"])


@pytest.mark.parametrize("base_dtype", ("bfloat16", "int8", "float8", "nf4"))
def test_lora_on_a_quantized_21_base_trains_the_adapter_only(folder, model, base_dtype):
    """model.base_dtype with Qwen-Image-2.1: every Linear of the base stored quantized
    (torchao int8 / float8, bitsandbytes nf4), only the fp32 adapter trains, its loss falls
    on one batch and the base does not move."""
    from qwenimg_train.config.schema import ModelConfig
    from qwenimg_train.models.lora import LoraSettings, is_lora_key
    from qwenimg_train.parallel.sharding import load_transformer as sharded_load

    targets = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]
    cfg = ModelConfig(pretrained_path=str(folder), family="qwen_image_21", base_dtype=base_dtype,
                      lora=LoraSettings(rank=4, alpha=4, target_modules=targets))
    torch.manual_seed(0)
    quantized = get_family("qwen_image_21").build_model(folder, None, options=cfg.options(), load_transformer=sharded_load)
    weights = {"bfloat16": "Tensor", "int8": "Int8Tensor", "float8": "Float8Tensor", "nf4": "Params4bit"}[base_dtype]
    wrapped = [m.base_layer for m in quantized.transformer.modules() if hasattr(m, "base_layer")]
    assert len(wrapped) == 7 * len(quantized.transformer.transformer_blocks)
    assert all(type(m.weight).__name__ == weights or type(m.weight.data).__name__ == weights for m in wrapped)
    trainable = {n: p for n, p in quantized.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n) and p.dtype == torch.float32 for n, p in trainable.items())
    before = {k: v.clone() for k, v in quantized.transformer.state_dict().items()
              if not is_lora_key(k) and type(v) is torch.Tensor}
    inputs = model.encode(**_batch())
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.5, 0.7])
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-2)
    losses = []
    for _ in range(12):  # one batch, over and over: the adapter fits it
        loss = flow_matching_loss(lambda x, s: quantized.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                  inputs.target_mask_bn).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = quantized.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
