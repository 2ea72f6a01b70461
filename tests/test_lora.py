"""LoRA and full fine-tuning from a diffusers folder: only the adapter trains; the
finetune experiments run on the real configs (pointed at the tiny folder); the adapter
export loads with diffusers' `load_lora_weights`; the merged export equals base + adapter."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qwenimg_train.export.to_diffusers import ExportJob, export
from qwenimg_train.models.lora import DEFAULT_TARGET_MODULES, LoraSettings, apply_lora, is_lora_key, to_diffusers_names
from qwenimg_train.models.qwen_image.model import QwenImageModel, load_transformer
from qwenimg_train.objectives.flow_matching import flow_matching_loss
from qwenimg_train.config.schema import ModelConfig
from qwenimg_train.training.train import config_dir, train
from qwenimg_train.models.qwen_image.transformer import (DISCARDED_TEXT_STREAM, MixedBatchAttnProcessor,
                                                         discarded_text_stream_names)

RANK, ALPHA = 4, 8  # alpha != rank: the LoRA file's metadata must carry the scale (2)
PREFIX = "model.transformer."


def _config(out: Path, folder: Path, sources: dict, experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[
            f"experiment={experiment}", f"model.pretrained_path={folder}", f"paths.output_dir={out}",
            "trainer.max_steps=4", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.shuffle_buffer=8",
            "model.max_sequence_length=32", "curriculum.stages.all.resolution=32",
            "callbacks.checkpoint.every_n_train_steps=2", "logger=csv", "callbacks.ocr_eval=null",
            *[f"+data.sources.{k}={v}" for k, v in sources.items()], *overrides,  # configs/data names none
        ])


def _u8_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    return dict(target_bchw=images, prompts=["a sign reading “早安”", "make it blue"],
                source_bchw=images.flip(0), has_source=torch.tensor([False, True]))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_settings_are_validated(tiny_checkpoint):
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        LoraSettings(target_modules="to_q")
    with pytest.raises(ValueError, match="model.lora"):
        ModelConfig(pretrained_path="x", lora=True)
    with pytest.raises(ValueError, match="'to_qq' names no linear layer"):
        apply_lora(load_transformer(tiny_checkpoint), LoraSettings(target_modules=["to_q", "to_qq"]))


def test_only_the_adapter_trains(tiny_checkpoint):
    from peft.utils import get_peft_model_state_dict
    from torch import nn

    torch.manual_seed(0)
    base = QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=32)
    lora = QwenImageModel(load_transformer(tiny_checkpoint), base.encoders, gradient_checkpointing=True,
                          lora=LoraSettings(rank=RANK, alpha=ALPHA))
    adapter = {n: p for n, p in lora.named_parameters() if is_lora_key(n)}
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n) for n in trainable)
    # the adapters of the last block's discarded text stream are frozen: their output is unused
    discarded = {"transformer." + n for n in discarded_text_stream_names(lora.transformer)}
    assert set(adapter) - set(trainable) == {n for n in discarded if is_lora_key(n)}
    assert all(p.dtype == torch.float32 for p in adapter.values())
    # rank·(in + out) for each of the 12 targeted layers of each block
    targets = [m for n, m in base.transformer.named_modules()
               if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in DEFAULT_TARGET_MODULES)]
    assert len(targets) == 12 * len(base.transformer.transformer_blocks)
    assert sum(p.numel() for p in adapter.values()) == sum(RANK * (m.in_features + m.out_features) for m in targets)
    # diffusers' processors survive the wrapping
    assert all(isinstance(p, MixedBatchAttnProcessor) for p in lora.transformer.attn_processors.values())
    # the LoRA file's names are peft's own (get_peft_model_state_dict, as diffusers' training scripts save)
    assert set(to_diffusers_names({n[len("transformer."):]: p for n, p in adapter.items()})) == set(
        get_peft_model_state_dict(lora.transformer))

    inputs = base.encode(**_u8_batch())
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.7])
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        torch.testing.assert_close(lora.denoise(noise, sigmas, inputs), base.denoise(noise, sigmas, inputs))
    flow_matching_loss(lambda x, s: lora.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                       inputs.target_mask_bn).mean().backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    # through gradient checkpointing, to the adapter only, and to every trainable tensor (plain DDP)
    assert with_grad == set(trainable)
    assert any(trainable[n].grad.abs().sum() > 0 for n in with_grad if ".lora_B." in n)


def test_a_lora_base_is_stored_in_bf16_and_the_adapter_in_fp32(tiny_checkpoint):
    """model.base_dtype (default bfloat16 with LoRA): the frozen transformer in bf16, half of
    fp32's bytes; the adapter trains in fp32. Full fine-tuning refuses a low-precision base."""
    from qwenimg_train.models import get_family
    from qwenimg_train.parallel.sharding import load_transformer as sharded_load

    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    cfg = ModelConfig(pretrained_path=str(tiny_checkpoint), lora=settings)
    assert cfg.frozen_base_dtype == "bfloat16"
    assert ModelConfig(pretrained_path=str(tiny_checkpoint)).frozen_base_dtype == "float32"
    with pytest.raises(ValueError, match="needs model.lora"):
        ModelConfig(pretrained_path=str(tiny_checkpoint), base_dtype="bfloat16")
    with pytest.raises(ValueError, match="base_dtype"):
        ModelConfig(pretrained_path=str(tiny_checkpoint), lora=settings, base_dtype="int3")

    base = QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=32)
    model = get_family("qwen_image").build_model(tiny_checkpoint, base.encoders, options=cfg.options(),
                                                  load_transformer=sharded_load)
    frozen = [p for p in model.transformer.parameters() if not p.requires_grad]
    trainable = [p for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert {p.dtype for n, p in model.transformer.named_parameters() if not is_lora_key(n)} == {torch.bfloat16}
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert sum(p.numel() * p.element_size() for p in frozen if p.dtype == torch.bfloat16) * 2 == sum(
        p.numel() * 4 for p in frozen if p.dtype == torch.bfloat16)
    inputs = base.encode(**_u8_batch())
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(1))
    loss = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise,
                              torch.tensor([0.3, 0.7]), inputs.target_mask_bn).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None for p in frozen)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shard_sources, tiny_checkpoint):
    root = tmp_path_factory.mktemp("lora")
    cfg = _config(root / "train", tiny_checkpoint, shard_sources, "finetune_lora", "optim.lr=1e-2",
                  "optim.warmup_steps=0", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}")
    return root, cfg, train(cfg)


