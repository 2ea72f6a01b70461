"""Each model family end to end: a tiny model memorises two prompt -> image pairs through
`qwenimg-train` (the real configs), is exported, and sampled with the family's own
diffusers pipeline lands on its own target, far closer than to the other one.

The tiny models' VAEs are random, so images are compared as the pipeline's output
latents (`output_type="latent"`) against the targets' VAE latents: pixels decoded by a
random VAE barely differ between a black and a white target."""

import io
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from data_pipelines.core.shards import AtomicShardWriter
from qwenimg_train.eval.pipeline import load_pipelines
from qwenimg_train.export.to_diffusers import ExportJob, export
from qwenimg_train.training.train import config_dir, train

pytestmark = pytest.mark.slow

PROMPTS = ["a black square", "一张白色的海报"]
TARGETS = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]
STEPS = {"tiny_edit_plus": 1000, "tiny_21": 400}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _shards(folder) -> None:
    folder.mkdir()
    writer = AtomicShardWriter(folder / "design-000000.tar")
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        meta = {"schema_version": 1, "key": f"m{i}", "source": "design", "width": 32, "height": 32,
                "text_class": "none", "languages": [], "lines": []}
        writer.write(f"m{i}", {"png": _png(target), "txt": prompt.encode(), "json": json.dumps(meta).encode()})
    writer.commit()
    (folder / "manifest.json").write_text(json.dumps({
        "source": "design", "num_samples": 2, "num_shards": 1, "counts": {"text_class": {"none": 2}},
        "shards": [{"file": "design-000000.tar", "num_samples": 2}]}))


def _target_latents(model: str, vae) -> list[torch.Tensor]:
    images = [torch.from_numpy(t).permute(2, 0, 1)[None] for t in TARGETS]
    with torch.no_grad():
        if model == "tiny_21":
            from qwenimg_train.models.qwen_image_21.model import LatentCodec21, flatten_latents, opaque_rgba

            codec = LatentCodec21(vae)
            return [flatten_latents(codec.encode(opaque_rgba(im)))[0] for im in images]
        from qwenimg_train.models.qwen_image.encoding import LatentCodec, pack_latents

        codec = LatentCodec(vae)
        return [pack_latents(codec.encode(im.float() / 127.5 - 1))[0] for im in images]


@pytest.mark.parametrize("model", sorted(STEPS))
def test_a_tiny_model_memorises_two_pairs_and_its_pipeline_draws_them(model, tmp_path):
    _shards(tmp_path / "design")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={model}", f"paths.models_dir={tmp_path}/models", f"paths.output_dir={tmp_path}/train",
            "curriculum=single_stage", "curriculum.stages.all.resolution=32", "curriculum.stages.all.caption_dropout=0.0",
            "curriculum.stages.all.task_mix={t2i: 1.0, ti2i: 0.0, i2i: 0.0}", "curriculum.stages.all.text_classes=[none]",
            "curriculum.stages.all.source_weights={design: 1.0, synthetic: 0.0, natural: 0.0}",
            f"+data.sources.design={tmp_path / 'design'}", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=2", f"trainer.max_steps={STEPS[model]}", "trainer.enable_progress_bar=false",
            "optim.lr=3e-3", "optim.warmup_steps=10", "optim.schedule=constant", "logger=csv",
            "callbacks.ocr_eval=null", "callbacks.ema=null", "model.max_sequence_length=64"])
    train(cfg)
    out = export(ExportJob(checkpoint=str(tmp_path / "train" / "checkpoints" / "last.ckpt"),
                           out_dir=str(tmp_path / "export"), weights="raw"))
    pipe, _ = load_pipelines(out, edit=False)  # QwenImagePipeline / QwenImage21Pipeline
    targets = _target_latents(model, pipe.vae)
    for i, prompt in enumerate(PROMPTS):
        drawn = pipe(prompt=prompt, height=32, width=32, num_inference_steps=20, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images[0].float()
        own, other = [float((drawn.reshape(t.shape) - t).abs().mean()) for t in (targets[i], targets[1 - i])]
        assert own < 0.6 * other, (prompt, own, other)
