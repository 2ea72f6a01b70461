"""Precomputed inputs: `qwenimg-data --config-name precompute` writes encoder outputs into
shards, and training reads them with the encoders never loaded.

The reference is online encoding: the same stream, read both ways, gives the same
batches, the same `ModelInputs` and the same loss (1e-5); a stale cache (other
encoder, dtype, bucket set) is refused with both tags named."""

import json
from pathlib import Path

import pytest
import torch

from conftest import STAGES, compose_debug
from data_pipelines.jobs.precompute import PrecomputeJob, run as run_precompute
from data_pipelines.core.shards import iter_tar_samples
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SourceShards, StageStream
from qwenimg_train.models.qwen_image.model import QwenImageModel
from qwenimg_train.objectives.flow_matching import FlowMatching, flow_matching_loss
from data_pipelines.core.precomputed import MEMBER, from_bytes
from qwenimg_train.training.train import train

RES = 32
SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shard_sources):
    """The tiny model folder (as model=tiny builds it) and every source precomputed at 32²."""
    root = tmp_path_factory.mktemp("pre")
    model = root / "models" / "tiny"
    out = {}
    for name, folder in shard_sources.items():
        out[name] = str(root / "pre" / name)
        run_precompute(PrecomputeJob(in_dir=folder, out_dir=out[name], pretrained_path=str(model), build_tiny=True,
                                     max_sequence_length=SEQ, resolutions=[RES], batch_size=6, progress=False))
    return root, model, out


def _stage(**kw) -> Stage:
    fields = dict(name="mixed", fraction=1.0, resolution=RES, task_mix={"t2i": 0.5, "ti2i": 0.25, "i2i": 0.25},
                  text_classes=["none", "simple", "complex"], caption_dropout=0.3)
    return Stage(**{**fields, **kw})


def _stream(sources: dict, precomputed: bool, **kw) -> StageStream:
    shards = {k: SourceShards.from_folder(k, v) for k, v in sources.items()}
    return StageStream(stage=_stage(), stage_index=0, sources=shards, batch_size=4, seed=3, shuffle_buffer=8,
                       num_batches=4, precomputed=precomputed, **kw)


