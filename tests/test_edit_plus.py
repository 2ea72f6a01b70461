"""The multi-image edit family (Qwen-Image-Edit-2509 / 2511, `model.family=qwen_image_edit_plus`)
against diffusers' `QwenImageEditPlusPipeline`: prompt and condition encoding for one, two
and three sources, source latents, a mixed batch of one-, two- and three-source edits and
T2I giving each sample its own loss, and the tiny folder loading and generating in the
pipeline unchanged."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimg_train.models import get_family
from qwenimg_train.models.qwen_image.encoding import condition_image, pack_latents
from qwenimg_train.models.qwen_image.model import QwenImageModel, load_transformer
from qwenimg_train.objectives.flow_matching import flow_matching_loss


@pytest.fixture(scope="module")
def plus_checkpoint(tmp_path_factory):
    return get_family("qwen_image_edit_plus").build_tiny(tmp_path_factory.mktemp("tiny") / "edit-plus")


@pytest.fixture(scope="module")
def model(plus_checkpoint):
    family = get_family("qwen_image_edit_plus")
    encoders = family.load_encoders(plus_checkpoint, dtype="float32", max_sequence_length=1024)
    return QwenImageModel(load_transformer(plus_checkpoint), encoders)


@pytest.fixture(scope="module")
def pipe(plus_checkpoint, model):
    from diffusers import QwenImageEditPlusPipeline

    enc = model.encoders
    return QwenImageEditPlusPipeline(scheduler=_scheduler(plus_checkpoint), vae=enc.vae,
                                     text_encoder=enc.text_encoder, tokenizer=enc.tokenizer,
                                     processor=enc.processor, transformer=model.transformer)


def _scheduler(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")


def _u8(seed: int, size=(32, 32)) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).permute(2, 0, 1)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_the_family_is_selected_by_config(plus_checkpoint):
    from qwenimg_train.config.schema import ModelConfig

    cfg = ModelConfig(pretrained_path=str(plus_checkpoint), family="qwen_image_edit_plus")
    assert cfg.pipeline_class == "QwenImageEditPlusPipeline"
    with pytest.raises(ValueError, match="QwenImageEditPlusPipeline"):
        ModelConfig(pretrained_path="x", family="qwen_image_edit_plus", pipeline_class="QwenImageEditPipeline")
    family = get_family("qwen_image_edit_plus")
    assert family.max_sources == 3 and get_family("qwen_image").max_sources == 1
    assert family.prompt_fingerprint() != get_family("qwen_image").prompt_fingerprint()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_prompt_encoding_equals_the_pipeline(model, pipe, count):
    """"Picture N:" per source, each source at about 384² through Qwen2.5-VL, the
    system prefix dropped: `QwenImageEditPlusPipeline.encode_prompt`, to the bit."""
    sources = [_u8(s, size) for s, size in zip((1, 2, 3), ((32, 32), (48, 32), (32, 64)))][:count]
    prompt = "把图1的标题换成图2中的文字" if count > 1 else "make the title red"
    ref, ref_mask = pipe.encode_prompt(prompt, image=[condition_image(_pil(s)) for s in sources],
                                       max_sequence_length=1024)
    ours, mask = model.encoders.prompts.encode([prompt], [sources])
    assert ref_mask is None and bool(mask.all())  # one prompt: no padding
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_source_latents_equal_the_pipeline(model, pipe):
    """Every source's VAE latents, packed, follow the target's as the pipeline lays them out."""
    images = [_u8(s) for s in (4, 5)]
    processed = [pipe.image_processor.preprocess(_pil(im), 32, 32).unsqueeze(2) for im in images]
    _, ref = pipe.prepare_latents(processed, 1, 4, 32, 32, torch.float32, torch.device("cpu"),
                                  torch.Generator().manual_seed(0), None)
    ours = torch.cat([pack_latents(model.encoders.codec.encode(p[:, :, 0])) for p in processed], dim=1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_a_mixed_batch_gives_each_sample_its_own_loss(model):
    """T2I, a one-source, a two-source and a three-source edit, prompts of different
    lengths, in one batch: each sample's loss is the loss it has alone (to 1e-5)."""
    targets = torch.stack([_u8(10 + i) for i in range(4)])
    first = torch.stack([_u8(20 + i) for i in range(4)])
    extra = torch.stack([torch.stack([_u8(30 + i), _u8(40 + i)]) for i in range(4)])
    batch = dict(target_bchw=targets, prompts=["a sign reading “早安”", "make it blue",
                                                "the title of Picture 1 replaced by the text in Picture 2",
                                                "图1的文字，用图2的颜色和图3的字体"],
                 source_bchw=first, has_source=torch.tensor([False, True, True, True]),
                 extra_sources_bkchw=extra, num_sources=torch.tensor([0, 1, 2, 3]))
    inputs = model.encode(**batch)
    assert [len(s) for s in inputs.img_shapes] == [1, 2, 3, 4]
    assert len(set(inputs.text_mask_bt.sum(1).tolist())) == 4
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    with torch.no_grad():
        together = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                      inputs.target_mask_bn)
        for i in range(4):
            part = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in batch.items()}
            alone = model.encode(**part)
            loss = flow_matching_loss(lambda x, s: model.denoise(x, s, alone), alone.target_bnc, noise[i : i + 1],
                                      sigmas[i : i + 1], alone.target_mask_bn)
            torch.testing.assert_close(together[i], loss[0], atol=1e-5, rtol=1e-5)


