"""Stage boundaries in a real Lightning run, including after a resume (CPU, tiny model)."""

import lightning.pytorch as pl
import pytest
import torch

from qwenimg_train.data.curriculum import Curriculum, Stage
from qwenimg_train.data.datamodule import CurriculumDataModule
from qwenimg_train.training.callbacks.curriculum import CurriculumCallback
from data_pipelines.core.images import to_unit_range


class Tiny(pl.LightningModule):
    """Records the stage of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.stages: list[str] = []

    def training_step(self, batch, batch_idx):
        self.stages.append(batch.stage)
        pixels = to_unit_range(batch.target_bchw).mean(dim=(2, 3))
        return self.layer(pixels).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def sources(shard_sources):
    return shard_sources


def curriculum():
    mix = {"t2i": 0.5, "ti2i": 0.25, "i2i": 0.25}
    return Curriculum("test", [
        Stage(name="a", fraction=0.3, text_classes=["none"], resolution=32, task_mix={"t2i": 1.0}),
        Stage(name="b", fraction=0.4, text_classes=["simple", "complex"], resolution=32, task_mix=mix),
        Stage(name="c", fraction=0.3, text_classes=["complex"], resolution=48, task_mix=mix),
    ])


def fit(sources, tmp_path, max_steps, ckpt_path=None, num_workers=0):
    dm = CurriculumDataModule(curriculum=curriculum(), sources=sources, batch_size=2, total_steps=10,
                              num_workers=num_workers, shuffle_buffer=8)
    model = Tiny()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
        max_epochs=-1, default_root_dir=str(tmp_path), callbacks=[CurriculumCallback(dm)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


def test_stages_switch_at_their_step_boundaries(sources, tmp_path):
    trainer, model = fit(sources, tmp_path, max_steps=10, num_workers=2)
    assert trainer.global_step == 10
    assert model.stages == ["a"] * 3 + ["b"] * 4 + ["c"] * 3


def test_a_resumed_run_restores_its_stage(sources, tmp_path, caplog):
    trainer, model = fit(sources, tmp_path, max_steps=5)
    assert model.stages == ["a"] * 3 + ["b"] * 2
    ckpt = tmp_path / "step5.ckpt"
    trainer.save_checkpoint(ckpt)
    with caplog.at_level("WARNING", logger="qwenimg_train.training.callbacks.curriculum"):
        resumed, model2 = fit(sources, tmp_path, max_steps=10, ckpt_path=str(ckpt))
    assert resumed.global_step == 10
    assert model2.stages == ["b"] * 2 + ["c"] * 3
    # The checkpoint carries the callback's stages, and the resume found them equal to its own.
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith(CurriculumCallback.__name__))
    assert state["stages"] == ["a", "b", "c"]
    assert not [r for r in caplog.records if "another curriculum" in r.getMessage()]


def test_the_composed_configs_build_a_working_data_module(sources, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    overrides = [f"+data.sources.{k}={v}" for k, v in sources.items()] + ["data.num_workers=0"]  # configs/data names none
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    cur = Curriculum.from_config(cfg.curriculum)
    dm = CurriculumDataModule(curriculum=cur, total_steps=10, **OmegaConf.to_container(cfg.data))
    dm.setup("fit")  # checks every stage against the manifests
    batch = next(iter(dm.train_dataloader()))
    assert batch.stage == "no_text" and len(batch) == cfg.data.batch_size


class KeyRecorder(Tiny):
    """Also records the sample keys each rank trained on (written to a file per rank)."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        with open(f"{self.out_dir}/rank{self.global_rank}.txt", "a") as f:
            f.write(f"{self.global_step} {batch.stage} {' '.join(batch.key)}\n")
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_two_ddp_ranks_switch_together_and_read_disjoint_samples(sources, tmp_path):
    dm = CurriculumDataModule(curriculum=curriculum(), sources=sources, batch_size=2, total_steps=10,
                              num_workers=0, shuffle_buffer=8)
    trainer = pl.Trainer(
        max_steps=10, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1, max_epochs=-1,
        default_root_dir=str(tmp_path), callbacks=[CurriculumCallback(dm)],
    )
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    rows = {r: (tmp_path / f"rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)}
    for r in (0, 1):
        assert [row.split()[1] for row in rows[r]] == ["a"] * 3 + ["b"] * 4 + ["c"] * 3
    keys = {r: {k for row in rows[r] for k in row.split()[2:]} for r in (0, 1)}
    # Each source has 2 shards, one per rank: the ranks' T2I samples never meet.
    t2i = {r: {k for k in keys[r] if not k.startswith("edit_")} for r in (0, 1)}
    assert not t2i[0] & t2i[1]


class ScaledLR(Tiny):
    """Uses the curriculum's lr_scale through LambdaLR, as a training module should."""

    def __init__(self, dm):
        super().__init__()
        self.dm = dm
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.dm.lr_scale_at(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_stage_lr_scale_reaches_the_optimizer(sources, tmp_path):
    cur = curriculum()
    cur.stages[1].lr_scale = 0.5
    cur.stages[2].lr_scale = 0.25
    dm = CurriculumDataModule(curriculum=cur, sources=sources, batch_size=2, total_steps=10, shuffle_buffer=8)
    model = ScaledLR(dm)
    trainer = pl.Trainer(
        max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1, max_epochs=-1,
        default_root_dir=str(tmp_path), callbacks=[CurriculumCallback(dm)],
    )
    trainer.fit(model, datamodule=dm)
    assert model.lrs == pytest.approx([0.1] * 3 + [0.05] * 4 + [0.025] * 3)


def test_skips_are_summed_over_workers_and_ranks_and_kept_across_a_resume(sources):
    """`data/skipped/<reason>` and the summary's `data_skipped` count every worker of every
    rank (the loggers write rank 0's values only), and a resumed stage adds to the
    checkpoint's counts. The reduce is the strategy's (a real 2-rank all-reduce runs in
    test_remote_sources' outage run); here the other rank is simulated."""
    from types import SimpleNamespace

    dm = CurriculumDataModule(curriculum=curriculum(), sources=sources, batch_size=2, total_steps=10)
    other_rank = {"bad_shard": 1, "unreachable_shard": 2}

    class Strategy:
        root_device = torch.device("cpu")

        def reduce(self, counts, reduce_op):
            from data_pipelines.core.untrusted import SKIP_REASONS

            assert reduce_op == "sum"
            return counts + torch.tensor([float(other_rank.get(r, 0)) for r in SKIP_REASONS], dtype=counts.dtype)

    logged: dict[str, float] = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(world_size=2, strategy=Strategy(), global_step=0)

    class FakeBatch(SimpleNamespace):  # what the callback reads of a loader Batch
        def __len__(self):
            return 2

    def batch(worker, skipped):
        return FakeBatch(worker=worker, skipped=skipped)

    callback = CurriculumCallback(dm)
    trainer.global_step = 4  # stage b
    callback.on_train_batch_start(trainer, module, batch(0, {"undecodable": 1}), 0)
    callback.on_train_batch_start(trainer, module, batch(1, {"undecodable": 2, "bad_shard": 1}), 1)
    assert logged["data/skipped/undecodable"] == 3 and logged["data/skipped/bad_shard"] == 2
    assert logged["data/skipped/unreachable_shard"] == 2
    assert callback.skipped_by_stage == {"b": {"undecodable": 3, "bad_shard": 2, "unreachable_shard": 2}}

    resumed = CurriculumCallback(dm)
    resumed.load_state_dict(callback.state_dict())
    other_rank.clear()
    resumed.on_train_batch_start(trainer, module, batch(0, {"undecodable": 1}), 0)  # the stream counts from zero
    assert resumed.skipped_by_stage == {"b": {"undecodable": 4, "bad_shard": 2, "unreachable_shard": 2}}


def test_the_progress_bar_names_the_curriculum_stage(sources):
    """One stage is one epoch and max_epochs is -1: the bar says "stage 1 b" (the index
    the logs and metrics use), not Lightning's "Epoch 1/-2"."""
    from types import SimpleNamespace

    from qwenimg_train.training.callbacks.progress import StageProgressBar, stage_label

    dm = CurriculumDataModule(curriculum=curriculum(), sources=sources, batch_size=2, total_steps=10)
    labels = [stage_label(SimpleNamespace(datamodule=dm, global_step=step)) for step in (0, 2, 3, 6, 7, 9)]
    assert labels == ["stage 0 a"] * 2 + ["stage 1 b"] * 2 + ["stage 2 c"] * 2
    bar = StageProgressBar()
    bar._trainer = SimpleNamespace(datamodule=dm, global_step=4, max_epochs=-1)
    assert bar._get_train_description(1) == "stage 1 b"
    bar._trainer = SimpleNamespace(datamodule=None, global_step=4, max_epochs=-1)  # not a curriculum run
    assert bar._get_train_description(1).startswith("Epoch 1")

