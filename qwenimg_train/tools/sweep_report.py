"""`qwenimg-sweep-report`: one table, one CSV and plots comparing the runs of a sweep.

    qwenimg-sweep-report outputs/sweeps/2025-01-01_12-00-00              writes <sweep_dir>/report/
    qwenimg-sweep-report sweep_dir=SWEEP out_dir=SWEEP_REPORT final_window=0.1

A sweep directory is what `qwenimg-train -m ...` (or `sweep=<preset>`) writes to
`hydra.sweep.dir`: Hydra's `multirun.yaml` and one folder per job (`0/`, `1/`, ...)
holding `.hydra/overrides.yaml` and the run itself (`summary.json`, `config.yaml`,
`logs/metrics.csv`, the job's log). Under `out_dir` (default `<sweep_dir>/report`):

    sweep.md          the table (one row per job), OCR per suite, definitions, failures
    sweep.csv         the same and more, one row per job, full precision
    arms.csv          OCR per arm (jobs equal but for the seed): mean and standard error
    sweep.png         final loss per task and the last OCR scores, one bar per job
    loss_curves.png   train/loss of every job over steps (smoothed as qwenimg-report does)

Definitions (docs/sweeps.md):
- overrides: the overrides whose values differ between the jobs (the ones all share
  are listed once above the table).
- final loss per task: the mean of the logged `train/loss/<task>` over the last
  `final_window` of the job's steps (0.2: the last 20%; a step whose batch held no
  sample of that task logs NaN and is left out). The same window for every job, so it
  compares runs of equal length: a curriculum's last stage and a single stage's
  whole-run mean would not. Without metrics.csv it falls back to summary.json's final
  stage (the `loss_from` column says which).
- OCR: the last OCR evaluation (`summary.json`'s `ocr_eval`, else the last `eval/ocr/*`
  row of metrics.csv), overall and per suite.
- arms: jobs that differ only in `seed` form one arm; its OCR is the mean over the
  seeds ± the standard error (sample SD / sqrt(seeds); – with one seed), in sweep.md's
  "OCR per arm" table and `arms.csv`.
- status: completed (summary.json, all trainer.max_steps); incomplete (stopped early,
  still running, killed, timed out: no summary.json); failed (the job logged an
  error); not started (in the sweep's override list but without a folder).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenimg_train.config.schema import load_run_config
from qwenimg_train.tools.report import TASKS, _read_json, _table, ema, metrics_csv, read_metrics

log = logging.getLogger("qwenimg-sweep-report")

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OCR_HEADLINE = ("char_accuracy", "ned_score")  # the overall OCR metrics in the Markdown table
LOG_ERROR = re.compile(r"\]\[ERROR\] - (.*)$")  # Hydra's job log format: [time][logger][LEVEL] - message


@dataclass
class SweepReportJob:
    sweep_dir: str
    """A `qwenimg-train -m` sweep directory (hydra.sweep.dir): multirun.yaml and one folder per job."""
    out_dir: str | None = None
    """Where sweep.md, sweep.csv and the plots go; default <sweep_dir>/report."""
    final_window: float = 0.2
    """The share of each job's last steps whose logged losses are averaged into its final loss, in (0, 1]."""

    def __post_init__(self) -> None:
        if not 0 < self.final_window <= 1:
            raise ValueError(f"final_window = {self.final_window} must lie in (0, 1] (0.2: the last 20% of steps)")


@dataclass
class JobRun:
    """One job of the sweep, as far as its folder tells."""

    num: int
    folder: str | None
    """Path of the job's folder; None for a job that never started."""
    overrides: list[str]
    status: str = "completed"
    detail: str = ""
    steps: int | None = None
    max_steps: int | None = None
    loss: dict[str, float | None] = field(default_factory=dict)
    """Final loss per task (t2i, ti2i, i2i) and overall (all); see the module docstring."""
    loss_from: str = ""
    final_stage: str | None = None
    final_stage_loss: dict[str, float] = field(default_factory=dict)
    """summary.json's mean loss per task over the final curriculum stage."""
    ocr_step: int | None = None
    ocr: dict[str, float] = field(default_factory=dict)
    """The last OCR evaluation: `char_accuracy` (overall), `char_accuracy/<suite>`, ..."""
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    fit_seconds: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    """train/loss per logged step, for loss_curves.png."""