def test_manifest_tag_and_members(setup, shard_sources):
    _, model, pre = setup
    manifest = json.loads((Path(pre["edit"]) / "manifest.json").read_text())
    source = json.loads((Path(shard_sources["edit"]) / "manifest.json").read_text())
    assert manifest["num_samples"] == source["num_samples"]  # nothing lost
    assert manifest["counts"]["text_class"] == source["counts"]["text_class"]
    tag = manifest["precompute"]
    assert tag["dtype"] == "float32" and tag["max_sequence_length"] == SEQ and tag["bucket_sets"] == [[f"{RES}x{RES}"]]
    sample = next(iter(iter_tar_samples(Path(pre["edit"]) / "edit-000000.tar")))
    assert "jpg" in sample and "src.jpg" in sample  # beside the images
    tensors = from_bytes(sample[MEMBER])
    name = f"{RES}x{RES}"
    assert set(tensors) == {f"target@{name}", f"source@{name}", f"text@{name}", f"null@{name}"}
    assert tensors[f"target@{name}"].shape == (4, RES // 8, RES // 8)  # z_dim 4
    t2i = from_bytes(next(iter(iter_tar_samples(Path(pre["synthetic"]) / "synthetic-000000.tar")))[MEMBER])
    assert set(t2i) == {f"target@{name}", "text", "null"}


def test_same_batches_inputs_and_loss_as_online_encoding(setup, shard_sources):
    """The reference: the online path (frozen encoders on decoded images)."""
    from qwenimg_train.models.qwen_image.model import load_encoders, load_transformer

    _, model_dir, pre = setup
    model = QwenImageModel(load_transformer(model_dir), load_encoders(model_dir, max_sequence_length=SEQ))
    objective = FlowMatching()
    online = list(_stream(shard_sources, False))
    cached = list(_stream(pre, True))
    assert len(online) == len(cached) == 4
    seen_tasks = set()
    for a, b in zip(online, cached):
        assert a.key == b.key and a.task == b.task and a.prompt == b.prompt
        assert b.target_bchw is None and b.encoded is not None
        seen_tasks |= set(a.task)
        x, y = model.encode_batch(a), model.encode_batch(b)
        assert x.img_shapes == y.img_shapes
        assert torch.equal(x.text_mask_bt, y.text_mask_bt)
        for field in ("target_bnc", "source_bmc", "text_btd"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            if u is not None:
                torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
        generator = torch.Generator().manual_seed(0)
        sigmas = objective.sample_sigmas(x.target_tokens_b, generator=generator)
        noise = torch.randn(x.target_bnc.shape, generator=generator)
        with torch.no_grad():
            la = flow_matching_loss(lambda z, s: model.denoise(z, s, x), x.target_bnc, noise, sigmas, x.target_mask_bn)
            lb = flow_matching_loss(lambda z, s: model.denoise(z, s, y), y.target_bnc, noise, sigmas, y.target_mask_bn)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
    assert seen_tasks == {"t2i", "ti2i", "i2i"}
    assert any(p == "" for b in cached for p in b.prompt)  # caption dropout drew the null encodings


def _config(root: Path, models: Path, sources: dict, *overrides: str):
    # The precomputed folders hold RES px images and SEQ-token prompts: the run must ask for those.
    return compose_debug(sources, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=30",
                         "data.precomputed=true", f"model.max_sequence_length={SEQ}",
                         *[f"curriculum.stages.{s}.resolution={RES}" for s in STAGES], *overrides, out=root, models=models)


def test_training_never_loads_the_encoders(setup, tmp_path, monkeypatch):
    root, model, pre = setup

    def refuse(*args, **kwargs):
        raise AssertionError("the encoders were loaded")

    monkeypatch.setattr("qwenimg_train.models.qwen_image.model.load_encoders", refuse)
    summary = train(_config(tmp_path / "run", model.parent, pre, "data.batch_size=8"))  # 24 samples: every task
    assert summary["global_step"] == 3 and list(summary["stages"]) == list(STAGES)
    assert {t for s in summary["stages"].values() for t in s["loss_by_task"]} == {"t2i", "ti2i", "i2i"}


def test_stale_cache_is_refused_naming_both_tags(setup, tmp_path):
    root, model, pre = setup
    with pytest.raises(ValueError, match=r"dtype differ.*'dtype': 'float32'.*'dtype': 'bfloat16'"):
        train(_config(tmp_path / "a", model.parent, pre, "model.encoder_dtype=bfloat16"))
    with pytest.raises(ValueError, match=r"\(max_sequence_length differ\)"):
        train(_config(tmp_path / "b", model.parent, pre, "model.max_sequence_length=16"))
    with pytest.raises(ValueError, match=r"trains at buckets \['64x64'\].*bucket sets \[\['32x32'\]\]"):
        train(_config(tmp_path / "c", model.parent, pre, "curriculum.stages.no_text.resolution=64"))
    # another model folder (a tiny model of another seed): the encoder fingerprints differ
    from qwenimg_train.models.qwen_image.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "models" / "tiny", pipeline_class="QwenImageEditPipeline", seed=1)
    with pytest.raises(ValueError, match=r"encoder, vae differ"):
        train(_config(tmp_path / "d", other.parent, pre))


def test_plain_shards_and_missing_null_prompts_are_refused(setup, shard_sources, tmp_path):
    root, model, pre = setup
    with pytest.raises(ValueError, match=r"holds no precomputed inputs.*qwenimg-data --config-name precompute"):
        train(_config(tmp_path / "a", model.parent, shard_sources))
    no_null = {**pre, "design": str(tmp_path / "design")}
    run_precompute(PrecomputeJob(in_dir=str(Path(shard_sources["design"])), out_dir=no_null["design"],
                                 pretrained_path=str(model), max_sequence_length=SEQ, resolutions=[RES],
                                 null_prompts=False, progress=False))
    with pytest.raises(ValueError, match=r"caption_dropout 0.1.*null_prompts=false"):
        train(_config(tmp_path / "b", model.parent, no_null))


def test_split_across_nodes_resume_and_bad_samples(setup, shard_sources, tmp_path):
    """Two 'nodes' take disjoint shard slices; a rerun keeps complete shards; a corrupt
    image is skipped and counted, the rest of its shard kept."""
    import tarfile

    _, model, _ = setup
    bad_in = tmp_path / "in"
    bad_in.mkdir()
    src = Path(shard_sources["synthetic"])
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tin, tarfile.open(bad_in / path.name, "w") as tout:
            for k, member in enumerate(tin):
                data = tin.extractfile(member).read()
                if k == 0 and member.name.endswith(".jpg") and path.name.endswith("000001.tar"):
                    data = b"not a jpeg"
                member.size = len(data)
                import io

                tout.addfile(member, io.BytesIO(data))
    (bad_in / "manifest.json").write_text((src / "manifest.json").read_text())
    job = dict(in_dir=str(bad_in), out_dir=str(tmp_path / "out"), pretrained_path=str(model),
               max_sequence_length=SEQ, resolutions=[RES], progress=False)
    first = run_precompute(PrecomputeJob(**job, node_rank=0, num_nodes=2))
    assert first["shards_written"] == 1 and first["manifest"] is None  # node 1's shard is missing yet
    second = run_precompute(PrecomputeJob(**job, node_rank=1, num_nodes=2))
    assert second["shards_written"] == 1 and second["manifest"] is not None
    again = run_precompute(PrecomputeJob(**job, node_rank=0, num_nodes=1))
    assert again["shards_written"] == 0 and again["shards_kept"] == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    source = json.loads((src / "manifest.json").read_text())
    assert manifest["num_samples"] == source["num_samples"] - 1
    assert manifest["counts"]["skipped"] == {"undecodable": 1}
    assert len(manifest["skipped"]) == 1 and "synthetic-000001.tar" in manifest["skipped"][0]["item"]


def test_job_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="resolution 500x500 is not a positive multiple of 16"):
        PrecomputeJob(in_dir="a", out_dir="b", pretrained_path="m", resolutions=[500])
    with pytest.raises(ValueError, match="out_dir must differ from in_dir"):
        PrecomputeJob(in_dir="a", out_dir="a", pretrained_path="m")
    with pytest.raises(ValueError, match="is not a diffusers folder"):
        run_precompute(PrecomputeJob(in_dir=str(tmp_path), out_dir=str(tmp_path / "o"), pretrained_path=str(tmp_path)))
