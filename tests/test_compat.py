"""qwenimg_train.compat: the installed versions pass its check, an out-of-range one is a
clear error, an untested one a warning; the private names it lists still exist."""

from __future__ import annotations

import warnings

import pytest

from qwenimg_train import compat
from qwenimg_train.parallel import deepspeed_compat


@pytest.fixture
def fresh(monkeypatch):
    """A check that has not run yet in this process."""
    monkeypatch.setattr(compat, "_checked", set())


def test_installed_versions_pass(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.UntestedVersionWarning)
        compat.check_versions()


@pytest.mark.parametrize("package,version", [("diffusers", "0.43.0"), ("diffusers", "0.41.2"),
                                             ("lightning", "3.0.0"), ("deepspeed", "0.20.1"),
                                             ("transformers", "4.55.0")])
def test_out_of_range_version_is_a_clear_error(fresh, monkeypatch, package, version):
    monkeypatch.setattr(compat, "installed_version", lambda name: version if name == package else "0")
    with pytest.raises(compat.IncompatibleVersionError) as info:
        compat.require(package)
    message = str(info.value)
    assert f"{package} {version} is installed" in message
    assert compat.PINS[package].required in message and compat.PINS[package].tested_with in message


def test_untested_version_warns_once(fresh, monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda name: "2.7.1")
    with pytest.warns(compat.UntestedVersionWarning, match=r"lightning 2\.7\.1 is installed.*>=2\.6,<2\.7"):
        compat.require("lightning")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.require("lightning")  # checked already: silent


def test_accessors_check_the_version(fresh, monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda name: "9.0.0")
    with pytest.raises(compat.IncompatibleVersionError, match="lightning 9.0.0"):
        compat.wandb_run_started(object())


def test_private_names_still_exist():
    assert compat.missing_private_names() == []
    pytest.importorskip("deepspeed")
    assert compat.missing_private_names(deepspeed_compat.PRIVATE_NAMES) == []


def test_pyproject_ranges_match_the_pins():
    """pyproject.toml admits what compat calls tested, and nothing it rejects."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {Requirement(d).name: Requirement(d).specifier for d in deps}
    for pin in compat.PINS.values():
        assert pin.tested_with in specs[pin.package], pin.package
        assert specs[pin.package] == compat.SpecifierSet(pin.tested), (pin.package, str(specs[pin.package]), pin.tested)


def test_quiet_wandb_logger_drops_only_the_anonymous_none():
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    logger = WandbLogger(project="p", offline=True, save_dir="unused")
    assert "anonymous" in logger._wandb_init
    assert compat.quiet_wandb_logger(logger) is logger and "anonymous" not in logger._wandb_init
    assert not compat.wandb_run_started(logger)
    csv = CSVLogger("unused")
    assert compat.quiet_wandb_logger(csv) is csv


def test_edit_source_area_swaps_calculate_dimensions_only_inside(fresh):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module

    original = edit_module.calculate_dimensions
    assert original(1024 * 1024, 1.0)[:2] == (1024, 1024)
    with compat.edit_source_area(None):
        assert edit_module.calculate_dimensions is original
    with compat.edit_source_area(64 * 64):
        assert edit_module.calculate_dimensions(1024 * 1024, 1.0)[:2] == (64, 64)
        assert edit_module.calculate_dimensions(1024 * 1024, 2.0)[:2] == (96, 32)  # aspect kept, sides of 32
    assert edit_module.calculate_dimensions is original
    with pytest.raises(RuntimeError, match="boom"), compat.edit_source_area(64 * 64):
        raise RuntimeError("boom")
    assert edit_module.calculate_dimensions is original
    with pytest.raises(ValueError, match="edit_source_area"):
        with compat.edit_source_area(16):
            pass


def test_edit_source_area_checks_the_version_and_the_pipeline(fresh, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module

    def call_without_it(self, image=None):
        return image

    monkeypatch.setattr(edit_module.QwenImageEditPipeline, "__call__", call_without_it)
    with pytest.raises(compat.IncompatibleVersionError, match="no longer calls calculate_dimensions"):
        with compat.edit_source_area(4096):
            pass
    monkeypatch.setattr(compat, "_checked", set())
    monkeypatch.setattr(compat, "installed_version", lambda name: "0.44.0")
    with pytest.raises(compat.IncompatibleVersionError, match="diffusers 0.44.0"):
        with compat.edit_source_area(4096):
            pass
