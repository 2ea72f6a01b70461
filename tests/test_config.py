"""The typed configuration: one source of defaults, one error format, saved runs readable."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines.core.config import dataclass_defaults
from qwenimg_train.config import config_dir
from qwenimg_train.config.schema import (CallbacksConfig, CheckpointConfig, DataConfig, EMAConfig, NonFiniteConfig,
                                         OcrEvalConfig, TrainConfig, TrainerConfig, load_run_config)
from qwenimg_train.objectives.flow_matching import FlowMatching
from qwenimg_train.training.optim import Optim

SOURCES = ["data.sources={synthetic:/s,design:/d,natural:/n,edit:/e}"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*SOURCES, "paths.output_dir=/tmp/run", *overrides])


@pytest.mark.parametrize("group,cls", [
    ("optim/adamw", Optim), ("data/default", DataConfig), ("objective/flow_matching", FlowMatching),
    ("trainer/cpu", TrainerConfig),
])
def test_default_group_files_hold_the_dataclass_defaults(group, cls):
    """Every key a default group file sets equals the dataclass default (one source of defaults),
    except the values a group exists to choose (the trainer's step budget)."""
    values = yaml.safe_load(open(f"{config_dir()}/{group}.yaml"))
    defaults = dataclass_defaults(cls)
    chosen = {"trainer/cpu": {"max_steps"}}.get(group, set())
    differ = {k: (v, defaults[k]) for k, v in values.items()
              if k in defaults and k not in chosen and _norm(v) != _norm(defaults[k])}
    assert not differ, f"{group}.yaml disagrees with {cls.__name__}'s defaults: {differ}"


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def test_callbacks_group_holds_the_dataclass_defaults():
    values = yaml.safe_load(open(f"{config_dir()}/callbacks/default.yaml"))
    for key, cls in (("checkpoint", CheckpointConfig), ("ema", EMAConfig), ("nonfinite", NonFiniteConfig),
                     ("ocr_eval", OcrEvalConfig)):
        defaults = dataclass_defaults(cls)
        assert {k: v for k, v in values[key].items()} == {k: _norm(defaults[k]) for k in values[key]}, key
    assert set(values) == {f.name for f in dataclasses.fields(CallbacksConfig)}


def test_composed_config_builds_every_section():
    config = TrainConfig.from_mapping(_compose())
    assert config.data.sources == {"synthetic": "/s", "design": "/d", "natural": "/n", "edit": "/e"}
    assert [s.name for s in config.curriculum.stages] == ["no_text", "simple_text", "complex_layout"]
    assert config.callbacks.ema == EMAConfig() and config.callbacks.ocr_eval == OcrEvalConfig()
    assert config.trainer.kwargs()["max_steps"] == config.trainer.max_steps


@pytest.mark.parametrize("override,message", [
    ("+callbacks.ema.decau=0.9", r"unknown config key\(s\) callbacks\.ema\.decau; known keys: decay, every"),
    ("+callbacks.ocr_eval.limt=1", r"unknown config key\(s\) callbacks\.ocr_eval\.limt; known keys: .*limit"),
    ("+trainer.max_step=3", r"trainer: unknown key\(s\) \['max_step'\]"),
    ("callbacks.ema.decay=1.5", r"callbacks\.ema\.decay = 1\.5 must lie in \[0, 1\)"),
    ("model.family=flux", r"model\.family = 'flux'; use one of \['qwen_image', 'qwen_image_21', 'qwen_image_edit_plus'\]"),
    ("+typo=1", r"unknown top-level config key\(s\) \['typo'\]"),
])
def test_every_mistake_is_one_error_naming_the_key(override, message):
    """Typos in any section, the callbacks' included, are the same one-line ValueError."""
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_mapping(_compose(override))


def test_a_run_saved_before_the_package_moved_still_loads(tmp_path):
    """config.yaml of a run from the flat layout (strategy `_target_` qwenimg_train.strategies.ddp,
    a `pipeline_class` on a released model) loads, and its strategy target still instantiates."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    plain = OmegaConf.to_container(_compose("model=qwen_image", "model.pretrained_path=/m"), resolve=True)
    plain["strategy"] = {"_target_": "qwenimg_train.strategies.ddp", "find_unused_parameters": True}
    plain["model"]["pipeline_class"] = "QwenImageEditPipeline"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(plain))
    config = load_run_config(tmp_path)
    assert config.model.pretrained_path == "/m" and config.trainer.max_steps == plain["trainer"]["max_steps"]
    assert isinstance(instantiate(config.strategy), DDPStrategy)
    with pytest.raises(ValueError, match="pass a run directory holding config.yaml"):
        load_run_config(tmp_path / "missing")
