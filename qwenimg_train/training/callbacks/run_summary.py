"""Throughput (`perf/samples_per_s`, `perf/tokens_per_s`) and the run's summary.

Lightning's ThroughputMonitor needs FLOP counts and a device with a known peak to
be useful and logs under its own names; this is the few lines the run needs.
`summary()` gives steps, mean loss per stage and per stage × task, and throughput;
`train()` writes it to `<output_dir>/summary.json`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class RunSummary(pl.Callback):
    def __init__(self):
        self.stages: dict[str, dict[str, Any]] = {}
        self._t0: float | None = None
        self._fit_start: float | None = None
        self.samples = 0
        self.tokens = 0
        self.timed = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = pl_module.last_step_stats
        if not stats or self._t0 is None:
            return
        elapsed = time.perf_counter() - self._t0
        self.samples += stats["samples"]
        self.tokens += stats["tokens"]
        self.timed += elapsed
        pl_module.log_dict({"perf/samples_per_s": stats["samples"] / elapsed, "perf/tokens_per_s": stats["tokens"] / elapsed},
                           on_step=True, on_epoch=False, batch_size=1)
        stage = self.stages.setdefault(stats["stage"], {"steps": 0, "loss_sum": 0.0, "tasks": {}})
        stage["steps"] += 1
        stage["loss_sum"] += stats["loss"]
        for task, (total, count) in stats["by_task"].items():
            t = stage["tasks"].setdefault(task, [0.0, 0])
            t[0] += total
            t[1] += count

    def summary(self, trainer) -> dict[str, Any]:
        stages = {
            name: {
                "steps": s["steps"],
                "loss": s["loss_sum"] / max(1, s["steps"]),
                "loss_by_task": {t: total / count for t, (total, count) in sorted(s["tasks"].items())},
                "samples_by_task": {t: count for t, (_, count) in sorted(s["tasks"].items())},
            }
            for name, s in self.stages.items()
        }
        return {
            "global_step": trainer.global_step,
            "stages": stages,
            "throughput": {
                "samples_per_s": self.samples / self.timed if self.timed else None,
                "tokens_per_s": self.tokens / self.timed if self.timed else None,
            },
            "fit_seconds": time.perf_counter() - self._fit_start if self._fit_start else None,
        }
