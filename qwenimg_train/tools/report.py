"""`qwenimg-report`: plots and a Markdown summary of a training run directory.

    qwenimg-report run_dir=outputs/demo/train                        writes outputs/demo/train/report/
    qwenimg-report run_dir=RUN out_dir=RUN_REPORT eval_json=outputs/demo/eval/ocr.json samples_dir=outputs/demo/samples

Reads what `qwenimg-train` writes (`logs/metrics.csv` from the CSV logger,
`summary.json`, `config.yaml`) and writes, under `out_dir` (default `<run_dir>/report`):

    loss.png          the loss per curriculum stage and per task (t2i, ti2i, i2i) over steps
    lr.png            the learning rate of each parameter group
    throughput.png    samples/s and tokens/s
    sigma.png         the loss per σ bucket
    ocr.png           the OCR metrics a validation callback logged (`eval/ocr/<metric>/<suite>`, or
                      `eval/ocr/<suite>/<metric>`) against training steps: one panel per metric (character
                      accuracy first), one line with markers per suite plus the overall mean, a dashed
                      line at every stage boundary (skipped with a note if none). summary.md tabulates
                      the same points (character accuracy per suite at each evaluated step)
    samples.png       the latest sample grid (`<samples_dir>/grid.png`, from qwenimg-sample), when there is one
    eval_<suite>.png  the latest validation grids (`<run_dir>/eval/step<N>/<suite>.png`), when there are some
    summary.md        config highlights, steps, loss per stage × task, throughput, OCR tables, links to the above

Per-step curves are drawn as faint raw points under a bias-corrected exponential moving
average (`smoothing`, TensorBoard's convention, capped at 1 − 10/n for a curve of n
points so that short curves do not lag; 0 draws the raw points only). Stage
boundaries come from the changes of the logged `curriculum/stage` index; each is a
dashed line with the stage's name. matplotlib draws through its Agg canvas (no
display, no pyplot state).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.core.schema import Task
from qwenimg_train.config.schema import TrainConfig, load_run_config

log = logging.getLogger("qwenimg-report")

TASKS = tuple(t.value for t in Task)
STAGE_PREFIX = "train/loss/stage/"
SIGMA_PREFIX = "train/loss/sigma_"
EVAL_PREFIX = "eval/"

Series = list[tuple[int, float]]


@dataclass
class ReportJob:
    run_dir: str
    """A qwenimg-train output directory (paths.output_dir)."""
    out_dir: str | None = None
    """Where the plots and summary.md go; default <run_dir>/report."""
    eval_json: str | None = None
    """A JSON file of final metrics (e.g. qwenimg-eval's eval/ocr.json), tabulated in summary.md."""
    samples_dir: str | None = None
    """A qwenimg-sample out_dir whose grid.png is copied in; default <run_dir>/samples when it exists."""
    smoothing: float = 0.9
    """EMA weight of the smoothed curves, in [0, 1); 0 draws raw points only."""

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing = {self.smoothing} must lie in [0, 1) (0: no smoothing)")


@dataclass
class Segment:
    """A run of consecutive logged steps in one curriculum stage."""

    index: int
    name: str
    start: int
    end: int  # last logged step


@dataclass
class RunLogs:
    series: dict[str, Series]
    segments: list[Segment]
    summary: dict[str, Any] | None
    config: TrainConfig | None
    notes: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------


def metrics_csv(run_dir: Path) -> Path:
    """`logs/metrics.csv` (this project's CSV logger config), else the newest `logs/version_*/metrics.csv`."""
    path = run_dir / "logs" / "metrics.csv"
    if path.is_file():
        return path
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if versions:
        return versions[-1]
    raise ValueError(f"{run_dir} has no logs/metrics.csv: the report reads the CSV logger's file; train with "
                     "logger=csv (the default) or add it beside wandb/tensorboard")


def read_metrics(path: Path) -> dict[str, Series]:
    """Each column as sorted (step, value) pairs, empty cells left out. A step logged twice
    (a resumed run repeats the steps after its last checkpoint) keeps its last value. NaN
    cells (a per-task or per-σ loss at a step whose batch had none) are left out."""
    columns: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or key is None or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if not math.isnan(number):
                    columns.setdefault(key, {})[step] = number
    return {key: sorted(values.items()) for key, values in columns.items()}


def stage_names(series: dict[str, Series], config: TrainConfig | None) -> dict[int, str]:
    """Stage index -> name: from the steps where both the index and a per-stage loss were logged,
    else from the order of the config's curriculum stages."""
    names: dict[int, str] = {i: stage.name for i, stage in enumerate(config.curriculum.stages)} if config else {}
    index_at = dict(series.get("curriculum/stage", []))
    for key, points in series.items():
        if key.startswith(STAGE_PREFIX):
            for step, _ in points:
                if step in index_at:
                    names[int(index_at[step])] = key[len(STAGE_PREFIX):]
                    break
    return names


def stage_segments(series: dict[str, Series], names: dict[int, str]) -> list[Segment]:
    segments: list[Segment] = []
    for step, value in series.get("curriculum/stage", []):
        index = int(value)
        if segments and segments[-1].index == index:
            segments[-1].end = step
        else:
            segments.append(Segment(index, names.get(index, f"stage {index}"), step, step))
    return segments


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_run(run_dir: Path) -> RunLogs:
    if not run_dir.is_dir():
        raise ValueError(f"run_dir = {str(run_dir)!r} does not exist; pass a qwenimg-train output directory")
    series = read_metrics(metrics_csv(run_dir))
    notes = []
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    if summary is None:
        notes.append("no summary.json (the run did not finish): the stage table is computed from metrics.csv")
    config = None
    if (run_dir / "config.yaml").is_file():
        config = load_run_config(run_dir)
    else:
        notes.append("no config.yaml: no config highlights")
    segments = stage_segments(series, stage_names(series, config))
    return RunLogs(series=series, segments=segments, summary=summary, config=config, notes=notes)


# --- plotting -----------------------------------------------------------------------------


def ema(values: list[float], weight: float) -> list[float]:
    """Bias-corrected EMA: s_n = w·s_(n-1) + (1 − w)·x_n, divided by 1 − w^n (TensorBoard's smoothing)."""
    out, s = [], 0.0
    for n, x in enumerate(values, 1):
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight ** n) if weight else x)
    return out


