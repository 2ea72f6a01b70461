"""The curriculum as data: validated stage records and the step arithmetic over them.

A stage says what the loader draws while it is active: the fraction of total steps
it lasts, source weights (design / synthetic / natural), the text classes allowed,
a resolution or aspect-ratio buckets, the task mix (T2I / TI2I / I2I), a
learning-rate scale and a caption-dropout rate. Stages are Hydra configs
(configs/curriculum/); `Curriculum.from_config` validates them when the config is
loaded, so a wrong value fails before any GPU is touched. No code asks "which stage
is this?": the loader and the stage callback read these records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from data_pipelines.core.geometry import check_size, parse_bucket
from data_pipelines.core.schema import Source, Task, TextClass

SOURCES = (Source.DESIGN.value, Source.SYNTHETIC.value, Source.NATURAL.value)
TASKS = tuple(t.value for t in Task)
# Tasks drawn from the edit-pair shards (the `edit` source).
PAIR_TASKS = (Task.TI2I.value, Task.I2I.value)
EDIT_SOURCE = Source.EDIT.value
# Stage fields a curriculum may also set once for all its stages (null: each stage's own).
SHARED_FIELDS = ("source_weights", "task_mix", "resolution")


@dataclass
class Stage:
    name: str
    """Shown in logs (`curriculum/stage`) and checkpoints."""
    fraction: float
    """Share of the run's total steps this stage lasts; the stages' fractions sum to 1."""
    source_weights: dict[str, float] = field(default_factory=lambda: {"design": 0.4, "synthetic": 0.6, "natural": 0.0})
    """Mixing weights of the T2I sources, by name (design, synthetic, natural)."""
    text_classes: list[str] = field(default_factory=lambda: ["none", "simple", "complex"])
    """Text classes the stage admits (schema.TextClass values); others are filtered out."""
    resolution: int | None = 512
    """Square training resolution in pixels, when `buckets` is not set."""
    buckets: list[str] | None = None
    """Aspect-ratio buckets "WxH" (each batch holds one bucket); overrides `resolution`."""
    task_mix: dict[str, float] = field(default_factory=lambda: {Task.T2I.value: 0.8, Task.TI2I.value: 0.1,
                                                                Task.I2I.value: 0.1})
    """Task weights: t2i (text to image), ti2i (editing pairs), i2i (reconstruction)."""
    lr_scale: float = 1.0
    """Multiplies the optimizer's learning rate while the stage is active."""
    caption_dropout: float = 0.1
    """Probability of an empty prompt (for classifier-free guidance)."""

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{where}: fraction = {self.fraction} must lie in (0, 1]")
        self.source_weights = dict(self.source_weights)
        for source, weight in self.source_weights.items():
            if source not in SOURCES:
                raise ValueError(f"{where}: unknown source {source!r} in source_weights; use {SOURCES}")
            if weight < 0:
                raise ValueError(f"{where}: source_weights.{source} = {weight} is negative")
        if sum(self.source_weights.values()) <= 0:
            raise ValueError(f"{where}: source_weights must have a positive sum, got {self.source_weights}")
        known = [c.value for c in TextClass]
        if not self.text_classes:
            raise ValueError(f"{where}: text_classes is empty; allow at least one of {known}")
        for cls in self.text_classes:
            if cls not in known:
                raise ValueError(f"{where}: unknown text class {cls!r}; use {known}")
        self.task_mix = dict(self.task_mix)
        for task, weight in self.task_mix.items():
            if task not in TASKS:
                raise ValueError(f"{where}: unknown task {task!r} in task_mix; use {TASKS}")
            if weight < 0:
                raise ValueError(f"{where}: task_mix.{task} = {weight} is negative")
        if sum(self.task_mix.values()) <= 0:
            raise ValueError(f"{where}: task_mix must have a positive sum, got {self.task_mix}")
        for w, h in self.sizes():
            check_size(w, h, f"{where}: ", suggest=True)
        if self.lr_scale <= 0:
            raise ValueError(f"{where}: lr_scale = {self.lr_scale} must be > 0")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"{where}: caption_dropout = {self.caption_dropout} must lie in [0, 1)")

    def sizes(self) -> list[tuple[int, int]]:
        """The stage's image sizes (width, height): its buckets, or one square."""
        if self.buckets:
            return [parse_bucket(b) for b in self.buckets]
        if self.resolution is None:
            raise ValueError(f"stage {self.name!r}: set resolution or buckets")
        return [(self.resolution, self.resolution)]

    @property
    def pair_weight(self) -> float:
        """The task-mix weight of the tasks drawn from edit pairs (TI2I and I2I)."""
        return sum(self.task_mix.get(t, 0.0) for t in PAIR_TASKS)

    @property
    def needs_edit_pairs(self) -> bool:
        """Whether the stage draws TI2I or I2I samples, so reads the edit-pair shards."""
        return self.pair_weight > 0

    def reads(self, source: str) -> bool:
        """Whether the stage draws from `source` (a T2I source by weight, or the edit pairs)."""
        if source == EDIT_SOURCE:
            return self.needs_edit_pairs
        return self.source_weights.get(source, 0) > 0


