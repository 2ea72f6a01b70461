"""Ablation sweeps: the sweep presets and the SLURM launcher config compose, the
curriculum-wide mixes reach every stage, `qwenimg-sweep-report` on fabricated sweep
folders (OCR columns, failed, incomplete and never-started jobs, bad input), and one
real multirun of the smoke experiment read back by the report."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_train, debug_overrides
from qwenimg_train.data.curriculum import Curriculum
from qwenimg_train.tools.sweep_report import SweepReportJob, sweep_report


def _expand(cfg) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a composed config's sweeper params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
            for job in batch]


# --- sweep presets and launcher configs ------------------------------------------------------


@pytest.mark.parametrize("preset, jobs", [("curriculum", 5), ("data_mix", 3), ("task_mix", 3)])
def test_sweep_presets_expand_to_valid_jobs(preset, jobs):
    """Each preset turns on multirun and expands to jobs whose configs pass the curriculum's validation."""
    cfg = compose_train(["experiment=smoke", f"sweep={preset}"], hydra_cfg=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    expanded = _expand(cfg)
    assert len(expanded) == jobs
    seen = []
    for job in expanded:
        curriculum = Curriculum.from_config(compose_train(["experiment=smoke", *job]).curriculum)
        seen.append((curriculum.name, [(s.source_weights, s.task_mix) for s in curriculum.stages]))
    assert len({repr(s) for s in seen}) == jobs  # every job trains something different
    if preset == "curriculum":
        assert [name for name, _ in seen] == [
            "three_stage", "single_stage", "report_recipe", "three_stage_reversed", "three_stage_replay"]
    if preset == "data_mix":  # one mix in all three stages, the default recipe among them
        assert [[w["design"] for w, _ in stages] for _, stages in seen] == [[0.2] * 3, [0.4] * 3, [0.6] * 3]
    if preset == "task_mix":
        assert [stages[2][1] for _, stages in seen][0] == {"t2i": 1.0, "ti2i": 0.0, "i2i": 0.0}


def test_curriculum_wide_mix_replaces_every_stage():
    mix = "curriculum.task_mix={t2i:0.5,ti2i:0.25,i2i:0.25}"
    for name in ("three_stage", "single_stage", "report_recipe"):
        curriculum = Curriculum.from_config(compose_train([f"curriculum={name}", mix]).curriculum)
        assert all(s.task_mix == {"t2i": 0.5, "ti2i": 0.25, "i2i": 0.25} for s in curriculum.stages), name
    default = Curriculum.from_config(compose_train([]).curriculum)
    assert [s.task_mix["t2i"] for s in default.stages] == [0.8, 0.8, 0.7]  # null: each stage's own
    with pytest.raises(ValueError, match="no_text.*negative"):
        Curriculum.from_config(compose_train(["curriculum.source_weights={design:-1.0}"]).curriculum)
    with pytest.raises(ValueError, match="unknown key"):
        Curriculum.from_config({"name": "x", "stages": {}, "resolutions": 256})


def test_slurm_launcher_composes_to_an_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm: values from QWENIMG_SLURM_* and overrides, one task per GPU; the
    parameters are handed to submitit exactly as the launcher plugin does, up to the sbatch text
    (a fake `srun` on PATH stands in for a cluster)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    for key in ("PARTITION", "ACCOUNT", "QOS", "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "MEM_GB", "TIMEOUT_MIN"):
        monkeypatch.delenv(f"QWENIMG_SLURM_{key}", raising=False)  # the defaults, whatever this shell sets
    default = compose_train(["hydra/launcher=slurm"], hydra_cfg=True).hydra.launcher
    assert default.partition is None and default.timeout_min == 240 and default.tasks_per_node == 8

    for key, value in {"PARTITION": "gpu", "NODES": "2", "GPUS_PER_NODE": "4", "TIMEOUT_MIN": "90"}.items():
        monkeypatch.setenv(f"QWENIMG_SLURM_{key}", value)
    cfg = compose_train(["experiment=smoke", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    "hydra.launcher.setup=[module load cuda]", "+hydra.launcher.additional_parameters.mail-type=END"],
                   hydra_cfg=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert (params["partition"], params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == ("gpu", 2, 4, 4)
    assert params["submitit_folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # as SlurmLauncher.launch maps them
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m qwenimg_train.training.train", "uid")
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=90",
                 "--mail-type=END", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda\n" in script


def test_submitit_local_launcher_composes():
    cfg = compose_train(["hydra/launcher=submitit_local"], hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


# --- the report on fabricated sweep folders ----------------------------------------------------


def _job(sweep: Path, num: int, overrides: list[str], *, max_steps: int = 10, summary: dict | None = None,
         metrics: list[dict] | None = None, log: str | None = None) -> Path:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    # What train() saves: the composed config, resolved (here the debug preset's).
    config = OmegaConf.to_container(compose_train(["debug=default", f"trainer.max_steps={max_steps}",
                                                   f"paths.output_dir={folder}"]), resolve=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (folder / "logs").mkdir()
        keys = sorted({k for row in metrics for k in row})
        with open(folder / "logs" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(metrics)
    if log is not None:
        (folder / "train.log").write_text(log)
    return folder


def _rows(steps: int, loss: float, *, ocr_at: int | None = None) -> list[dict]:
    rows = []
    for step in range(steps):
        rows.append({"step": step, "train/loss": loss + step, "train/loss/t2i": loss + step,
                     # TI2I only at even steps: NaN (the module's "no sample of this task") at odd ones
                     "train/loss/ti2i": loss + 2 * step if step % 2 == 0 else "nan", "curriculum/stage": 0})
    if ocr_at is not None:
        rows.append({"step": ocr_at, "eval/ocr/char_accuracy": 0.25, "eval/ocr/char_accuracy/en_word": 0.5,
                     "eval/ocr/ned_score": 0.4})
    return rows


OCR_METRICS = {"eval/ocr/char_accuracy": 0.125, "eval/ocr/ned_score": 0.375, "eval/ocr/word_accuracy": 0.0,
               "eval/ocr/char_accuracy/zh_char_l1": 0.0625, "eval/ocr/char_accuracy/en_word": 0.1875}


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    """Four planned jobs (seed=0..3): completed with OCR, failed, incomplete, never started."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    common = ["experiment=smoke", "logger=csv"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": [*common, "seed=0,1,2,3"]}}}))
    summary = {"global_step": 10, "stages": {
        "no_text": {"steps": 5, "loss": 2.0, "loss_by_task": {"t2i": 2.0, "ti2i": 2.5}},
        "complex_layout": {"steps": 5, "loss": 1.0, "loss_by_task": {"t2i": 0.9, "ti2i": 1.5, "i2i": 1.25}}},
        "throughput": {"samples_per_s": 12.5, "tokens_per_s": 800.0}, "fit_seconds": 30.0,
        "ocr_eval": [{"step": 5, "metrics": {k: v / 2 for k, v in OCR_METRICS.items()}},
                     {"step": 10, "metrics": OCR_METRICS}]}
    _job(sweep, 0, [*common, "seed=0"], summary=summary, metrics=_rows(10, 1.0))
    _job(sweep, 1, [*common, "seed=1"], log="[2025-01-01 00:00:00,000][qwenimg-train][INFO] - start\n"
         "[2025-01-01 00:00:01,000][qwenimg-train][ERROR] - job 1 failed: ValueError: model.edit_fusion = 'sum'\n")
    _job(sweep, 2, [*common, "seed=2"], metrics=_rows(4, 3.0, ocr_at=3))
    return sweep


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _valid_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.width > 100


def test_report_lists_every_job_with_its_status_and_ocr(fake_sweep):
    result = sweep_report(SweepReportJob(sweep_dir=str(fake_sweep), final_window=0.2))
    rows = _read_csv(Path(result["csv"]))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "seed=0", "completed"), ("1", "seed=1", "failed"), ("2", "seed=2", "incomplete"),
        ("3", "seed=3", "not started")]
    done, failed, partial, pending = rows
    # completed: steps, throughput and the last OCR evaluation from summary.json
    assert (int(done["steps"]), int(done["max_steps"])) == (10, 10)
    assert float(done["samples_per_s"]) == 12.5 and float(done["fit_seconds"]) == 30.0
    assert int(done["ocr_step"]) == 10
    for key, value in OCR_METRICS.items():
        assert float(done[key.replace("eval/ocr/", "ocr/")]) == value, key
    # final loss: steps 8-9 of 10 (the last 20%); ti2i logged at step 8 only (NaN at 9)
    assert float(done["loss/t2i"]) == pytest.approx((9.0 + 10.0) / 2)
    assert float(done["loss/ti2i"]) == pytest.approx(17.0)
    assert done["loss/i2i"] == ""
    assert float(done["final_stage_loss/i2i"]) == 1.25 and done["final_stage"] == "complex_layout"
    # failed: the error logged by the job, no numbers
    assert "model.edit_fusion = 'sum'" in failed["detail"] and not failed["detail"].startswith("job 1")
    assert failed["steps"] == failed["loss/t2i"] == ""
    # incomplete: numbers from metrics.csv (steps 0-3 logged of 10); OCR from its eval/ocr columns
    assert int(partial["steps"]) == 4 and "last logged step 3 of 10" in partial["detail"]
    assert float(partial["loss/t2i"]) == pytest.approx(6.0)  # ceil(0.2 * 4) = 1 step: step 3
    assert float(partial["ocr/char_accuracy/en_word"]) == 0.5 and int(partial["ocr_step"]) == 3
    assert pending["folder"] == "" and "no job folder" in pending["detail"]

    md = Path(result["markdown"]).read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| job | overrides | status |") and "OCR char_accuracy" in table[0]
    assert sum(line.startswith(f"| {i} | `seed={i}`") for i in range(4) for line in table) == 4
    assert "Overrides shared by every job: `experiment=smoke` `logger=csv`" in md
    assert "| 0 | 10 | 0.125 | 0.1875 | 0.0625 |" in md  # OCR per suite: en_word, zh_char_l1
    assert "## Jobs that did not complete" in md
    for png in result["plots"]:
        _valid_png(Path(png))


def test_report_gives_ocr_per_arm_with_standard_errors(tmp_path):
    """Jobs equal but for the seed are one arm: mean ± SE over seeds (sample SD / sqrt(n))."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    accuracy = {("three_stage", 0): 0.5, ("three_stage", 1): 0.75, ("single_stage", 0): 0.25, ("single_stage", 1): 0.25}
    for num, ((curriculum, seed), value) in enumerate(accuracy.items()):
        metrics = {"eval/ocr/char_accuracy": value, "eval/ocr/char_accuracy/glyph_char": value,
                   "eval/ocr/edit_success/glyph_edit": value / 2}
        summary = {"global_step": 10, "stages": {"all": {"steps": 10, "loss": 1.0, "loss_by_task": {"t2i": 1.0}}},
                   "ocr_eval": [{"step": 10, "metrics": metrics}]}
        _job(sweep, num, ["logger=csv", f"curriculum={curriculum}", f"seed={seed}"], summary=summary)
    result = sweep_report(SweepReportJob(sweep_dir=str(sweep)))
    arms = {a["arm"]: a for a in result["arms"]}
    assert list(arms) == ["curriculum=three_stage", "curriculum=single_stage"]
    mean, se = arms["curriculum=three_stage"]["ocr"]["char_accuracy"]
    assert mean == pytest.approx(0.625) and se == pytest.approx(0.125)  # SD 0.1768 / sqrt(2)
    assert arms["curriculum=single_stage"]["ocr"]["char_accuracy"] == (0.25, 0.0)
    assert arms["curriculum=three_stage"]["seeds"] == ["0", "1"]
    md = Path(result["markdown"]).read_text()
    assert "### OCR per arm" in md
    assert "| `curriculum=three_stage` | 2 | 0.625 ± 0.125 | 0.625 ± 0.125 | 0.312 ± 0.062 |" in md
    rows = _read_csv(Path(result["arms_csv"]))
    assert rows[1]["arm"] == "curriculum=single_stage" and float(rows[1]["ocr/char_accuracy_se"]) == 0.0


def test_report_falls_back_to_summary_without_metrics_csv(tmp_path):
    sweep = tmp_path / "sweep"
    summary = {"global_step": 4, "stages": {"all": {"steps": 4, "loss": 0.5, "loss_by_task": {"t2i": 0.5}}},
               "throughput": {"samples_per_s": 1.0, "tokens_per_s": 2.0}}
    _job(sweep, 0, ["curriculum=single_stage"], max_steps=4, summary=summary)
    _job(sweep, 1, ["curriculum=three_stage"], max_steps=4, summary={**summary, "global_step": 2})
    rows = _read_csv(Path(sweep_report(SweepReportJob(sweep_dir=str(sweep)))["csv"]))
    assert [r["status"] for r in rows] == ["completed", "incomplete"]
    assert rows[1]["detail"] == "stopped at step 2 of 4"
    assert float(rows[0]["loss/t2i"]) == 0.5 and rows[0]["loss_from"] == "summary.json, stage all"
    assert [r["overrides"] for r in rows] == ["curriculum=single_stage", "curriculum=three_stage"]


def test_report_refuses_what_is_not_a_sweep(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sweep_report(SweepReportJob(sweep_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a sweep directory"):
        sweep_report(SweepReportJob(sweep_dir=str(tmp_path / "empty")))
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="single run.*qwenimg-report"):
        sweep_report(SweepReportJob(sweep_dir=str(run)))
    (tmp_path / "no_jobs").mkdir()
    (tmp_path / "no_jobs" / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"_target_": "other"}}}))
    with pytest.raises(ValueError, match="no job yet"):
        sweep_report(SweepReportJob(sweep_dir=str(tmp_path / "no_jobs")))
    with pytest.raises(ValueError, match="final_window"):
        SweepReportJob(sweep_dir=".", final_window=0)
    # the command: one line naming the problem, exit status 2
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.tools.sweep_report", str(tmp_path / "empty")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2 and "not a sweep directory" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.log"))  # the command logs to the terminal only


# --- a real sweep ------------------------------------------------------------------------------


def _losses(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in _read_csv(path):
        for key, value in row.items():
            if key.startswith("train/loss") and value not in ("", None) and not math.isnan(float(value)):
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


@pytest.mark.slow
def test_multirun_of_the_smoke_experiment_and_its_report(tmp_path, shard_sources):
    """`qwenimg-train -m` over two data mixes with a broken value between them: two runs, each in its
    own folder (not the smoke experiment's fixed paths.output_dir, not the first job's), the broken
    job recorded and the sweep carried on; the report's numbers are the runs' own."""
    sweep = tmp_path / "sweep"
    mixes = ["{design:0.4,synthetic:0.6}", "{design:-1.0}", "{design:0.6,synthetic:0.4}"]
    args = ["-m", *debug_overrides(shard_sources, "trainer.max_steps=6", f"hydra.sweep.dir={sweep}",
                                   "curriculum.source_weights=" + ",".join(mixes), models=tmp_path / "models")]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWENIMG_RUN_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    # Hydra runs every job, then fails the command with the broken job's error.
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "source_weights.design = -1.0 is negative" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing went to experiment=smoke's outputs/demo/train
    summaries = {}
    for num in (0, 2):
        job = sweep / str(num)
        summaries[num] = json.loads((job / "summary.json").read_text())
        assert summaries[num]["global_step"] == 6 and summaries[num]["paths"]["output_dir"] == str(job)
        design = {0: 0.4, 2: 0.6}[num]
        assert yaml.safe_load((job / "config.yaml").read_text())["curriculum"]["source_weights"] == \
            {"design": design, "synthetic": round(1 - design, 1)}
    assert not (sweep / "1" / "summary.json").exists() and (sweep / "multirun.yaml").is_file()

    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.tools.sweep_report", str(sweep)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = sweep / "report"
    rows = _read_csv(report / "sweep.csv")
    assert [r["overrides"] for r in rows] == [f"curriculum.source_weights={m}" for m in mixes]
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "is negative" in rows[1]["detail"]
    for num in (0, 2):
        row, summary = rows[num], summaries[num]
        assert int(row["steps"]) == summary["global_step"]
        assert float(row["samples_per_s"]) == summary["throughput"]["samples_per_s"]
        assert float(row["tokens_per_s"]) == summary["throughput"]["tokens_per_s"]
        final = summary["stages"]["complex_layout"]["loss_by_task"]
        for task, value in final.items():
            assert float(row[f"final_stage_loss/{task}"]) == value
        # final loss: the mean of the logged per-task losses over the last 20% of steps (steps 4-5)
        logged = _losses(sweep / str(num) / "logs" / "metrics.csv")
        for task in ("t2i", "ti2i", "i2i"):
            window = [v for step, v in logged.get(f"train/loss/{task}", {}).items() if step >= 4]
            expected = sum(window) / len(window) if window else None
            assert (float(row[f"loss/{task}"]) if row[f"loss/{task}"] else None) == pytest.approx(expected), task
    md = (report / "sweep.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "| `curriculum.source_weights=" in line]
    assert len(table) == 3 and table[1].startswith("| 1 | `curriculum.source_weights={design:-1.0}` | failed |")
    assert table[0].startswith("| 0 | `curriculum.source_weights={design:0.4,synthetic:0.6}` | completed | 6/6 |")
    for png in ("sweep.png", "loss_curves.png"):
        _valid_png(report / png)


@pytest.mark.slow
def test_multirun_with_two_ddp_ranks_per_job(tmp_path, shard_sources):
    """Two jobs in one process under the basic launcher, each relaunching a second DDP rank: each
    rank runs its own job (not the sweep) in the job's folder, and the second job starts clean
    (no process group, no LOCAL_RANK/WORLD_SIZE left by the first)."""
    sweep = tmp_path / "sweep"
    args = ["-m", *debug_overrides(shard_sources, "trainer.max_steps=3", f"hydra.sweep.dir={sweep}", "strategy=ddp",
                                   "trainer.devices=2", "seed=0,1", models=tmp_path / "models")]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWENIMG_RUN_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for num in (0, 1):
        job = sweep / str(num)
        assert json.loads((job / "summary.json").read_text())["global_step"] == 3
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's folder
        assert yaml.safe_load((job / "config.yaml").read_text())["seed"] == num
    assert not (tmp_path / "outputs").exists()