def _figure(rows: int, cols: int = 1, *, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9 if cols == 1 else 4.5 * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _mark_stages(ax, segments: list[Segment]) -> None:
    """A dashed line at each stage's first step, its name at the top, alternate stages shaded;
    the x range widened to the whole logged run (sparse eval points still show their stage)."""
    if not segments:
        return
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, segments[0].start), max(hi, segments[-1].end))
    trans = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    for i, seg in enumerate(segments):
        if i:
            ax.axvline(seg.start, color="0.35", linestyle="--", linewidth=0.9)
        if i % 2:
            ax.axvspan(seg.start, segments[i + 1].start if i + 1 < len(segments) else seg.end, color="0.93", zorder=0)
        ax.text(seg.start, 0.98, f" {seg.name}", transform=trans, va="top", ha="left", fontsize=8, color="0.25",
                clip_on=True)


def _curve(ax, points: Series, label: str, color, smoothing: float, *, marker_only: bool = False) -> None:
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    # An EMA lags by about w / (1 - w) points: on a short curve (a 30-step stage) 0.9
    # would trail the raw points visibly, so the weight is capped at 1 - 10/n.
    weight = min(smoothing, max(0.0, 1 - 10 / len(values)))
    if marker_only or weight == 0:
        ax.plot(steps, values, marker="o", markersize=3, color=color, label=label, linewidth=1)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, marker=".", markersize=2.5)
    ax.plot(steps, ema(values, weight), color=color, linewidth=1.6, label=label)


def _finish(ax, title: str, ylabel: str, segments: list[Segment]) -> None:
    _mark_stages(ax, segments)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        # Outside the axes: clear of the curves and of the stage names along the top.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _colors():
    from matplotlib import colormaps

    return colormaps["tab10"].colors


