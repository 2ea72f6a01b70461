"""The curriculum as data: configs compose, validate, and map steps to stages."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qwenimg_train.data.curriculum import Curriculum, Stage

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def load(name: str, overrides=()) -> Curriculum:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"curriculum={name}", *overrides])
    return Curriculum.from_config(cfg.curriculum)


def test_three_stage_default_is_30_40_30_with_the_40_60_mix():
    cur = load("three_stage")
    assert [s.name for s in cur.stages] == ["no_text", "simple_text", "complex_layout"]
    assert [s.fraction for s in cur.stages] == [0.3, 0.4, 0.3]
    assert [s.text_classes for s in cur.stages] == [["none"], ["simple"], ["complex"]]
    for stage in cur.stages:
        assert stage.source_weights == {"design": 0.4, "synthetic": 0.6, "natural": 0.0}


def test_ablation_and_report_curricula_load():
    single = load("single_stage")
    assert len(single.stages) == 1 and set(single.stages[0].text_classes) == {"none", "simple", "complex"}
    report = load("report_recipe")
    assert [s.sizes()[0] for s in report.stages] == [(256, 256), (640, 640), (1328, 1328)]
    assert report.stages[0].text_classes == ["none"]  # text comes later
    assert report.stages[0].source_weights["natural"] > 0.5


def test_stage_boundaries_and_lookup():
    cur = load("three_stage")
    assert cur.boundaries(1000) == [0, 300, 700]
    assert [cur.stage_index(s, 1000) for s in (0, 299, 300, 699, 700, 999)] == [0, 0, 1, 1, 2, 2]
    assert cur.boundaries(7) == [0, 2, 5]  # rounded, every stage gets steps
    with pytest.raises(ValueError, match="every stage needs a step"):
        cur.boundaries(2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["curriculum.stages.no_text.fraction=0.5"], "sum to 1.2"),
        (["curriculum.stages.simple_text.source_weights.design=-1"], "negative"),
        (["curriculum.stages.simple_text.source_weights.design=0", "curriculum.stages.simple_text.source_weights.synthetic=0"], "positive sum"),
        (["curriculum.stages.complex_layout.resolution=500"], "multiple of 16.*496x496"),
        (["curriculum.stages.no_text.text_classes=[handwriting]"], "unknown text class"),
        (["+curriculum.stages.no_text.colour=red"], "colour"),
    ],
)
def test_mistakes_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        load("three_stage", overrides)


def manifest(**counts):
    return {"num_samples": sum(counts.values()), "counts": {"text_class": counts}}


def test_filters_are_checked_against_the_manifests():
    cur = load("three_stage")
    good = {
        "design": manifest(none=5, simple=3, complex=9),
        "synthetic": manifest(none=2, simple=8, complex=8),
        "edit": manifest(none=1, simple=2, complex=4),
    }
    cur.check_sources(good)
    no_simple_design = dict(good, design=manifest(none=5, complex=9))
    with pytest.raises(ValueError, match="stage 'simple_text': source 'design' has no sample of text class simple"):
        cur.check_sources(no_simple_design)
    with pytest.raises(ValueError, match="stage 'no_text': source 'edit' has no pair"):
        cur.check_sources(dict(good, edit=manifest(complex=4)))
    with pytest.raises(ValueError, match="no edit pairs"):
        cur.check_sources({k: v for k, v in good.items() if k != "edit"})
    with pytest.raises(ValueError, match="source 'synthetic'.*no synthetic shards"):
        cur.check_sources({k: v for k, v in good.items() if k != "synthetic"})


def test_demo_manifests_satisfy_the_default_curriculum(tmp_path):
    """The data jobs' own manifests feed the check (tiny runs of each source)."""
    from data_pipelines.jobs.edit_pairs import EditPairsJob
    from data_pipelines.jobs.edit_pairs import run as run_edit
    from data_pipelines.jobs.design import DesignJob, run_design
    from data_pipelines.jobs.synthetic import SyntheticJob
    from data_pipelines.jobs.synthetic import run as run_synthetic

    run_synthetic(SyntheticJob(out_dir=str(tmp_path / "synthetic"), num_shards=1, samples_per_shard=40, progress=False))
    run_design(DesignJob(out_dir=str(tmp_path / "design"), num_shards=1, samples_per_shard=30, progress=False))
    run_edit(EditPairsJob(out_dir=str(tmp_path / "edit"), num_shards=1, samples_per_shard=30, progress=False))
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("synthetic", "design", "edit")}
    load("three_stage").check_sources(manifests)


def test_stage_record_defaults_are_valid():
    stage = Stage(name="s", fraction=1.0)
    assert stage.sizes() == [(512, 512)]
    assert Stage(name="b", fraction=1.0, buckets=["640x384", "384x640"]).sizes() == [(640, 384), (384, 640)]
