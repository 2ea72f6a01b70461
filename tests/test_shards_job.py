import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from hydra import compose, initialize_config_dir

from data_pipelines.cli import config_dir, run_job
from data_pipelines.core.config import from_mapping
from data_pipelines.core.schema import SampleMeta
from data_pipelines.core.shards import node_split, node_shards
from data_pipelines.jobs import synthetic as synth

from conftest import small_job

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "data_pipelines.cli"]


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_shards_are_readable_by_webdataset_and_tar(tmp_path):
    summary = synth.run(small_job(tmp_path))
    assert summary["shards_written"] == 2 and summary["manifest"]
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert [Path(u).name for u in urls] == ["synthetic-000000.tar", "synthetic-000001.tar"]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 12
    for s in samples:
        meta = SampleMeta.from_json(s["json"]) if isinstance(s["json"], (bytes, str)) else SampleMeta.from_json(s["json"])
        meta.validate()
        assert s["jpg"].size == (512, 512)
        assert s["__key__"] == meta.key
        caption = s["txt"] if isinstance(s["txt"], str) else s["txt"].decode()
        for line in meta.lines:
            assert line.text in caption
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 18 and listing[0].endswith(".jpg")
    with tarfile.open(urls[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())  # fixed headers: reproducible bytes


def test_manifest_counts(tmp_path):
    synth.run(small_job(tmp_path, samples_per_shard=10))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 20 and manifest["num_shards"] == 2
    assert sum(manifest["counts"]["text_class"].values()) == 20
    assert sum(manifest["counts"]["layout"].values()) == 20
    assert set(manifest["counts"]["text_class"]) <= {"none", "simple", "complex"}
    assert manifest["seed"] == 7 and manifest["config"]["samples_per_shard"] == 10
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10]


def test_same_seed_gives_byte_identical_shards_for_any_worker_count(tmp_path):
    synth.run(small_job(tmp_path / "a", num_shards=3, samples_per_shard=5, workers=1))
    synth.run(small_job(tmp_path / "b", num_shards=3, samples_per_shard=5, workers=2))
    a, b = tar_bytes(tmp_path / "a"), tar_bytes(tmp_path / "b")
    assert len(a) == 3 and a == b
    synth.run(small_job(tmp_path / "c", num_shards=3, samples_per_shard=5, seed=8))
    assert tar_bytes(tmp_path / "c") != a


def test_nodes_split_shards_and_together_match_one_node(tmp_path):
    single = tmp_path / "single"
    split = tmp_path / "split"
    synth.run(small_job(single, num_shards=3, samples_per_shard=4))
    first = synth.run(small_job(split, num_shards=3, samples_per_shard=4, node_rank=0, num_nodes=2))
    assert first["shards_written"] == 2 and first["manifest"] is None  # shard 1 still missing
    second = synth.run(small_job(split, num_shards=3, samples_per_shard=4, node_rank=1, num_nodes=2))
    assert second["shards_written"] == 1 and second["manifest"]
    assert tar_bytes(single) == tar_bytes(split)


