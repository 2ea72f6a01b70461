"""The reference loss curve (as torchtitan keeps one): the debug run (configs/debug/default.yaml
on the `shard_sources` shards, seed 0, CPU fp32) must give the per-step training losses
committed in tests/golden/smoke_losses.json. A change that shifts every run (the objective,
the model, its initialisation, the loader's order, the optimizer) fails here even when each
unit test still passes.

A change meant to move the curve rewrites the file on purpose:

    QWENIMG_UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_golden.py

then review the diff of tests/golden/smoke_losses.json and commit it (docs/training.md,
Reference curve). The file's `glyph_run` entry is the glyph world's OCR at its stage
ends, checked by tests/test_learns_to_write.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from conftest import compose_debug
from qwenimg_train.training.train import train

GOLDEN = Path(__file__).parent / "golden" / "smoke_losses.json"
UPDATE = "QWENIMG_UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_golden.py"
# Same machine, same code: the losses agree to float32 rounding. Other CPUs and thread counts
# reorder float sums; 1e-4 relative leaves room for that and none for a real change.
REL, ABS = 1e-4, 1e-5


def _losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        by_step = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(by_step) == list(range(len(by_step))), sorted(by_step)  # one loss per step, none missing
    return [by_step[step] for step in range(len(by_step))]


def test_debug_run_follows_the_reference_curve(tmp_path, shard_sources):
    run = tmp_path / "train"
    train(compose_debug(shard_sources, out=run, models=tmp_path / "models"))
    losses = _losses(run)
    doc = json.loads(GOLDEN.read_text())
    if os.environ.get("QWENIMG_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({**doc, "train/loss": losses}, indent=1) + "\n")
        pytest.skip(f"QWENIMG_UPDATE_GOLDEN=1: rewrote {GOLDEN}; review its diff and commit it")
    golden = doc["train/loss"]
    assert len(losses) == len(golden), f"{len(losses)} steps logged, the reference curve has {len(golden)}"
    off = [f"step {step}: {got!r}, reference {want!r} (diff {got - want:+.3g})"
           for step, (got, want) in enumerate(zip(losses, golden))
           if not math.isclose(got, want, rel_tol=REL, abs_tol=ABS)]
    assert not off, (f"the debug run left the reference curve {GOLDEN.name} (rel {REL}, abs {ABS}):\n  "
                     + "\n  ".join(off)
                     + f"\nIf the change is meant to move every run, rewrite the curve: {UPDATE}")