# --- finding the jobs ---------------------------------------------------------------------


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: sub-folders with Hydra's `.hydra/overrides.yaml`, in job order."""
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep_dir = {str(sweep_dir)!r} does not exist; pass the hydra.sweep.dir of a "
                         "`qwenimg-train -m ...` run (default outputs/sweeps/<date>_<time>)")
    folders = sorted((d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()),
                     key=lambda d: _natural(d.name))
    if folders or (sweep_dir / "multirun.yaml").is_file():
        return folders
    if (sweep_dir / ".hydra").is_dir() or (sweep_dir / "summary.json").is_file():
        raise ValueError(f"{sweep_dir} is a single run's directory, not a sweep: use qwenimg-report run_dir={sweep_dir}")
    raise ValueError(f"{sweep_dir} is not a sweep directory: it has no multirun.yaml and no job folder with "
                     ".hydra/overrides.yaml; pass the hydra.sweep.dir of a `qwenimg-train -m ...` run")


def planned_jobs(multirun_yaml: Path) -> list[list[str]] | None:
    """Every job's overrides as the basic sweeper expands them from multirun.yaml (its params and
    the command line), in job-number order; None for another sweeper or an unreadable file."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra_cfg = (_yaml(multirun_yaml) or {}).get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    # The sweeper's own order: its params first, then the command line (BasicSweeper.sweep).
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += list((hydra_cfg.get("overrides") or {}).get("task") or [])
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
    except HydraException:
        log.warning("could not expand the sweep in %s: jobs that never started are not listed", multirun_yaml)
        return None
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def varying_keys(jobs: list[JobRun]) -> list[str]:
    """Override keys whose value is not the same in every job (absent counts as a value), in first-seen order."""
    parsed = [dict(_split(o) for o in job.overrides) for job in jobs]
    keys = list(dict.fromkeys(k for overrides in parsed for k in overrides))
    return [k for k in keys if len({overrides.get(k) for overrides in parsed}) > 1]


SEED_KEYS = ("seed", "+seed", "++seed")
"""Override keys that tell seeds of one arm apart (not arms)."""


def arm_label(job: JobRun, keys: list[str]) -> str:
    """The job's label without its seed: the arm it belongs to."""
    return label(job, [k for k in keys if k not in SEED_KEYS])


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample SD / sqrt(n)); no SE from one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def arms(jobs: list[JobRun], keys: list[str]) -> list[dict[str, Any]]:
    """Per arm (jobs equal but for the seed), in first-job order: the completed jobs with an
    OCR evaluation, their seeds, and mean ± SE of every OCR metric they all logged."""
    groups: dict[str, list[JobRun]] = {}
    for j in jobs:
        if j.status == "completed" and j.ocr:
            groups.setdefault(arm_label(j, keys), []).append(j)
    out = []
    for name, members in groups.items():
        metrics = sorted(set.intersection(*(set(j.ocr) for j in members)), key=lambda k: (k.count("/"), k))
        seeds = [dict(_split(o) for o in j.overrides).get("seed", "–") for j in members]
        out.append({"arm": name, "jobs": [j.num for j in members], "seeds": seeds,
                    "ocr": {m: mean_se([j.ocr[m] for j in members]) for m in metrics}})
    return out


def _mean_se_cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "–"
    mean, se = value
    return f"{mean:.3f} ± {se:.3f}" if se is not None else f"{mean:.3f} ± –"


def label(job: JobRun, keys: list[str]) -> str:
    seen = dict(_split(o) for o in job.overrides)
    parts = [f"{k}={seen[k]}" if k in seen else f"(no {k})" for k in keys]
    return " ".join(parts) if parts else f"job {job.num}"


# --- reading one job ----------------------------------------------------------------------


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # absent, or an unresolved interpolation in .hydra/config.yaml


def _error_line(folder: Path) -> str | None:
    """The last ERROR record of the job's Hydra log (`<folder>/*.log`): train.py logs why a job failed."""
    last = None
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = LOG_ERROR.search(line)
            if match:
                last = re.sub(r"^job \S+ failed: ", "", match.group(1))  # train.py's prefix: the row names the job
    return last