def plot_loss(logs: RunLogs, path: Path, smoothing: float) -> bool:
    s = logs.series
    stage_keys = [k for k in s if k.startswith(STAGE_PREFIX)]
    # Stages in training order (by first logged step).
    stage_keys.sort(key=lambda k: s[k][0][0])
    task_keys = [f"train/loss/{t}" for t in TASKS if f"train/loss/{t}" in s]
    if not stage_keys and "train/loss" not in s:
        return False
    fig, (by_stage, by_task) = _figure(2)
    colors = _colors()
    if stage_keys:
        for i, key in enumerate(stage_keys):
            _curve(by_stage, s[key], key[len(STAGE_PREFIX):], colors[i % len(colors)], smoothing)
    else:
        _curve(by_stage, s["train/loss"], "train/loss", colors[0], smoothing)
    _finish(by_stage, "loss per curriculum stage (train/loss/stage/*)", "loss", logs.segments)
    for i, key in enumerate(task_keys):
        _curve(by_task, s[key], key.rsplit("/", 1)[1], colors[(i + 3) % len(colors)], smoothing)
    _finish(by_task, "loss per task (train/loss/t2i|ti2i|i2i)", "loss", logs.segments)
    fig.savefig(path, dpi=110)
    return True


def plot_lr(logs: RunLogs, path: Path, smoothing: float) -> bool:
    keys = sorted(k for k in logs.series if k.startswith("lr-"))
    if not keys:
        return False
    fig, (ax,) = _figure(1)
    styles = ["-", "--", ":", "-."]
    for i, key in enumerate(keys):
        steps, values = zip(*logs.series[key])
        ax.plot(steps, values, linestyle=styles[i % len(styles)], color=_colors()[i % 10], label=key, linewidth=1.4)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(ax, "learning rate (warm-up, schedule, stage lr_scale)", "lr", logs.segments)
    fig.savefig(path, dpi=110)
    return True


def plot_throughput(logs: RunLogs, path: Path, smoothing: float) -> bool:
    keys = [k for k in ("perf/samples_per_s", "perf/tokens_per_s") if k in logs.series]
    if not keys:
        return False
    fig, axes = _figure(len(keys))
    for ax, key, color in zip(axes, keys, _colors()):
        _curve(ax, logs.series[key], key, color, smoothing)
        _finish(ax, key, key.rsplit("/", 1)[1].replace("_per_s", "/s"), logs.segments)
    fig.savefig(path, dpi=110)
    return True


def plot_sigma(logs: RunLogs, path: Path, smoothing: float) -> bool:
    keys = sorted(k for k in logs.series if k.startswith(SIGMA_PREFIX))
    if not keys:
        return False
    fig, (ax,) = _figure(1, height=3.6)
    cmap = _viridis(len(keys))
    for key, color in zip(keys, cmap):
        _curve(ax, logs.series[key], "σ " + key[len(SIGMA_PREFIX):], color, smoothing)
    _finish(ax, "loss per σ bucket (σ = 1 is pure noise)", "loss", logs.segments)
    fig.savefig(path, dpi=110)
    return True


def _viridis(n: int):
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in ([0.5] if n == 1 else [i / (n - 1) * 0.9 for i in range(n)])]


