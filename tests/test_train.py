"""`qwenimg-train` on the real configs: a short run through all stages and tasks, its
checkpoints, resume, export to a diffusers folder and the pipelines loading it."""

import json
from pathlib import Path

import pytest
import torch

from conftest import STAGES, compose_debug
from qwenimg_train.export.to_diffusers import ExportJob, export
from qwenimg_train.models.qwen_image.transformer import discarded_text_stream_names
from qwenimg_train.training.train import train

# The OCR callback at each stage end on a few tiny prompts (configs/debug/default.yaml turns it off).
OCR_EVAL = ("callbacks.ocr_eval={every_n_steps: null, stage_end: true, suites: [zh_char_l1, en_word, edit_zh], "
            "limit: 1, resolution: 32, steps: 2, guidance: 1.0, seed: 0}")


def _config(out: Path, models: Path, sources: dict, *overrides: str):
    return compose_debug(sources, *overrides, out=out, models=models)


@pytest.fixture(scope="module")
def wandb_seen() -> dict:
    """What the module's run handed wandb: its run objects and the metric keys it logged."""
    return {"runs": [], "keys": set()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, shard_sources, wandb_seen):
    from lightning.pytorch.loggers import WandbLogger

    real_log_metrics = WandbLogger.log_metrics

    def log_metrics(self, metrics, step=None):
        wandb_seen["keys"].update(metrics)
        if all(r is not self.experiment for r in wandb_seen["runs"]):
            wandb_seen["runs"].append(self.experiment)
        return real_log_metrics(self, metrics, step)

    root = tmp_path_factory.mktemp("run")
    cfg = _config(root / "train", root / "models", shard_sources, "logger=default", OCR_EVAL)  # wandb offline + csv
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WandbLogger, "log_metrics", log_metrics)
        return root, cfg, train(cfg)