def _window_mean(points: list[tuple[int, float]], first_step: int) -> float | None:
    values = [v for step, v in points if step >= first_step]
    return sum(values) / len(values) if values else None


def read_job(num: int, folder: Path, overrides: list[str], final_window: float) -> JobRun:
    job = JobRun(num=num, folder=str(folder), overrides=overrides)
    summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else None
    if (folder / "config.yaml").is_file():  # written by train() once the config validated
        job.max_steps = load_run_config(folder).trainer.max_steps
    elif (folder / ".hydra" / "config.yaml").is_file():
        # A job that failed before its config validated: Hydra's copy, read as far as it goes.
        config = _yaml(folder / ".hydra" / "config.yaml") or {}
        job.max_steps = _int_or_none((config.get("trainer") or {}).get("max_steps"))
    series = None
    if (folder / "logs").is_dir():
        try:
            series = read_metrics(metrics_csv(folder))
        except ValueError:
            series = None  # no CSV logger in this run: summary.json alone
    logged = [step for step, _ in (series or {}).get("train/loss", [])]

    if summary is not None:
        job.steps = summary.get("global_step")
        throughput = summary.get("throughput") or {}
        job.samples_per_s, job.tokens_per_s = throughput.get("samples_per_s"), throughput.get("tokens_per_s")
        job.fit_seconds = summary.get("fit_seconds")
        stages = summary.get("stages") or {}
        if stages:
            job.final_stage = list(stages)[-1]  # RunSummary adds stages in training order
            job.final_stage_loss = dict(stages[job.final_stage].get("loss_by_task") or {})
        history = summary.get("ocr_eval") or []
        if history:
            job.ocr_step = history[-1]["step"]
            job.ocr = _ocr_names(history[-1]["metrics"])
    elif logged:
        job.steps = logged[-1] + 1  # steps are 0-based; an unfinished job has no summary.json
    if not job.ocr and series:
        job.ocr_step, job.ocr = _ocr_from_series(series)

    if series and logged:
        done = max(logged[-1] + 1, job.steps or 0)
        first = done - max(1, math.ceil(final_window * done))
        job.loss = {t: _window_mean(series.get(f"train/loss/{t}", []), first) for t in TASKS}
        job.loss["all"] = _window_mean(series["train/loss"], first)
        job.loss_from = f"metrics.csv, steps {first}-{done - 1}"
        job.curve = series["train/loss"]
    elif job.final_stage is not None:
        stage = summary["stages"][job.final_stage]
        job.loss = {t: job.final_stage_loss.get(t) for t in TASKS}
        job.loss["all"] = stage.get("loss")
        job.loss_from = f"summary.json, stage {job.final_stage}"

    if summary is not None:
        if job.max_steps is not None and (job.steps or 0) < job.max_steps:
            job.status, job.detail = "incomplete", f"stopped at step {job.steps} of {job.max_steps}"
            stopped_by = summary.get("stopped_by")  # train.py's record of a signal (SIGTERM: preemption, time limit)
            if isinstance(stopped_by, dict) and stopped_by.get("signal"):
                job.detail += f" by {stopped_by['signal']}"
        else:
            job.status = "completed"
    else:
        error = _error_line(folder)
        if error is not None:
            job.status, job.detail = "failed", error
        elif logged:
            job.status = "incomplete"
            job.detail = (f"no summary.json; last logged step {logged[-1]}"
                          + (f" of {job.max_steps}" if job.max_steps else "") + " (running, killed or timed out)")
        else:
            job.status, job.detail = "incomplete", "no summary.json and no logged step (pending, running or killed)"
    return job


def _ocr_names(metrics: dict[str, float]) -> dict[str, float]:
    """`eval/ocr/char_accuracy/zh_char_l1` -> `char_accuracy/zh_char_l1` (evaluation.flat_metrics' names)."""
    out = {}
    for key, value in metrics.items():
        name = key.removeprefix("eval/").removeprefix("ocr/")
        out[name] = float(value)
    return out


