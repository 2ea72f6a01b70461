"""Fault injection on the tiny model: what the trainer promises under each fault
(docs/reliability.md), checked by causing the fault.

Non-finite losses: injected by wrapping the objective so that chosen steps return NaN
(in-process), or through `tests/faults/sitecustomize.py` in subprocess runs (every
rank a Lightning strategy launches imports it; `QWENIMG_FAULT_NAN_STEPS` and
`QWENIMG_FAULT_NAN_RANK` choose the steps and the rank).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_train, debug_overrides
from qwenimg_train.training.train import train

FAULTS = Path(__file__).parent / "faults"


def _overrides(out: Path, models: Path, sources: dict, *extra: str) -> list[str]:
    return debug_overrides(sources, "trainer.max_steps=6", "callbacks.ema=null", *extra, out=out, models=models)


class _Recorder:
    """Wraps QwenImageModule.training_step: the trainable weights at each step's start,
    and NaN losses at `bad` steps."""

    def __init__(self, monkeypatch, bad: set[int]):
        from qwenimg_train.training import module

        self.weights: dict[int, torch.Tensor] = {}
        real_step, real_loss = module.QwenImageModule.training_step, module.flow_matching_loss
        recorder = self

        def training_step(self, batch, batch_idx):
            recorder.step = self.global_step
            recorder.weights[self.global_step] = torch.cat(
                [p.detach().flatten().clone() for p in self.parameters() if p.requires_grad])
            return real_step(self, batch, batch_idx)

        def loss(*args, **kwargs):
            losses = real_loss(*args, **kwargs)
            return losses * float("nan") if recorder.step in bad else losses

        monkeypatch.setattr(module.QwenImageModule, "training_step", training_step)
        monkeypatch.setattr(module, "flow_matching_loss", loss)


def _metric(run: Path, key: str) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, shard_sources, monkeypatch, record_fault):
    rec = _Recorder(monkeypatch, bad={2, 3})
    summary = train(compose_train(_overrides(tmp_path / "run", tmp_path / "models", shard_sources,
                                        "callbacks.nonfinite.max_consecutive=3")))
    assert summary["global_step"] == 6 and summary["nonfinite_skipped"] == 2
    # the skipped updates changed nothing; the others did
    assert torch.equal(rec.weights[2], rec.weights[3]) and torch.equal(rec.weights[3], rec.weights[4])
    assert not torch.equal(rec.weights[1], rec.weights[2]) and not torch.equal(rec.weights[4], rec.weights[5])
    assert torch.isfinite(rec.weights[5]).all()
    counts = _metric(tmp_path / "run", "train/nonfinite_skipped")
    assert counts[1] == 0 and counts[2] == 1 and counts[5] == 2
    record_fault("NaN loss at steps 2 and 3", "both updates skipped (weights unchanged), counted 2, run ends at step 6")


def test_persistent_nonfinite_saves_and_stops_naming_the_batch(tmp_path, shard_sources, monkeypatch, record_fault):
    from qwenimg_train.training.callbacks.nonfinite import NonFiniteLossError

    rec = _Recorder(monkeypatch, bad={2, 3, 4, 5})
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row .*step 4, stage 'complex_layout', batch keys \['"):
        train(compose_train(_overrides(tmp_path / "run", tmp_path / "models", shard_sources,
                                  "callbacks.nonfinite.max_consecutive=3")))
    saved = tmp_path / "run" / "checkpoints" / "nonfinite-step000004.ckpt"
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    weights = torch.cat([v.flatten() for k, v in state["state_dict"].items()])
    assert torch.isfinite(weights).all()
    assert torch.equal(rec.weights[2], rec.weights[4])  # the last good weights, unchanged since step 2
    record_fault("NaN loss from step 2 on", "3 in a row: checkpoint of the last good weights, error names step 4, "
                 "stage and batch keys")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3"])
def test_nonfinite_on_one_rank_skips_on_every_rank(strategy, tmp_path, shard_sources, record_fault):
    """A NaN on rank 1 only: DDP averages it into both ranks' gradients, DeepSpeed's
    all-reduced gradient norm sees it; either way both ranks skip the same update and
    finish in step."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWENIMG_FAULT_NAN_STEPS="2", QWENIMG_FAULT_NAN_RANK="1",
               PYTHONPATH=os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("QWENIMG_RUN_DIR", None)
    run = tmp_path / "run"
    args = _overrides(run, tmp_path / "models", shard_sources, f"strategy={strategy}", "trainer.devices=2",
                      "data.num_workers=1")
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fault injected: NaN loss at step 2 on rank 1" in proc.stderr
    counts = _metric(run, "train/nonfinite_skipped")
    assert counts[1] == 0 and counts[2] == 1 and counts[5] == 1
    losses = _metric(run, "train/loss")
    assert sorted(losses) == list(range(6))
    assert all(losses[s] == losses[s] for s in (3, 4, 5))  # finite after the skip (rank 0's losses)
    record_fault(f"NaN loss on rank 1 of 2 at step 2 ({strategy})", "both ranks skip the update, run ends at step 6")


# --- SIGKILL at random points, SIGTERM: resume from the last complete checkpoint --------------