def ocr_columns(series: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """metric -> group (suite, GB 2312 level, language; "overall") -> points, from the `eval/` columns.

    Both layouts are read: `eval/ocr/<suite>/<metric>` and `evaluation.flat_metrics`'s
    `eval[/ocr]/<metric>` (overall) with `eval[/ocr]/<metric>/<group>`: a name logged
    alone (`eval/ocr/char_accuracy`) is a metric, which tells the two apart."""
    parts = {}
    for key in series:
        if key.startswith(EVAL_PREFIX):
            rest = key[len(EVAL_PREFIX):].split("/")
            if rest[0] == "ocr" and len(rest) > 1:
                rest = rest[1:]
            parts[key] = rest
    overall = {p[0] for p in parts.values() if len(p) == 1}
    out: dict[str, dict[str, Series]] = {}
    for key, p in parts.items():
        if len(p) == 1:
            metric, group = p[0], "overall"
        elif p[0] in overall:
            metric, group = p[0], "/".join(p[1:])
        else:
            metric, group = p[-1], "/".join(p[:-1])
        out.setdefault(metric, {})[group] = series[key]
    return dict(sorted(out.items()))


def _is_breakdown(group: str) -> bool:
    """A GB 2312 level or a language group of `flat_metrics` (not a suite, not the overall mean)."""
    from qwenimg_train.eval.suites import SUITES

    return bool(re.fullmatch(r"gb2312_level\d+", group)) or group in {info.language for info in SUITES.values()}


def ocr_suites(metrics: dict[str, dict[str, Series]]) -> list[str]:
    """The suite groups of `ocr_columns`' output (levels, languages and "overall" left out), in
    `qwenimg_train.eval.suites.SUITES` order, unknown names after them."""
    from qwenimg_train.eval.suites import SUITES

    order = list(SUITES)
    found = {g for by_group in metrics.values() for g in by_group if g != "overall" and not _is_breakdown(g)}
    return sorted(found, key=lambda g: (order.index(g) if g in order else len(order), g))


def _metric_order(metrics: dict[str, dict[str, Series]]) -> list[str]:
    """Character accuracy first (what the report is read for), the others alphabetically."""
    return sorted(metrics, key=lambda m: (m != "char_accuracy", m))


def plot_ocr(logs: RunLogs, path: Path, smoothing: float) -> bool:
    """One panel per metric: one line with markers per suite (evaluations are few), the
    overall mean in black, the stage boundaries dashed. Levels and languages are left
    out (summary.md has their last values)."""
    metrics = ocr_columns(logs.series)
    if not metrics:
        return False
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = _figure(rows, cols, height=3.0)
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors
    suites = ocr_suites(metrics)
    for ax, metric in zip(axes, _metric_order(metrics)):
        by_group = metrics[metric]
        for group in suites:
            if group in by_group:
                _curve(ax, by_group[group], group, colors[suites.index(group) % len(colors)], smoothing,
                       marker_only=True)
        if "overall" in by_group:
            steps, values = zip(*by_group["overall"])
            ax.plot(steps, values, color="black", linewidth=2, marker="o", markersize=4, label="overall")
        _finish(ax, metric, metric, logs.segments)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return True


PLOTS = {
    "loss.png": (plot_loss, "loss per stage and task"),
    "lr.png": (plot_lr, "learning rate"),
    "throughput.png": (plot_throughput, "throughput"),
    "sigma.png": (plot_sigma, "loss per σ bucket"),
    "ocr.png": (plot_ocr, "OCR metrics over steps"),
}
MISSING = {
    "loss.png": "no train/loss columns were logged",
    "lr.png": "no lr-* columns were logged (LearningRateMonitor)",
    "throughput.png": "no perf/* columns were logged",
    "sigma.png": "no train/loss/sigma_* columns were logged",
    "ocr.png": "no eval/* metrics were logged (the run had no OCR validation callback)",
}


# --- sample grids -------------------------------------------------------------------------


def latest_eval_grids(run_dir: Path) -> tuple[int | None, list[Path]]:
    """The grids of the highest `<run_dir>/eval/step<N>/` folder: (N, [<suite>.png ...])."""
    steps = []
    for folder in (run_dir / "eval").glob("step*"):
        match = re.fullmatch(r"step(\d+)", folder.name)
        if match and folder.is_dir() and any(folder.glob("*.png")):
            steps.append((int(match.group(1)), folder))
    if not steps:
        return None, []
    step, folder = max(steps)
    return step, sorted(folder.glob("*.png"))


def sample_grid(samples_dir: Path) -> Path | None:
    """`<samples_dir>/grid.png`, else the newest `<samples_dir>/*/grid.png`."""
    if (samples_dir / "grid.png").is_file():
        return samples_dir / "grid.png"
    grids = sorted(samples_dir.glob("*/grid.png"), key=lambda p: p.stat().st_mtime)
    return grids[-1] if grids else None


# --- summary.md ---------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def config_highlights(config: TrainConfig) -> list[list[Any]]:
    """(setting, value) rows of what distinguishes one run from another."""
    model, optim, objective, trainer = config.model, config.optim, config.objective, config.trainer
    lora = model.lora
    rows = [["model", model.pretrained_path],
            ["fine-tuning", f"LoRA rank {lora.rank}, alpha {lora.alpha}" if lora is not None else "full"]]
    parts = []
    for stage in config.curriculum.stages:
        mix = ", ".join(f"{t} {w:g}" for t, w in stage.task_mix.items() if w)
        parts.append(f"{stage.name} ({stage.fraction:.0%}, {stage.resolution}px, {mix})")
    rows.append(["curriculum", "; ".join(parts)])
    rows.append(["optimizer", (f"AdamW lr {_fmt(optim.lr)}, warm-up {optim.warmup_steps}, "
                               f"{optim.schedule} to ×{optim.min_lr_ratio}, clip {optim.grad_clip}")])
    rows.append(["objective", f"{objective.density}, shift {objective.shift}, weighting {objective.weighting}"])
    rows.append(["batch", (f"{config.data.batch_size} per device × accumulate {trainer.accumulate_grad_batches} × "
                           f"devices {trainer.devices} × nodes {trainer.num_nodes}")])
    strategy = config.strategy.get("_target_", "?").rsplit(".", 1)[-1] if config.strategy else "auto"
    rows.append(["trainer", (f"max_steps {trainer.max_steps}, precision {trainer.precision}, "
                             f"accelerator {trainer.accelerator}, strategy {strategy}")])
    ema = config.callbacks.ema
    rows.append(["EMA", f"decay {ema.decay}" if ema is not None else "off"])
    rows.append(["seed", config.seed])
    return rows


def stages_from_csv(logs: RunLogs) -> dict[str, dict[str, Any]]:
    """summary.json's `stages` block, as far as metrics.csv holds it (no sample counts)."""
    s = logs.series
    out: dict[str, dict[str, Any]] = {}
    def inside(key: str, seg: Segment) -> list[float]:
        return [v for step, v in s.get(key, []) if seg.start <= step <= seg.end]

    for seg in logs.segments:
        losses = inside(f"{STAGE_PREFIX}{seg.name}", seg) or inside("train/loss", seg)
        stage = out.setdefault(seg.name, {"steps": 0, "loss_sum": 0.0, "tasks": {}})
        stage["steps"] += len(losses)
        stage["loss_sum"] += sum(losses)
        for task in TASKS:
            values = inside(f"train/loss/{task}", seg)
            if values:
                t = stage["tasks"].setdefault(task, [0.0, 0])
                t[0] += sum(values)
                t[1] += len(values)
    return {name: {"steps": st["steps"], "loss": st["loss_sum"] / max(1, st["steps"]),
                   "loss_by_task": {t: total / n for t, (total, n) in st["tasks"].items()}}
            for name, st in out.items()}


def eval_json_lines(path: Path) -> list[str]:
    """A metrics JSON as Markdown: `qwenimg-eval`'s {config, aggregates: {overall, suites, levels,
    languages}} (per-prompt `results` left out), or any nested mapping: its numeric leaves as rows
    (the parent's path) × columns (the leaf's key); `<m>_se` goes beside `<m>` as "± se"."""
    doc = _read_json(path)
    lines = [f"From `{path}`:", ""]
    if not isinstance(doc, dict):
        return lines + ["(not a JSON object)"]
    config = doc.get("config")
    if isinstance(config, dict) and config:
        lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in config.items() if not isinstance(v, (dict, list))),
                  ""]
    data = doc.get("aggregates", {k: v for k, v in doc.items() if k not in ("config", "results")})
    rows: dict[str, dict[str, float]] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + [str(key)])
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and path:
            rows.setdefault("/".join(path[:-1]) or "·", {})[path[-1]] = node

    walk(data, [])
    if not rows:
        return lines + ["(no numeric values)"]
    columns: list[str] = []
    for values in rows.values():
        columns += [c for c in values if c not in columns and not (c.endswith("_se") and c[:-3] in values)]

    def cell(values, c):
        if c not in values:
            return None
        if f"{c}_se" in values:
            return f"{_fmt(values[c], 3)} ± {_fmt(values[c + '_se'], 2)}"
        return values[c]

    return lines + _table(["", *columns], [[f"`{name}`"] + [cell(v, c) for c in columns]
                                            for name, v in rows.items()])