def _ocr_from_series(series: dict[str, list[tuple[int, float]]]) -> tuple[int | None, dict[str, float]]:
    """The `eval/ocr/*` values of the last step at which any was logged."""
    columns = {k: v for k, v in series.items() if k.startswith("eval/ocr/") and v}
    if not columns:
        return None, {}
    step = max(points[-1][0] for points in columns.values())
    return step, _ocr_names({k: dict(points)[step] for k, points in columns.items() if step in dict(points)})


def read_sweep(sweep_dir: Path, final_window: float) -> tuple[list[JobRun], list[str]]:
    """Every job of the sweep, in job order (jobs that never started included when the sweep
    can be expanded), and the overrides all jobs share."""
    folders = job_folders(sweep_dir)
    planned = planned_jobs(sweep_dir / "multirun.yaml") if (sweep_dir / "multirun.yaml").is_file() else None
    jobs = []
    for i, folder in enumerate(folders):
        overrides = [str(o) for o in (_yaml(folder / ".hydra" / "overrides.yaml") or [])]
        hydra_yaml = folder / ".hydra" / "hydra.yaml"
        num = _int_or_none((((_yaml(hydra_yaml) or {}).get("hydra") or {}).get("job") or {}).get("num")) \
            if hydra_yaml.is_file() else None
        jobs.append(read_job(num if num is not None else i, folder, overrides, final_window))
    if planned is not None:
        started = {tuple(sorted(j.overrides)) for j in jobs}
        for num, overrides in enumerate(planned):
            if tuple(sorted(overrides)) not in started:
                jobs.append(JobRun(num=num, folder=None, overrides=overrides, status="not started",
                                   detail="no job folder: pending, or the sweep stopped before it"))
    if not jobs:
        raise ValueError(f"{sweep_dir} has a multirun.yaml but no job yet: no folder with .hydra/overrides.yaml")
    jobs.sort(key=lambda j: j.num)
    keys = varying_keys(jobs)
    first = dict(_split(o) for o in jobs[0].overrides)
    common = [f"{k}={v}" for k, v in first.items() if k not in keys]
    return jobs, common


# --- writing ------------------------------------------------------------------------------