def len_blocks(ckpt) -> int:
    """The last block's index in a checkpoint's transformer."""
    return max(int(k.split("transformer_blocks.")[1].split(".")[0]) for k in ckpt["state_dict"]
               if "transformer_blocks." in k)


def test_lora_run_checkpoints_hold_the_adapter_only(lora_run, tiny_checkpoint):
    root, _, summary = lora_run
    assert summary["global_step"] == 4 and list(summary["stages"]) == ["all"]
    ckpt = _load(root / "train" / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    assert state and all(k.startswith(PREFIX) and is_lora_key(k) for k in state)
    # the EMA and AdamW hold the trained tensors; the checkpoint also the frozen adapter
    # tensors of the last block's discarded text stream (lora_B stays 0 there)
    discarded = {k for k in state if any(f".{len_blocks(ckpt)}.{m}." in k for m in DISCARDED_TEXT_STREAM)}
    assert discarded and all(v.abs().max() == 0 for k, v in state.items() if k in discarded and ".lora_B." in k)
    assert set(ckpt["callbacks"]["ema"]["shadow"]) == set(state) - discarded
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(state) - len(discarded)  # AdamW: the trained adapter
    assert ckpt["qwenimg_config"]["model"]["lora"]["rank"] == RANK
    trained_b = [v for k, v in state.items() if ".lora_B." in k]
    assert any(v.abs().max() > 0 for v in trained_b)  # B left zero: the adapter trained


def test_lora_run_resumes(lora_run, shard_sources, tiny_checkpoint):
    root, _, _ = lora_run
    cfg = _config(root / "train", tiny_checkpoint, shard_sources, "finetune_lora", "optim.lr=1e-2",
                  "optim.warmup_steps=0", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
                  "trainer.max_steps=6", "ckpt_path=last")
    assert train(cfg)["global_step"] == 6  # the frozen base weights absent from the checkpoint are filled in


def _sample(pipe):
    return pipe(prompt="a sign reading “你好”", height=32, width=32, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_adapter_export_loads_with_load_lora_weights(lora_run, tiny_checkpoint):
    from diffusers import QwenImagePipeline
    from safetensors.torch import load_file

    root, _, _ = lora_run
    ckpt_path = root / "train" / "checkpoints" / "step000004.ckpt"
    out = export(ExportJob(checkpoint=str(ckpt_path), out_dir=str(root / "adapter")))  # lora=auto, weights=ema
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors", "qwenimg_export.json"]
    record = json.loads((out / "qwenimg_export.json").read_text())
    assert record["lora"] == "adapter" and record["lora_settings"]["rank"] == RANK
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in saved

    ckpt = _load(ckpt_path)
    # the EMA's tensors, and the raw frozen ones of the last block's discarded text stream
    ema = {**ckpt["state_dict"], **ckpt["callbacks"]["ema"]["shadow"]}
    pipe = QwenImagePipeline.from_pretrained(tiny_checkpoint)
    before = _sample(pipe)
    pipe.load_lora_weights(out)
    (name,) = pipe.transformer.peft_config
    loaded = {k.replace(f".{name}.", ".default."): v for k, v in pipe.transformer.state_dict().items()
              if is_lora_key(k)}
    assert set(loaded) == {k[len(PREFIX):] for k in ema}
    for key, tensor in ema.items():
        assert torch.equal(loaded[key[len(PREFIX):]], tensor), key
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling[name] == ALPHA / RANK
    after = _sample(pipe)
    assert (after - before).abs().max() > 1e-3  # the trained adapter changes the output

    raw = export(ExportJob(checkpoint=str(ckpt_path), out_dir=str(root / "adapter-raw"), weights="raw",
                           lora="adapter", dtype="bfloat16"))
    raw_saved = load_file(raw / "pytorch_lora_weights.safetensors")
    state = _load(ckpt_path)["state_dict"]
    assert set(raw_saved) == {"transformer." + k for k in to_diffusers_names({k[len(PREFIX):]: v
                                                                              for k, v in state.items()})}
    assert all(v.dtype == torch.bfloat16 for v in raw_saved.values())


def test_merged_export_equals_base_plus_adapter(lora_run, tiny_checkpoint):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    root, _, _ = lora_run
    ckpt_path = root / "train" / "checkpoints" / "step000004.ckpt"
    merged_dir = export(ExportJob(checkpoint=str(ckpt_path), out_dir=str(root / "merged"), lora="merged"))
    adapter_dir = export(ExportJob(checkpoint=str(ckpt_path), out_dir=str(root / "adapter-m"), lora="adapter"))
    assert json.loads((merged_dir / "qwenimg_export.json").read_text())["lora"] == "merged"

    # weights: W + (alpha / rank)·B·A on every targeted layer, every other tensor the base's
    ckpt = _load(ckpt_path)
    ema = {**ckpt["state_dict"], **ckpt["callbacks"]["ema"]["shadow"]}  # + the frozen adapter tensors
    merged = QwenImageTransformer2DModel.from_pretrained(merged_dir / "transformer").state_dict()
    base = QwenImageTransformer2DModel.from_pretrained(Path(tiny_checkpoint) / "transformer").state_dict()
    assert set(merged) == set(base)
    folded = 0
    for name, w in base.items():
        layer, kind = name.rsplit(".", 1)
        a = ema.get(f"{PREFIX}{layer}.lora_A.default.weight")
        if a is not None and kind == "weight":
            w = w + (ALPHA / RANK) * ema[f"{PREFIX}{layer}.lora_B.default.weight"] @ a
            folded += 1
        torch.testing.assert_close(merged[name], w, atol=1e-6, rtol=1e-6)
    assert folded == 12 * 2

    # forward: the merged folder's transformer = the base folder with the adapter loaded by diffusers
    with_adapter = QwenImagePipeline.from_pretrained(tiny_checkpoint)
    with_adapter.load_lora_weights(adapter_dir)
    merged_pipe = QwenImagePipeline.from_pretrained(merged_dir)
    g = torch.Generator().manual_seed(2)
    kwargs = dict(hidden_states=torch.randn(1, 12, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32,
                  generator=g), encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.6]),
                  img_shapes=[[(1, 3, 4)]])
    with torch.no_grad():
        ref = with_adapter.transformer(**kwargs).sample
        torch.testing.assert_close(merged_pipe.transformer(**kwargs).sample, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_sample(merged_pipe), _sample(with_adapter), atol=1e-4, rtol=1e-4)