def _stage_before(step: int, segments: list[Segment]) -> str:
    """The stage of the last step trained before an evaluation logged at `step` (a stage-end
    evaluation is logged at the next stage's first step)."""
    if step <= 0:
        return "before training"
    for seg in reversed(segments):
        if seg.start <= step - 1:
            return seg.name
    return "–"


def ocr_over_steps_lines(ocr: dict[str, dict[str, Series]], segments: list[Segment], plotted: bool) -> list[str]:
    """Character accuracy (else the first metric) per suite at each evaluated step, with the
    stage trained up to it: the points of ocr.png as a table."""
    metric = "char_accuracy" if "char_accuracy" in ocr else _metric_order(ocr)[0]
    by_group = ocr[metric]
    columns = (["overall"] if "overall" in by_group else []) + [g for g in ocr_suites(ocr) if g in by_group]
    if not columns:
        return []
    values = {g: dict(by_group[g]) for g in columns}
    steps = sorted({step for g in columns for step in values[g]})
    lines = [f"{metric} against training steps (each row one evaluation; stage: the stage of the steps trained "
             "before it)" + (", plotted in [ocr.png](ocr.png):" if plotted else ":"), ""]
    rows = [[step, _stage_before(step, segments), *(values[g].get(step) for g in columns)] for step in steps]
    return lines + _table(["step", "stage", *columns], rows) + [""]