def csv_rows(jobs: list[JobRun], keys: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    ocr_keys = sorted({k for j in jobs for k in j.ocr}, key=lambda k: (k.count("/"), k))
    header = ["job", "folder", "overrides", "all_overrides", "status", "detail", "steps", "max_steps",
              *[f"loss/{t}" for t in (*TASKS, "all")], "loss_from", "final_stage",
              *[f"final_stage_loss/{t}" for t in TASKS], "ocr_step", *[f"ocr/{k}" for k in ocr_keys],
              "samples_per_s", "tokens_per_s", "fit_seconds"]
    rows = []
    for j in jobs:
        row = {"job": j.num, "folder": j.folder or "", "overrides": label(j, keys), "all_overrides": " ".join(j.overrides),
               "status": j.status, "detail": j.detail, "steps": j.steps, "max_steps": j.max_steps,
               "loss_from": j.loss_from, "final_stage": j.final_stage, "ocr_step": j.ocr_step,
               "samples_per_s": j.samples_per_s, "tokens_per_s": j.tokens_per_s, "fit_seconds": j.fit_seconds}
        row.update({f"loss/{t}": j.loss.get(t) for t in (*TASKS, "all")})
        row.update({f"final_stage_loss/{t}": j.final_stage_loss.get(t) for t in TASKS})
        row.update({f"ocr/{k}": j.ocr.get(k) for k in ocr_keys})
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return header, rows


def _steps(j: JobRun) -> str:
    if j.steps is None:
        return "–"
    return f"{j.steps}/{j.max_steps}" if j.max_steps is not None else str(j.steps)


def write_markdown(path: Path, sweep_dir: Path, jobs: list[JobRun], common: list[str], keys: list[str],
                   final_window: float, plots: list[str]) -> None:
    lines = [f"# Sweep report: `{sweep_dir}`", ""]
    counts = {s: sum(j.status == s for j in jobs) for s in ("completed", "incomplete", "failed", "not started")}
    lines += [f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    if common:
        lines += ["Overrides shared by every job: " + " ".join(f"`{o}`" for o in common), ""]
    has_ocr = any(j.ocr for j in jobs)
    header = ["job", "overrides", "status", "steps", *[f"loss {t}" for t in TASKS], "loss"]
    if has_ocr:
        header += [f"OCR {m}" for m in OCR_HEADLINE]
    header += ["samples/s"]
    rows = []
    for j in jobs:
        row = [j.num, f"`{label(j, keys)}`", j.status, _steps(j), *[j.loss.get(t) for t in (*TASKS, "all")]]
        if has_ocr:
            row += [j.ocr.get(m) for m in OCR_HEADLINE]
        rows.append(row + [j.samples_per_s])
    lines += _table(header, rows) + [""]
    lines += [f"loss: the mean of the logged `train/loss/<task>` (and `train/loss`) over each job's last "
              f"{final_window:.0%} of steps (steps whose batch held none of a task are left out; – : none in "
              "the window); the same window for every job, so it compares runs of equal length. The CSV also "
              "has each job's final-stage means from summary.json (`final_stage_loss/*`).", ""]
    fallbacks = [j for j in jobs if j.loss_from.startswith("summary.json")]
    if fallbacks:
        lines += ["Jobs without metrics.csv (their loss is summary.json's final-stage mean): "
                  + ", ".join(str(j.num) for j in fallbacks), ""]

    lines += ["## OCR", ""]
    if has_ocr:
        suites = sorted({k.split("/", 1)[1] for j in jobs for k in j.ocr if k.startswith("char_accuracy/")})
        lines += ["The last OCR evaluation of each job (`ocr_eval` in summary.json, else metrics.csv), character "
                  "accuracy overall and per suite / GB 2312 level / language:", ""]
        lines += _table(["job", "eval step", "overall", *suites],
                        [[j.num, j.ocr_step, j.ocr.get("char_accuracy"), *[j.ocr.get(f"char_accuracy/{s}")
                                                                           for s in suites]]
                         for j in jobs if j.ocr]) + [""]
        lines += ["Every metric (word accuracy, NED, exact, edit success...) per group is in sweep.csv.", ""]
        grouped = arms(jobs, keys)
        if any(len(a["jobs"]) > 1 for a in grouped):
            lines += ["### OCR per arm", "",
                      "Jobs that differ only in `seed` are one arm: the mean over its seeds ± the standard error "
                      "(sample SD / sqrt(seeds)) of the last evaluation's character accuracy (and edit success "
                      "where an edit suite ran); every metric is in arms.csv.", ""]
            edit_suites = sorted({k.split("/", 1)[1] for a in grouped for k in a["ocr"] if k.startswith("edit_success/")})
            lines += _table(["arm", "seeds", "overall", *suites, *[f"edit success {s}" for s in edit_suites]],
                            [[f"`{a['arm']}`", len(a["jobs"]), _mean_se_cell(a["ocr"].get("char_accuracy")),
                              *[_mean_se_cell(a["ocr"].get(f"char_accuracy/{s}")) for s in suites],
                              *[_mean_se_cell(a["ocr"].get(f"edit_success/{s}")) for s in edit_suites]]
                             for a in grouped]) + [""]
    else:
        lines += ["No job ran an OCR evaluation (callbacks.ocr_eval was null): no OCR columns.", ""]

    problems = [j for j in jobs if j.status != "completed"]
    if problems:
        lines += ["## Jobs that did not complete", ""]
        lines += _table(["job", "status", "detail", "folder"],
                        [[j.num, j.status, j.detail, f"`{j.folder}`" if j.folder else "–"] for j in problems])
        lines.append("")

    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Jobs", ""] + [f"- {j.num}: `{j.folder or '(no folder)'}`" for j in jobs]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def _wrapped(text: str, width: int = 40) -> str:
    """A long override label over several lines (the differing part is often at the end)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def plot_comparison(path: Path, jobs: list[JobRun], keys: list[str]) -> None:
    """Horizontal grouped bars, one group per job: the final loss per task, and the last OCR
    scores (overall); a job without values says why."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    has_ocr = any(j.ocr for j in jobs)
    panels = [("final loss per task (last steps)", [(t, {j.num: j.loss.get(t) for j in jobs}) for t in TASKS])]
    if has_ocr:
        panels.append(("OCR (last evaluation, overall)", [(m, {j.num: j.ocr.get(m) for j in jobs})
                                                          for m in OCR_HEADLINE]))
    names = [_wrapped(f"{j.num}: {label(j, keys)}" + ("" if j.status == "completed" else f" ({j.status})"))
             for j in jobs]
    lines = sum(max(2, n.count("\n") + 1) for n in names)
    fig = Figure(figsize=(5.5 * len(panels) + 4.0, 1.5 + 0.35 * lines), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = colormaps["tab10"].colors
    for ax, (title, series) in zip(axes, panels):
        bar = 0.8 / len(series)
        for k, (name, values) in enumerate(series):
            ys = [i + (k - (len(series) - 1) / 2) * bar for i in range(len(jobs))]
            widths = [values[j.num] if values[j.num] is not None else 0.0 for j in jobs]
            ax.barh(ys, widths, height=bar, color=colors[(k + 3) % len(colors)], label=name)
            for y, j in zip(ys, jobs):
                if values[j.num] is not None:
                    ax.text(values[j.num], y, f" {values[j.num]:.3g}", va="center", fontsize=7)
        for i, j in enumerate(jobs):
            if all(values[j.num] is None for _, values in series):
                ax.text(0, i, f"  {j.status}" + ("" if j.status != "completed" else ": not logged"), va="center",
                        fontsize=8, color="0.4")
        ax.set_yticks(range(len(jobs)))
        ax.set_yticklabels(names if ax is axes[0] else [f"{j.num}" for j in jobs], fontsize=8)
        ax.invert_yaxis()  # job 0 at the top, as in the table
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)


def plot_curves(path: Path, jobs: list[JobRun], keys: list[str]) -> bool:
    """train/loss of every job over steps: faint raw points under the smoothed curve (report.ema)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    with_curves = [j for j in jobs if j.curve]
    if not with_curves:
        return False
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab10"].colors
    for i, j in enumerate(with_curves):
        steps, values = zip(*j.curve)
        color = colors[i % len(colors)]
        weight = min(0.9, max(0.0, 1 - 10 / len(values)))  # as qwenimg-report: short curves do not lag
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema(list(values), weight), color=color, linewidth=1.6, label=_wrapped(f"{j.num}: {label(j, keys)}", 60))
    ax.set_title("train/loss per job", fontsize=10, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)
    return True


def sweep_report(job: SweepReportJob) -> dict[str, Any]:
    """Write sweep.md, sweep.csv and the plots; return their paths and the rows."""
    sweep_dir = Path(job.sweep_dir)
    jobs, common = read_sweep(sweep_dir, job.final_window)
    keys = varying_keys(jobs)
    out = Path(job.out_dir) if job.out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    header, rows = csv_rows(jobs, keys)
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    grouped = arms(jobs, keys)
    metrics = list(dict.fromkeys(m for a in grouped for m in a["ocr"]))
    with open(out / "arms.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "jobs", "seeds", *[c for m in metrics for c in (f"ocr/{m}", f"ocr/{m}_se")]])
        for a in grouped:
            cells = [a["ocr"].get(m, (None, None)) for m in metrics]
            writer.writerow([a["arm"], " ".join(map(str, a["jobs"])), " ".join(a["seeds"]),
                             *[("" if v is None else v) for cell in cells for v in cell]])
    plot_comparison(out / "sweep.png", jobs, keys)
    plots = ["sweep.png"]
    if plot_curves(out / "loss_curves.png", jobs, keys):
        plots.append("loss_curves.png")
    write_markdown(out / "sweep.md", sweep_dir, jobs, common, keys, job.final_window, plots)
    for j in jobs:
        if j.status != "completed":
            log.warning("job %s %s: %s", j.num, j.status, j.detail)
    log.info("sweep report in %s: sweep.md, sweep.csv, %s", out, ", ".join(plots))
    return {"out_dir": str(out), "markdown": str(out / "sweep.md"), "csv": str(out / "sweep.csv"),
            "arms_csv": str(out / "arms.csv"), "plots": [str(out / p) for p in plots], "rows": rows, "arms": grouped}


if __name__ == "__main__":
    from qwenimg_train.cli import sweep_report as main

    main()