@dataclass
class Curriculum:
    name: str
    stages: list[Stage]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"curriculum {self.name!r} has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"curriculum {self.name!r}: stage names repeat: {names}")
        total = sum(s.fraction for s in self.stages)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"curriculum {self.name!r}: stage fractions sum to {total:.6g}, not 1 "
                f"({', '.join(f'{s.name}={s.fraction}' for s in self.stages)})"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Curriculum":
        """From the composed `curriculum` config: {name, stages: {key: stage fields}, and optionally
        source_weights / task_mix / resolution, which when not null replace every stage's (a
        shared resolution also drops the stages' buckets)}."""
        from data_pipelines.core.config import from_mapping, to_plain

        cfg = to_plain(cfg)
        unknown = set(cfg) - {"name", "stages", *SHARED_FIELDS}
        if unknown:
            raise ValueError(f"curriculum: unknown key(s) {sorted(unknown)}; known: name, stages, "
                             f"{', '.join(SHARED_FIELDS)}")
        stages_cfg = cfg.get("stages") or {}
        if isinstance(stages_cfg, Mapping):
            items: Sequence[Any] = [dict(v, name=v.get("name", k)) for k, v in stages_cfg.items()]
        else:
            items = list(stages_cfg)
        # A curriculum-wide value replaces every stage's own: one key to sweep a data or task
        # mix whatever the curriculum and its stage names (configs/sweep/, docs/sweeps.md), or to
        # run any curriculum in another world (the glyph world's 64² images: experiment=glyphs).
        shared = {k: cfg[k] for k in SHARED_FIELDS if cfg.get(k) is not None}
        if "resolution" in shared:
            shared["buckets"] = None  # one square size for every stage, whatever its own buckets
        items = [dict(item, **shared) for item in items]
        stages = [from_mapping(Stage, item, f"curriculum.stages[{i}]") for i, item in enumerate(items)]
        return cls(name=str(cfg.get("name", "curriculum")), stages=stages)

    @property
    def required_sources(self) -> set[str]:
        """The sources some stage reads: those with a positive weight in any stage, and
        `edit` when any stage needs edit pairs."""
        needed = {n for s in self.stages for n, w in s.source_weights.items() if w > 0}
        if any(s.needs_edit_pairs for s in self.stages):
            needed.add(EDIT_SOURCE)
        return needed

    # --- steps -------------------------------------------------------------------------

    def boundaries(self, total_steps: int) -> list[int]:
        """First step of each stage for a run of `total_steps` (rounded; the last stage ends the run)."""
        if total_steps < len(self.stages):
            raise ValueError(f"total steps {total_steps} < {len(self.stages)} stages: every stage needs a step")
        starts, acc = [], 0.0
        for stage in self.stages:
            starts.append(int(round(acc * total_steps)))
            acc += stage.fraction
        return starts

    def stage_index(self, step: int, total_steps: int) -> int:
        """Index of the stage active at `step` (0-based global step)."""
        starts = self.boundaries(total_steps)
        index = 0
        for i, start in enumerate(starts):
            if step >= start:
                index = i
        return index

    # --- data ----------------------------------------------------------------------------

    def check_sources(self, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        """Every stage's filters can be met by the data: error naming stage, source and class.

        `manifests` maps a source name (design, synthetic, natural, edit) to its
        manifest.json (data_pipelines writes them with per-text-class counts). A stage
        needs, for every source it draws from, samples of at least one allowed class;
        a stage with TI2I or I2I weight needs the edit source.
        """
        for stage in self.stages:
            for source, weight in stage.source_weights.items():
                if weight <= 0:
                    continue
                manifest = manifests.get(source)
                if manifest is None:
                    raise ValueError(
                        f"stage {stage.name!r} draws from source {source!r} (weight {weight}) but no "
                        f"{source} shards are configured; generate them (qwenimg-data --config-name {source}) "
                        f"or set its weight to 0"
                    )
                counts = manifest.get("counts", {}).get("text_class", {})
                if not any(counts.get(cls, 0) > 0 for cls in stage.text_classes):
                    raise ValueError(
                        f"stage {stage.name!r}: source {source!r} has no sample of text class "
                        f"{' or '.join(stage.text_classes)} (its manifest counts {dict(counts)})"
                    )
            if stage.needs_edit_pairs:
                pair_weight = stage.pair_weight
                edit = manifests.get(EDIT_SOURCE)
                if edit is None or not edit.get("num_samples"):
                    raise ValueError(
                        f"stage {stage.name!r}: task_mix gives TI2I/I2I weight {pair_weight} but there are no "
                        f"edit pairs; generate them (qwenimg-data --config-name edit-pairs) or set those weights to 0"
                    )
                counts = edit.get("counts", {}).get("text_class", {})
                if counts and not any(counts.get(cls, 0) > 0 for cls in stage.text_classes):
                    raise ValueError(
                        f"stage {stage.name!r}: source 'edit' has no pair whose target is of text class "
                        f"{' or '.join(stage.text_classes)} (its manifest counts {dict(counts)})"
                    )