def write_summary_md(path: Path, job: ReportJob, run_dir: Path, logs: RunLogs, plots: list[str],
                     skipped: dict[str, str], grids: dict[str, Any]) -> None:
    s, summary = logs.series, logs.summary or {}
    logged_steps = [step for step, _ in s.get("train/loss", [])]
    lines = [f"# Run report: `{run_dir}`", ""]
    lines += [f"Made by `qwenimg-report` from `{run_dir}/logs/metrics.csv`, `summary.json` and `config.yaml`.", ""]
    for note in logs.notes:
        lines.append(f"> {note}")
    if logs.notes:
        lines.append("")

    lines += ["## Run", ""]
    run_rows = [["steps", summary.get("global_step", logged_steps[-1] + 1 if logged_steps else None)]]
    if summary.get("fit_seconds") is not None:
        run_rows.append(["fit time", f"{summary['fit_seconds']:.1f} s"])
    stages_logged = " → ".join(f"{g.name} ({g.start}–{g.end})" for g in logs.segments)
    run_rows.append(["stages (logged)", stages_logged or "–"])
    if logs.config:
        run_rows += config_highlights(logs.config)
    lines += _table(["setting", "value"], run_rows) + [""]

    lines += ["## Loss per stage and task", ""]
    stages = summary.get("stages") or stages_from_csv(logs)
    if stages:
        header = ["stage", "steps", "loss", *TASKS]
        with_counts = any("samples_by_task" in st for st in stages.values())
        if with_counts:
            header.append("samples (" + " / ".join(TASKS) + ")")
        rows = []
        for name, st in stages.items():
            row = [name, st.get("steps"), st.get("loss"), *[(st.get("loss_by_task") or {}).get(t) for t in TASKS]]
            if with_counts:
                counts = st.get("samples_by_task") or {}
                row.append(" / ".join(str(counts.get(t, 0)) for t in TASKS))
            rows.append(row)
        lines += _table(header, rows)
        covered = sum(st.get("steps") or 0 for st in stages.values())
        if logs.summary and logged_steps and covered < len(logged_steps):
            lines += ["", (f"summary.json covers the last session only ({covered} of {len(logged_steps)} logged "
                           "steps: the run was resumed); the plots cover every logged step.")]
    else:
        lines.append("No stage losses logged.")
    lines.append("")

    skipped_totals: dict[str, float] = {}
    for key, points in s.items():
        if key.startswith("data/skipped/"):
            # Counts are cumulative within a stage: add each stage's last value.
            for seg in logs.segments:
                inside = [v for step, v in points if seg.start <= step <= seg.end]
                if inside:
                    reason = key[len("data/skipped/"):]
                    skipped_totals[reason] = skipped_totals.get(reason, 0) + inside[-1]
    if skipped_totals:
        lines += ["Bad samples skipped by the loader: "
                  + ", ".join(f"{reason} {int(n)}" for reason, n in sorted(skipped_totals.items())), ""]

    lines += ["## Throughput", ""]
    throughput = summary.get("throughput") or {}
    rows = []
    for key in ("samples_per_s", "tokens_per_s"):
        logged = sorted(v for _, v in s.get(f"perf/{key}", []))
        median = logged[len(logged) // 2] if logged else None
        rows.append([key.replace("_per_s", "/s"), throughput.get(key), median])
    lines += _table(["", "run mean, all ranks (summary.json)", "median of logged steps (rank 0)"], rows) + [""]

    lines += ["## OCR metrics", ""]
    ocr = ocr_columns(s)
    if ocr:
        groups = sorted({g for by_group in ocr.values() for g in by_group}, key=lambda g: (g != "overall", g))
        last_step = max(points[-1][0] for by_group in ocr.values() for points in by_group.values())
        rows = [[g] + [ocr[m][g][-1][1] if g in ocr[m] else None for m in ocr] for g in groups]
        lines += [f"The last values logged during training (step {last_step}):", ""]
        lines += _table(["", *ocr], rows) + [""]
        lines += ocr_over_steps_lines(ocr, logs.segments, "ocr.png" in plots)
    else:
        lines += [MISSING["ocr.png"] + ".", ""]
    if job.eval_json:
        lines += eval_json_lines(Path(job.eval_json)) + [""]

    lines += ["## Plots", ""]
    for name in PLOTS:
        if name in plots:
            lines += [f"### {PLOTS[name][1]}", "", f"![{PLOTS[name][1]}]({name})", ""]
        else:
            lines += [f"- {PLOTS[name][1]}: skipped, {skipped[name]}"]
    if skipped:
        lines.append("")

    if grids.get("samples") or grids.get("eval"):
        lines += ["## Samples", ""]
        if grids.get("samples"):
            lines += [f"Latest sample grid (`{grids['samples_source']}`):", "", "![samples](samples.png)", ""]
        for name in grids.get("eval", []):
            lines += [f"Validation grid `{name}` at step {grids['eval_step']}:", "", f"![{name}]({name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


# --- the command --------------------------------------------------------------------------


def report(job: ReportJob) -> dict[str, Any]:
    """Write the plots, copied grids and summary.md; return what was written and what was skipped."""
    run_dir = Path(job.run_dir)
    logs = read_run(run_dir)
    if job.eval_json is not None and not Path(job.eval_json).is_file():
        raise ValueError(f"eval_json = {job.eval_json!r} does not exist (qwenimg-eval writes <out>/eval/ocr.json)")
    if job.samples_dir is not None and not Path(job.samples_dir).is_dir():
        raise ValueError(f"samples_dir = {job.samples_dir!r} does not exist; pass a qwenimg-sample out_dir")
    out = Path(job.out_dir) if job.out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    plots, skipped = [], {}
    for name, (plot, _) in PLOTS.items():
        if plot(logs, out / name, job.smoothing):
            plots.append(name)
        else:
            skipped[name] = MISSING[name]

    grids: dict[str, Any] = {}
    samples_dir = Path(job.samples_dir) if job.samples_dir else run_dir / "samples"
    grid = sample_grid(samples_dir) if samples_dir.is_dir() else None
    if grid is not None:
        shutil.copyfile(grid, out / "samples.png")
        grids.update(samples="samples.png", samples_source=str(grid))
    step, eval_grids = latest_eval_grids(run_dir)
    if eval_grids:
        grids.update(eval_step=step, eval=[])
        for src in eval_grids:
            shutil.copyfile(src, out / f"eval_{src.name}")
            grids["eval"].append(f"eval_{src.name}")

    write_summary_md(out / "summary.md", job, run_dir, logs, plots, skipped, grids)
    for name, why in skipped.items():
        log.info("skipped %s: %s", name, why)
    log.info("report in %s: %s", out, ", ".join(plots + ["summary.md"]))
    return {"out_dir": str(out), "plots": plots, "skipped": skipped, "grids": grids,
            "summary_md": str(out / "summary.md")}


if __name__ == "__main__":
    from qwenimg_train.cli import report as main

    main()