def test_node_split_reads_slurm_and_torchrun_variables():
    assert node_split(None, None, {}) == (0, 1)
    assert node_split(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    assert node_split(None, None, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert node_split(1, 2, {"RANK": "3", "WORLD_SIZE": "4"}) == (1, 2)
    assert node_shards(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="node_rank"):
        node_split(2, 2, {})


def test_rerun_keeps_complete_shards_and_refuses_another_config(tmp_path):
    synth.run(small_job(tmp_path))
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    again = synth.run(small_job(tmp_path))
    assert again["shards_written"] == 0 and again["shards_kept"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == mtimes
    with pytest.raises(ValueError, match="another configuration"):
        synth.run(small_job(tmp_path, seed=99))
    redone = synth.run(small_job(tmp_path, seed=99, overwrite=True))
    assert redone["shards_written"] == 2


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match="render.colour_scheme"):
        from_mapping(synth.SyntheticJob, {"out_dir": "x", "render": {"colour_scheme": "dark"}})
    with pytest.raises(ValueError, match="samples_per_shard"):
        synth.SyntheticJob(out_dir="x", samples_per_shard=0)
    with pytest.raises(ValueError, match="ocr.mode"):
        from_mapping(synth.SyntheticJob, {"out_dir": "x", "ocr": {"mode": "sometimes"}})


def test_hydra_configs_compose_and_run(tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="synthetic",
            overrides=[f"out_dir={tmp_path}", "num_shards=1", "samples_per_shard=3", "progress=false", "text=zh"],
        )
        summary = run_job(cfg)
        assert summary["samples_written"] == 3
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert set(manifest["counts"]["language"]) <= {"zh-Hans", "zh-Hant"}
        preview = compose(config_name="preview", overrides=[f"shards={tmp_path}", f"out={tmp_path / 'sheet.png'}"])
        assert run_job(preview)["preview"].endswith("sheet.png")
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] == 3 * 256


@pytest.mark.slow
def test_cli_reports_config_mistakes_in_one_line(tmp_path):
    result = subprocess.run(
        [*CLI, f"out_dir={tmp_path}", "+render.colour_scheme=dark"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "render.colour_scheme" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_after_a_killed_run(tmp_path):
    args = [*CLI, f"out_dir={tmp_path / 'killed'}", "num_shards=4", "samples_per_shard=40", "seed=3", "progress=false"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_stats = tmp_path / "killed" / "synthetic-000000.stats.json"
    deadline = time.time() + 120
    while not first_stats.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_stats.exists()
    complete_before = sorted(p.name for p in (tmp_path / "killed").glob("*.stats.json"))
    assert len(complete_before) < 4, "the run finished before it was killed; make it slower"
    kept_mtime = (tmp_path / "killed" / "synthetic-000000.tar").stat().st_mtime_ns

    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "killed" / "synthetic-000000.tar").stat().st_mtime_ns == kept_mtime
    assert not list((tmp_path / "killed").glob("*.tmp-*"))

    fresh = [*CLI, f"out_dir={tmp_path / 'fresh'}", "num_shards=4", "samples_per_shard=40", "seed=3", "progress=false"]
    subprocess.run(fresh, cwd=REPO, check=True, capture_output=True)
    assert tar_bytes(tmp_path / "killed") == tar_bytes(tmp_path / "fresh")
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["num_samples"] == 160


def test_verify_stage_filters_counts_and_skips_bad_samples(tmp_path):
    from data_pipelines.core.shards import AtomicShardWriter, iter_tar_samples
    from data_pipelines.jobs.verify import VerifyJob
    from data_pipelines.jobs.verify import run as verify_run

    src = tmp_path / "rendered"
    synth.run(small_job(src, num_shards=2, samples_per_shard=4))
    # Corrupt one sample of shard 1 (an undecodable image) and blank another's text.
    samples = list(iter_tar_samples(src / "synthetic-000001.tar"))
    samples[0]["jpg"] = b"not a jpeg"
    writer = AtomicShardWriter(src / "synthetic-000001.tar")
    for s in samples:
        writer.write(s["__key__"], {k: v for k, v in s.items() if k != "__key__"})
    writer.commit()

    out = tmp_path / "verified"
    summary = verify_run(VerifyJob(in_dir=str(src), out_dir=str(out), progress=False))
    assert summary["shards_verified"] == 2 and summary["manifest"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"undecodable": 1}
    ocr = manifest["counts"]["ocr"]
    assert sum(ocr.values()) == 7 and manifest["num_samples"] == 7 - ocr.get("dropped", 0)
    verified = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False, empty_check=False))
    for s in verified:
        meta = SampleMeta.from_json(s["json"])
        assert meta.ocr["mode"] == "crops"
        assert all(line.ocr_text is not None or "ko" in line.language for line in meta.lines)
    again = verify_run(VerifyJob(in_dir=str(src), out_dir=str(out), progress=False))
    assert again["shards_verified"] == 0
    with pytest.raises(ValueError, match="differ"):
        VerifyJob(in_dir=str(src), out_dir=str(src))


def test_missing_required_keys_are_named():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="verify", overrides=["out_dir=/tmp/x"])
        with pytest.raises(ValueError, match="in_dir is required"):
            run_job(cfg)