def test_the_single_source_family_refuses_a_multi_image_batch(tiny_checkpoint):
    model = QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=64)
    with pytest.raises(ValueError, match="qwen_image_edit_plus"):
        model.encode(target_bchw=torch.stack([_u8(1)]), prompts=["x"], source_bchw=torch.stack([_u8(2)]),
                     has_source=torch.tensor([True]), extra_sources_bkchw=torch.stack([_u8(3)])[None],
                     num_sources=torch.tensor([2]))


def test_the_tiny_folder_generates_in_the_pipeline_with_three_sources(plus_checkpoint):
    from diffusers import QwenImageEditPlusPipeline

    from qwenimg_train.compat import edit_source_area

    pipe = QwenImageEditPlusPipeline.from_pretrained(
        plus_checkpoint, processor=get_family("qwen_image_edit_plus").load_processor(plus_checkpoint))
    pipe.set_progress_bar_config(disable=True)
    sources = [_pil(_u8(s)) for s in (1, 2, 3)]
    with edit_source_area(32 * 32):
        image = pipe(image=sources, prompt="图1的文字，用图2的颜色和图3的字体", height=32, width=32,
                     num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.fixture(scope="module")
def plus_run(tmp_path_factory, shard_sources):
    """The smoke experiment (configs/debug) with the multi-image family, through every
    stage and task, the OCR callback drawing edits through QwenImageEditPlusPipeline."""
    from conftest import compose_debug
    from qwenimg_train.training.train import train

    root = tmp_path_factory.mktemp("plus-run")
    ocr = ("callbacks.ocr_eval={every_n_steps: null, stage_end: true, suites: [en_word, edit_zh], limit: 1, "
           "resolution: 32, steps: 2, guidance: 1.0, seed: 0, edit_source_area: 1024}")
    cfg = compose_debug(shard_sources, "model=tiny_edit_plus", ocr, out=root / "train", models=root / "models")
    return root, train(cfg)


def test_the_smoke_experiment_trains_exports_and_loads_in_the_pipeline(plus_run):
    from diffusers import QwenImageEditPlusPipeline

    from conftest import STAGES
    from qwenimg_train.export.to_diffusers import ExportJob, export

    root, summary = plus_run
    assert list(summary["stages"]) == list(STAGES)
    assert all(set(s["loss_by_task"]) == {"t2i", "ti2i", "i2i"} for s in summary["stages"].values())
    assert [e["step"] for e in summary["ocr_eval"]] == [3, 6, 9]
    out = export(ExportJob(checkpoint=str(root / "train" / "checkpoints" / "last.ckpt"), out_dir=str(root / "export")))
    pipe = QwenImageEditPlusPipeline.from_pretrained(
        out, processor=get_family("qwen_image_edit_plus").load_processor(out))
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"


def test_a_lora_adapter_loads_with_load_lora_weights(tmp_path, shard_sources):
    from diffusers import QwenImageEditPlusPipeline

    from conftest import compose_debug
    from qwenimg_train.export.to_diffusers import ExportJob, export
    from qwenimg_train.training.train import train

    cfg = compose_debug(shard_sources, "model=tiny_edit_plus", "model.lora={rank:4,alpha:4}", "optim.lr=1e-2",
                        out=tmp_path / "train", models=tmp_path / "models")
    train(cfg)
    adapter = export(ExportJob(checkpoint=str(tmp_path / "train" / "checkpoints" / "last.ckpt"),
                               out_dir=str(tmp_path / "adapter")))
    base = tmp_path / "models" / "tiny-edit-plus"
    pipe = QwenImageEditPlusPipeline.from_pretrained(base, processor=get_family("qwen_image_edit_plus").load_processor(base))
    pipe.load_lora_weights(adapter)
    assert pipe.transformer.peft_config


def _multi_source_shards(folder, shard_sources, bad: bool = True):
    """A copy of the edit shards where each pair carries 1, 2 or 3 sources in turn
    (src2 / src3 members, extra.edit.num_sources), and (`bad`) one pair claims 2 but lacks src2."""
    import json

    from data_pipelines.core.shards import AtomicShardWriter, iter_tar_samples
    from qwenimg_train.data.loader import SourceShards

    src = SourceShards.from_folder("edit", shard_sources["edit"])
    folder.mkdir()
    counts = []
    for url in src.urls:
        name = url.rsplit("/", 1)[1]
        writer = AtomicShardWriter(folder / name)
        for j, sample in enumerate(iter_tar_samples(url)):
            fields = {k: v for k, v in sample.items() if k != "__key__"}
            meta = json.loads(fields["json"])
            n = 1 + j % 3
            ext = "jpg" if "jpg" in fields else "png"
            for k in range(2, n + 1):
                fields[f"src{k}.{ext}"] = fields[ext]  # any same-size picture will do
            if bad and j == 4:  # claims two sources, holds one: a counted skip
                fields.pop(f"src2.{ext}")
            meta.setdefault("extra", {}).setdefault("edit", {})["num_sources"] = n
            fields["json"] = json.dumps(meta).encode()
            writer.write(sample["__key__"], fields)
            counts.append(n)
        writer.commit()
    (folder / "manifest.json").write_text(json.dumps(src.manifest))
    return SourceShards.from_folder("edit", folder), counts


def test_the_loader_mixes_one_two_and_three_source_edits(tmp_path, shard_sources):
    import itertools

    from qwenimg_train.data.curriculum import Stage
    from qwenimg_train.data.loader import SourceShards, StageStream

    edit, counts = _multi_source_shards(tmp_path / "edit", shard_sources)
    assert set(counts) == {1, 2, 3}
    sources = {"edit": edit, "design": SourceShards.from_folder("design", shard_sources["design"])}
    stage = Stage(name="s", fraction=1.0, resolution=32, text_classes=["none", "simple", "complex"],
                  source_weights={"design": 1.0}, task_mix={"t2i": 0.25, "ti2i": 0.5, "i2i": 0.25}, caption_dropout=0.0)
    stream = StageStream(stage=stage, stage_index=0, sources=sources, batch_size=8, seed=3, max_sources=3,
                         max_skip_fraction=0.5)
    batches = list(itertools.islice(iter(stream), 6))
    seen = set()
    for batch in batches:
        if batch.num_sources is None:
            continue
        assert batch.extra_sources_bkchw.shape[:2] == (8, int(batch.num_sources.max()) - 1)
        assert torch.equal(batch.num_sources > 0, batch.has_source)
        for i, n in enumerate(batch.num_sources.tolist()):
            seen.add(n)
            # a sample's missing extra sources are zeros; present ones are its pictures
            assert all(bool(batch.extra_sources_bkchw[i, k].any()) == (k < n - 1)
                       for k in range(batch.extra_sources_bkchw.shape[1]))
    assert {0, 1, 2, 3} <= seen  # T2I and 1-, 2- and 3-source edits share batches
    assert batches[-1].skipped.get("missing_member", 0) >= 1
    # a single-source family filters the multi-source pairs out (no skip: they are not bad input)
    single = StageStream(stage=stage, stage_index=0, sources=sources, batch_size=8, seed=3, max_sources=1)
    got = list(itertools.islice(iter(single), 4))
    assert all(b.num_sources is None for b in got) and any(b.has_source.any() for b in got)