def test_lora_export_modes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lora"):
        ExportJob(checkpoint="x", out_dir="y", lora="both")
    full = tmp_path / "full.ckpt"
    torch.save({"qwenimg_config": {"model": {"pretrained_path": "unused", "lora": None}}, "state_dict": {}}, full)
    with pytest.raises(ValueError, match="trained without LoRA"):
        export(ExportJob(checkpoint=str(full), out_dir=str(tmp_path / "x"), lora="merged"))


def test_edit_lora_trains_on_edit_pairs(tmp_path, shard_sources, tiny_checkpoint):
    summary = train(_config(tmp_path / "train", tiny_checkpoint, shard_sources, "finetune_edit_lora",
                            "trainer.max_steps=2", f"model.lora.rank={RANK}"))
    by_task = summary["stages"]["all"]["samples_by_task"]
    assert by_task.get("ti2i", 0) > 0 and by_task.get("i2i", 0) > 0, by_task
    state = _load(tmp_path / "train" / "checkpoints" / "last.ckpt")["state_dict"]
    assert state and all(is_lora_key(k) for k in state)


def test_full_finetune_of_the_edit_model_starts_from_the_folder(tmp_path, shard_sources, tiny_checkpoint):
    from diffusers import QwenImageTransformer2DModel

    summary = train(_config(tmp_path / "train", tiny_checkpoint, shard_sources, "finetune_full",
                            "model=qwen_image_edit", "trainer.max_steps=2",
                            "curriculum.stages.all.task_mix={t2i: 0.5, ti2i: 0.5, i2i: 0.0}"))
    assert summary["stages"]["all"]["samples_by_task"].get("ti2i", 0) > 0
    state = _load(tmp_path / "train" / "checkpoints" / "last.ckpt")["state_dict"]
    transformer = QwenImageTransformer2DModel.from_pretrained(Path(tiny_checkpoint) / "transformer")
    base, discarded = transformer.state_dict(), set(discarded_text_stream_names(transformer))
    # every weight trains (and is saved) but the last block's discarded text stream, frozen
    assert discarded and set(state) == {PREFIX + k for k in base if k not in discarded}
    # two steps at lr 1e-5 (warm-up 2/20 and 1/20 of it) move the folder's weights by ~1e-6, not to a fresh init
    diffs = [(state[PREFIX + k] - v).abs().max().item() for k, v in base.items() if k not in discarded]
    assert 0 < max(diffs) < 1e-4, max(diffs)


@pytest.mark.parametrize("experiment", ["finetune_full", "finetune_lora", "finetune_edit_lora", "finetune_edit_plus_lora",
                                        "finetune_21_lora", "finetune_21_full"])
def test_released_experiments_require_a_folder(experiment):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    assert OmegaConf.is_missing(cfg.model, "pretrained_path")
    assert cfg.model.build_tiny is False and cfg.optim.schedule == "constant"
    assert (cfg.model.lora is None) == experiment.endswith("_full")
    families = {"finetune_edit_plus_lora": "qwen_image_edit_plus", "finetune_21_lora": "qwen_image_21",
                "finetune_21_full": "qwen_image_21"}
    assert cfg.model.family == families.get(experiment, "qwen_image")