def _run_cli(args: list[str], cwd: Path, fault: dict[str, str] | None = None, check: bool = True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(fault or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")])
    env.pop("QWENIMG_RUN_DIR", None)
    # a session of its own: a group-wide SIGTERM reaches the run and its loader workers only
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _per_step(run: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, curriculum stage index) as the run logged them."""
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    stage = {int(r["step"]): float(r["curriculum/stage"]) for r in rows if r.get("curriculum/stage")}
    return {s: (loss[s], stage[s]) for s in loss}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_sources):
    """An uninterrupted run: 6 steps, stages at steps 0-1 / 2-3 / 4-5, one loader worker."""
    root = tmp_path_factory.mktemp("reference")
    _run_cli(_fault_args(root / "run", root / "models", shard_sources), root)
    return _per_step(root / "run")


def _fault_args(run: Path, models: Path, sources: dict, *extra: str) -> list[str]:
    return _overrides(run, models, sources, "callbacks.checkpoint.every_n_train_steps=2",
                      "callbacks.checkpoint.stage_end=false", "data.num_workers=1", *extra)


# A seeded "random" mid-step kill point, the stage switch, and the middle of a save are the
# places a kill can land that matter: state half-updated, loader half-built, file half-written.
KILL_STEP = random.Random(9).randrange(1, 6)


@pytest.mark.slow
@pytest.mark.parametrize("fault,resumes_at", [
    (f"KILL@step:{KILL_STEP}", KILL_STEP // 2 * 2),  # the last periodic checkpoint before the kill
    ("KILL@stage_switch:2", 4),                      # stage 2 starts at step 4, just checkpointed
    ("KILL@save:3", 2),                              # files 1-2: step000002 + last; file 3 (step 4) torn
])
def test_sigkill_then_resume_continues_exactly(fault, resumes_at, reference, tmp_path, shard_sources, record_fault):
    run = tmp_path / "run"
    args = _fault_args(run, tmp_path / "models", shard_sources)
    killed = _run_cli(args, tmp_path, {"QWENIMG_FAULT_SIGNAL": fault}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "fault injected: SIGKILL" in killed.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == resumes_at
    _run_cli(args + ["ckpt_path=last"], tmp_path)
    resumed = _per_step(run)
    assert sorted(resumed) == list(range(resumes_at, 6))  # ends at the configured step count
    for step, (loss, stage) in resumed.items():
        assert stage == reference[step][1], step  # the curriculum position
        assert loss == pytest.approx(reference[step][0], abs=1e-5), step  # the data position and weights
    assert not list((run / "checkpoints").glob("*.tmp"))
    record_fault(fault, f"resumed from the step-{resumes_at} checkpoint, losses and stages equal the uninterrupted "
                 "run to step 6")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path, shard_sources, record_fault):
    """SIGTERM to the whole process group (as SLURM sends it) in the middle of step 3: the
    step finishes, last.ckpt is written at step 4, the process exits 0; the resumed run
    finishes steps 4-5 exactly as the uninterrupted one."""
    run = tmp_path / "run"
    args = _fault_args(run, tmp_path / "models", shard_sources)
    stopped = _run_cli(args, tmp_path, {"QWENIMG_FAULT_SIGNAL": "TERM@step:3"})
    assert "fault injected: SIGTERM" in stopped.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == {"signal": "SIGTERM", "step": 4} and summary["global_step"] == 4
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    first = _per_step(run)
    assert sorted(first) == [0, 1, 2, 3]
    _run_cli(args + ["ckpt_path=last"], tmp_path)
    resumed = _per_step(run)
    assert sorted(resumed) == [4, 5]
    for step, (loss, stage) in {**first, **resumed}.items():
        assert stage == reference[step][1] and loss == pytest.approx(reference[step][0], abs=1e-5), step
    record_fault("SIGTERM to the process group mid-step 3", "last.ckpt at step 4, exit 0, exact resume to step 6")


# --- disk full while saving ----------------------------------------------------------------

def _tree_digest(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_the_data(tmp_path, shard_sources, monkeypatch,
                                                                             record_fault):
    """The second periodic save hits ENOSPC half-way through writing: a clear error, the
    torn file removed, last.ckpt still the step-2 checkpoint and loadable, the shards
    untouched; resuming (with space again) finishes the run."""
    import errno

    import lightning.fabric.plugins.io.torch_io as torch_io

    from qwenimg_train.training.callbacks.checkpoint import CheckpointWriteError

    before = {name: _tree_digest(Path(folder)) for name, folder in shard_sources.items()}
    real_save, calls = torch_io._atomic_save, [0]

    def full_disk(checkpoint, path):
        calls[0] += 1
        if calls[0] == 3:  # step 2: step000002 and last; step 4: step000004 fails
            with open(path, "wb") as handle:
                handle.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    args = _overrides(tmp_path / "run", tmp_path / "models", shard_sources, "callbacks.checkpoint.every_n_train_steps=2",
                      "callbacks.checkpoint.stage_end=false")
    with pytest.raises(CheckpointWriteError, match=r"step000004\.ckpt at step 4 \(OSError: \[Errno 28\] No space left "
                                                   r"on device.*intact \(last\.ckpt, step000002\.ckpt\).*ckpt_path=last"):
        train(compose_train(args))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step000002.ckpt"]  # no torn .tmp
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    assert {name: _tree_digest(Path(folder)) for name, folder in shard_sources.items()} == before
    monkeypatch.setattr(torch_io, "_atomic_save", real_save)
    assert train(compose_train(args + ["ckpt_path=last"]))["global_step"] == 6
    record_fault("ENOSPC half-way through a checkpoint write", "clear error, torn file removed, last.ckpt (step 2) "
                 "and shards intact, resume ends at step 6")


def test_unwritable_output_dir_fails_before_any_work(tmp_path, shard_sources):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    with pytest.raises(ValueError, match=r"paths.output_dir = .*file/run' is not writable"):
        train(compose_train(_overrides(blocker / "run", tmp_path / "models", shard_sources)))
