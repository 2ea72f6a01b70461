"""Throughput (`perf/samples_per_s`, `perf/tokens_per_s`) and the run's summary.

Lightning's ThroughputMonitor needs FLOP counts and a device with a known peak to
be useful and logs under its own names; this is the few lines the run needs.
`summary()` gives steps, mean loss per stage and per stage × task, samples per task
and throughput, over every rank; `train()` writes it to `<output_dir>/summary.json`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


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
        """The run's figures over every rank: each stage's mean loss (over its steps and
        the ranks), samples per task summed, throughput summed (the logged `perf/*` are
        rank 0's). With several ranks this is a collective: every rank calls it after fit."""
        parts = self._gathered(trainer)
        stages: dict[str, dict[str, Any]] = {}
        for part in parts:
            for name, s in part["stages"].items():
                merged = stages.setdefault(name, {"steps": s["steps"], "loss_sum": 0.0, "n": 0, "tasks": {}})
                merged["loss_sum"] += s["loss_sum"]
                merged["n"] += s["steps"]
                for task, (total, count) in s["tasks"].items():
                    t = merged["tasks"].setdefault(task, [0.0, 0])
                    t[0] += total
                    t[1] += count

        def rate(key: str) -> float | None:
            rates = [p[key] / p["timed"] for p in parts if p["timed"]]
            return sum(rates) if rates else None

        return {
            "global_step": trainer.global_step,
            "stages": {
                name: {
                    "steps": s["steps"],
                    "loss": s["loss_sum"] / max(1, s["n"]),
                    "loss_by_task": {t: total / count for t, (total, count) in sorted(s["tasks"].items())},
                    "samples_by_task": {t: count for t, (_, count) in sorted(s["tasks"].items())},
                }
                for name, s in stages.items()
            },
            "throughput": {"samples_per_s": rate("samples"), "tokens_per_s": rate("tokens"), "ranks": len(parts)},
            "fit_seconds": time.perf_counter() - self._fit_start if self._fit_start else None,
        }

    def _gathered(self, trainer) -> list[dict[str, Any]]:
        mine = {"stages": self.stages, "samples": self.samples, "tokens": self.tokens, "timed": self.timed}
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [mine]
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, mine)
        return parts
