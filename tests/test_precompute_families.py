"""Precomputed inputs for every family: multi-image edits (Edit-Plus) and Qwen-Image-2.1.

The reference is each family's own online encoding: one stream of T2I samples and one-,
two- and three-source edits, read as images and as precomputed tensors, gives the same
batches, the same model inputs and the same loss; a run with `data.precomputed=true`
trains without loading the encoders."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from conftest import STAGES, compose_debug
from data_pipelines.core.precomputed import MEMBER, from_bytes
from data_pipelines.core.shards import iter_tar_samples
from data_pipelines.jobs.precompute import PrecomputeJob, run as run_precompute
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SourceShards, StageStream
from qwenimg_train.models import get_family
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss
from qwenimg_train.training.train import train
from test_edit_plus import _multi_source_shards

RES = 32
NAME = f"{RES}x{RES}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, shard_sources):
    """The design and synthetic shards (T2I) and the edit shards with 1, 2 and 3 sources
    per pair."""
    root = tmp_path_factory.mktemp("multi")
    _multi_source_shards(root / "edit", shard_sources, bad=False)
    return {"design": shard_sources["design"], "synthetic": shard_sources["synthetic"], "edit": str(root / "edit")}


def _precompute(family: str, root: Path, sources: dict) -> tuple[Path, dict]:
    folder = get_family(family).build_tiny(root / "models" / family)
    out = {}
    for name, path in sources.items():
        out[name] = str(root / "pre" / name)
        run_precompute(PrecomputeJob(in_dir=path, out_dir=out[name], pretrained_path=str(folder), family=family,
                                     resolutions=[RES], batch_size=5, progress=False))
    return folder, out


@pytest.fixture(scope="module")
def plus(tmp_path_factory, sources):
    return _precompute("qwen_image_edit_plus", tmp_path_factory.mktemp("plus"), sources)


@pytest.fixture(scope="module")
def q21(tmp_path_factory, sources):
    return _precompute("qwen_image_21", tmp_path_factory.mktemp("q21"), sources)


def _stream(sources: dict, precomputed: bool) -> StageStream:
    stage = Stage(name="mixed", fraction=1.0, resolution=RES, task_mix={"t2i": 0.25, "ti2i": 0.5, "i2i": 0.25},
                  text_classes=["none", "simple", "complex"], caption_dropout=0.3, source_weights={"design": 1.0})
    shards = {k: SourceShards.from_folder(k, v) for k, v in sources.items()}
    return StageStream(stage=stage, stage_index=0, sources=shards, batch_size=6, seed=3, shuffle_buffer=8,
                       num_batches=4, precomputed=precomputed, max_sources=3, max_skip_fraction=0.5)


def _model(family: str, folder: Path):
    fam = get_family(family)
    encoders = fam.load_encoders(folder, dtype="float32", max_sequence_length=1024)
    torch.manual_seed(0)
    return fam.build_model(folder, encoders, options={},
                           load_transformer=lambda cls, path, overrides, **kw: cls.from_pretrained(path, **overrides))


def _compare(model, sources: dict, pre: dict, fields) -> set[int]:
    """Online and precomputed batches of one stream: same keys, inputs and loss. Returns
    the source counts seen."""
    objective = FlowMatching()
    online, cached = list(_stream(sources, False)), list(_stream(pre, True))
    assert len(online) == len(cached) == 4
    counts = set()
    for a, b in zip(online, cached):
        assert a.key == b.key and a.task == b.task and a.prompt == b.prompt
        assert b.target_bchw is None and b.encoded is not None
        counts |= set(a.num_sources.tolist() if a.num_sources is not None else [int(s) for s in a.has_source])
        x, y = model.encode_batch(a), model.encode_batch(b)
        fields(x, y)
        generator = torch.Generator().manual_seed(0)
        sigmas = objective.sample_sigmas(x.target_tokens_b, generator=generator)
        noise = torch.randn(x.target_bnc.shape, generator=generator)
        with torch.no_grad():
            la = flow_matching_loss(lambda z, s: model.denoise(z, s, x), x.target_bnc, noise, sigmas, x.target_mask_bn)
            lb = flow_matching_loss(lambda z, s: model.denoise(z, s, y), y.target_bnc, noise, sigmas, y.target_mask_bn)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
    assert any(p == "" for b in cached for p in b.prompt)  # caption dropout drew the null encodings
    return counts


def _close(u, v, what):
    assert (u is None) == (v is None), what
    if u is not None:
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5, msg=what)


def test_multi_image_edits_precompute_every_source(plus, sources, shard_sources, tmp_path):
    folder, pre = plus
    stored = [set(from_bytes(s[MEMBER])) for s in iter_tar_samples(Path(pre["edit"]) / "edit-000000.tar")]
    base = {f"target@{NAME}", f"text@{NAME}", f"null@{NAME}", f"source@{NAME}"}
    assert base in stored and base | {f"source2@{NAME}"} in stored
    assert base | {f"source2@{NAME}", f"source3@{NAME}"} in stored
    _multi_source_shards(tmp_path / "bad", shard_sources, bad=True)  # one pair claims two sources, holds one
    run_precompute(PrecomputeJob(in_dir=str(tmp_path / "bad"), out_dir=str(tmp_path / "out"), pretrained_path=str(folder),
                                 family="qwen_image_edit_plus", resolutions=[RES], progress=False))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"missing_member": 1}

    def fields(x, y):
        assert x.img_shapes == y.img_shapes
        assert torch.equal(x.text_mask_bt, y.text_mask_bt)
        for name in ("target_bnc", "source_bmc", "source_mask_bm", "text_btd"):
            _close(getattr(x, name), getattr(y, name), name)

    counts = _compare(_model("qwen_image_edit_plus", folder), sources, pre, fields)
    assert {0, 1, 2, 3} <= counts


def test_qwen_image_21_precomputes_text_slots_and_conditions(q21, sources):
    folder, pre = q21
    t2i = from_bytes(next(iter(iter_tar_samples(Path(pre["design"]) / "design-000000.tar")))[MEMBER])
    assert set(t2i) == {f"target@{NAME}", "text", "slots", "null", "nullslots"}
    assert t2i[f"target@{NAME}"].shape == (16, RES // 16, RES // 16)  # unpatched 16x latents

    def fields(x, y):
        assert x.target_shape == y.target_shape and x.condition_shapes == y.condition_shapes
        _close(x.target_bnc, y.target_bnc, "target")
        for i in range(len(x.text)):
            assert torch.equal(x.slots[i], y.slots[i])
            _close(x.text[i], y.text[i], "text")
            _close(x.conditions[i], y.conditions[i], "conditions")

    counts = _compare(_model("qwen_image_21", folder), sources, pre, fields)
    assert {0, 1, 2, 3} <= counts


@pytest.mark.parametrize("family,model", [("qwen_image_21", "tiny_21"), ("qwen_image_edit_plus", "tiny_edit_plus")])
def test_training_on_precomputed_shards_never_loads_the_encoders(family, model, request, tmp_path, monkeypatch):
    folder, pre = request.getfixturevalue("q21" if family == "qwen_image_21" else "plus")
    fam = type(get_family(family))

    def refuse(*args, **kwargs):
        raise AssertionError("the encoders were loaded")

    monkeypatch.setattr(fam, "load_encoders", refuse)
    cfg = compose_debug(pre, f"model={model}", "trainer.max_steps=3", "model.max_sequence_length=1024",
                        "data.precomputed=true", "data.batch_size=6", "data.max_skip_fraction=0.5",
                        "callbacks.checkpoint.every_n_train_steps=30",
                        *[f"curriculum.stages.{s}.resolution={RES}" for s in STAGES], out=tmp_path / "run",
                        models=folder.parent)
    summary = train(cfg)
    assert summary["global_step"] == 3 and list(summary["stages"]) == list(STAGES)
    assert {t for s in summary["stages"].values() for t in s["loss_by_task"]} == {"t2i", "ti2i", "i2i"}