def test_smoke_run_covers_every_stage_and_task(run, wandb_seen):
    root, cfg, summary = run
    assert summary["global_step"] == 9
    assert list(summary["stages"]) == list(STAGES)
    for stage in summary["stages"].values():
        assert stage["steps"] == 3
        assert set(stage["loss_by_task"]) == {"t2i", "ti2i", "i2i"}
        assert all(v == v and v > 0 for v in stage["loss_by_task"].values())  # finite, positive
    assert summary["throughput"]["samples_per_s"] > 0
    assert json.loads((root / "train" / "summary.json").read_text())["global_step"] == 9
    metrics = (root / "train" / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/loss/t2i", "train/loss/ti2i", "train/loss/i2i", "train/loss/stage/no_text",
                "perf/samples_per_s", "perf/tokens_per_s", "curriculum/stage"):
        assert key in metrics
    assert any(k.startswith("train/loss/sigma_") for k in metrics)
    # wandb, offline by default: a run folder to `wandb sync` later, whose run holds the
    # resolved config and was logged the per-task losses
    runs = list((root / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (wandb_run,) = wandb_seen["runs"]
    assert wandb_run.offline and Path(wandb_run.dir).resolve().parent == runs[0].resolve()
    assert wandb_run.config["model"]["pretrained_path"] == str(root / "models" / "tiny") == cfg.model.pretrained_path
    assert "train/loss/ti2i" in wandb_seen["keys"]
    assert (root / "train" / "logs" / "hparams.yaml").exists()


def test_ocr_eval_runs_at_each_stage_end(run):
    """The validation callback: eval/ocr/... metrics at the stage-end steps (3, 6, 9),
    overall and per suite, and per-step folders with ocr.json and one grid per suite."""
    import csv

    root, _, summary = run
    assert [e["step"] for e in summary["ocr_eval"]] == [3, 6, 9]
    with open(root / "train" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/ocr/char_accuracy")]
    assert [int(r["step"]) for r in rows] == [3, 6, 9]
    for key in ("eval/ocr/char_accuracy", "eval/ocr/char_accuracy/zh_char_l1", "eval/ocr/char_accuracy/en_word",
                "eval/ocr/char_accuracy/edit_zh"):
        assert all(0.0 <= float(r[key]) <= 1.0 for r in rows), key
    for step in (3, 6, 9):
        folder = root / "train" / "eval" / f"step{step:06d}"
        assert (folder / "ocr.json").is_file() and (folder / "ocr.md").is_file()
        assert sorted(p.stem for p in (folder / "grids").glob("*.png")) == ["edit_zh", "en_word", "zh_char_l1"]


def test_checkpoints_hold_weights_ema_and_config_not_encoders(run):
    root, _, _ = run
    ckpts = sorted(p.name for p in (root / "train" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "stage0-step000003.ckpt", "stage1-step000006.ckpt", "stage2-step000009.ckpt",
                     "step000003.ckpt", "step000006.ckpt", "step000009.ckpt"]
    ckpt = torch.load(root / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("model.transformer.") for k in ckpt["state_dict"])
    assert set(ckpt["callbacks"]["ema"]["shadow"]) == set(ckpt["state_dict"])
    assert ckpt["qwenimg_config"]["model"]["pretrained_path"].endswith("tiny")


def test_resume_continues_from_last(run, shard_sources):
    root, _, _ = run
    cfg = _config(root / "train", root / "models", shard_sources, "trainer.max_steps=12", "ckpt_path=last")
    summary = train(cfg)
    assert summary["global_step"] == 12
    assert list(summary["stages"]) == ["complex_layout"]  # steps 9..11 of 12 lie in the last stage


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_export_round_trip(run, weights):
    from diffusers import QwenImageTransformer2DModel

    root, _, _ = run
    ckpt_path = root / "train" / "checkpoints" / "step000009.ckpt"
    out = export(ExportJob(checkpoint=str(ckpt_path), out_dir=str(root / f"export-{weights}"), weights=weights))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    expected = ckpt["callbacks"]["ema"]["shadow"] if weights == "ema" else ckpt["state_dict"]
    transformer = QwenImageTransformer2DModel.from_pretrained(out / "transformer")
    reloaded = transformer.state_dict()
    # the last block's discarded text stream is frozen, so not in the checkpoint: the
    # export keeps the base folder's tensors there
    discarded = set(discarded_text_stream_names(transformer))
    assert discarded and set(reloaded) - discarded == {k.removeprefix("model.transformer.") for k in expected}
    base = QwenImageTransformer2DModel.from_pretrained(Path(ckpt["qwenimg_config"]["model"]["pretrained_path"])
                                                       / "transformer").state_dict()
    assert all(torch.equal(reloaded[name], base[name]) for name in discarded)
    for name, tensor in expected.items():
        assert torch.equal(reloaded[name.removeprefix("model.transformer.")], tensor), name
    assert json.loads((out / "qwenimg_export.json").read_text())["weights"] == weights


def test_exported_folder_runs_in_both_pipelines(run):
    import numpy as np
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from PIL import Image

    from qwenimg_train.models.qwen_image.encoding import load_processor

    root, _, _ = run
    out = export(ExportJob(checkpoint=str(root / "train" / "checkpoints" / "last.ckpt"), out_dir=str(root / "export")))
    image = QwenImagePipeline.from_pretrained(out)(prompt="a sign reading “你好”", height=32, width=32,
                                                   num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    edit = QwenImageEditPipeline.from_pretrained(out, processor=load_processor(out))
    source = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    edited = edit(image=source, prompt="make it red", num_inference_steps=2, output_type="np").images
    assert np.isfinite(edited).all()


def test_export_errors_are_clear(run, tmp_path):
    root, _, _ = run
    with pytest.raises(ValueError, match="does not exist"):
        export(ExportJob(checkpoint=str(tmp_path / "none.ckpt"), out_dir=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="weights"):
        ExportJob(checkpoint="x", out_dir="y", weights="best")


def test_config_mistakes_are_clear(tmp_path, shard_sources):
    with pytest.raises(ValueError, match="edit_fusion"):
        train(_config(tmp_path / "a", tmp_path / "m", shard_sources, "model.edit_fusion=sum"))
    with pytest.raises(ValueError, match="optim.schedule"):
        train(_config(tmp_path / "b", tmp_path / "m", shard_sources, "optim.schedule=linear"))
    with pytest.raises(ValueError, match="not a diffusers folder"):
        train(_config(tmp_path / "c", tmp_path / "m", shard_sources, "model.build_tiny=false",
                      f"model.pretrained_path={tmp_path / 'missing'}"))
    t2i_only = tmp_path / "t2i"
    from qwenimg_train.models.qwen_image.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(t2i_only, pipeline_class="QwenImagePipeline")
    with pytest.raises(ValueError, match="no processor"):
        train(_config(tmp_path / "e", tmp_path / "m", shard_sources, "model.build_tiny=false",
                      f"model.pretrained_path={t2i_only}"))
    with pytest.raises(ValueError, match="ckpt_path"):
        train(_config(tmp_path / "d", tmp_path / "m", shard_sources, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_optim_schedule():
    from qwenimg_train.training.optim import Optim

    optim = Optim(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    factors = [optim.factor(s, 14) for s in range(14)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert Optim(warmup_steps=0, schedule="constant").factor(100, 10) == 1.0


def _losses(run: Path) -> dict[int, float]:
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, shard_sources):
    """Same per-step losses and the same final weights and EMA: model, optimizer, LR
    schedule, EMA, stage, stream position and noise all continue exactly."""
    models = tmp_path / "models"
    full = train(_config(tmp_path / "full", models, shard_sources, "data.num_workers=1"))
    train(_config(tmp_path / "cut", models, shard_sources, "data.num_workers=1", "callbacks.stop_at_step=4"))
    first = _losses(tmp_path / "cut")
    resumed = train(_config(tmp_path / "cut", models, shard_sources, "data.num_workers=1", "ckpt_path=last"))
    assert full["global_step"] == resumed["global_step"] == 9
    combined = first | _losses(tmp_path / "cut")
    reference = _losses(tmp_path / "full")
    assert sorted(combined) == sorted(reference) == list(range(9))
    for step, loss in reference.items():
        assert combined[step] == pytest.approx(loss, abs=1e-5), step
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b["callbacks"]["ema"]["shadow"][name], a["callbacks"]["ema"]["shadow"][name],
                                   atol=1e-6, rtol=1e-5)


def test_bf16_mixed_trains_resumes_and_exports(tmp_path, shard_sources):
    """trainer.precision=bf16-mixed (Lightning's CPU autocast) with bf16 encoders: every
    stage trains with finite losses, a stopped run resumes to the uninterrupted run's
    losses, and the export loads and samples in both pipelines."""
    import numpy as np
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    from qwenimg_train.models.qwen_image.encoding import load_processor

    bf16 = ("trainer.precision=bf16-mixed", "model.encoder_dtype=bfloat16", "data.num_workers=1")
    models = tmp_path / "models"
    full = train(_config(tmp_path / "full", models, shard_sources, *bf16))
    assert list(full["stages"]) == list(STAGES) and full["global_step"] == 9
    train(_config(tmp_path / "cut", models, shard_sources, *bf16, "callbacks.stop_at_step=4"))
    first = _losses(tmp_path / "cut")
    train(_config(tmp_path / "cut", models, shard_sources, *bf16, "ckpt_path=last"))
    combined, reference = first | _losses(tmp_path / "cut"), _losses(tmp_path / "full")
    assert sorted(combined) == sorted(reference) == list(range(9))
    assert all(np.isfinite(v) for v in reference.values())
    for step, loss in reference.items():
        assert combined[step] == pytest.approx(loss, abs=1e-5), step
    out = export(ExportJob(checkpoint=str(tmp_path / "full" / "checkpoints" / "last.ckpt"), out_dir=str(tmp_path / "export")))
    image = QwenImagePipeline.from_pretrained(out)(prompt="你好", height=32, width=32, num_inference_steps=2,
                                                   output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    edit = QwenImageEditPipeline.from_pretrained(out, processor=load_processor(out))
    from PIL import Image

    edited = edit(image=Image.new("RGB", (32, 32), "white"), prompt="写上“好”", height=32, width=32,
                  num_inference_steps=2, output_type="np").images
    assert edited.shape == (1, 32, 32, 3) and np.isfinite(edited).all()


def test_keep_last_k_and_stage_end_checkpoints(tmp_path, shard_sources):
    train(_config(tmp_path / "run", tmp_path / "models", shard_sources, "callbacks.checkpoint.every_n_train_steps=2",
                  "callbacks.checkpoint.keep_last=2"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "stage0-step000003.ckpt", "stage1-step000006.ckpt", "stage2-step000009.ckpt",
                     "step000006.ckpt", "step000008.ckpt"]
    with pytest.raises(ValueError, match="keep_last"):
        train(_config(tmp_path / "bad", tmp_path / "models", shard_sources, "callbacks.checkpoint.keep_last=0"))
