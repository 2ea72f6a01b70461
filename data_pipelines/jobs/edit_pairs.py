"""`qwenimg-data --config-name edit-pairs`: TI2I editing and I2I reconstruction pairs.

Each sample composes a scene (synthetic renderer or design composer, by weight),
applies one edit type (by weight; when a type does not apply to the scene, e.g.
resizing a paragraph that would no longer fit, the next type in a seeded order is
tried) and writes source, target, instruction and metadata. Same sharding,
determinism and resume as every `qwenimg-data` job (data_pipelines.core.sharded).

Multi-image edit types (data_pipelines.pairs.multi: `title_from_picture`,
`logo_onto_poster`, `style_from_picture`; weight 0 by default) take their share of
`edit_types` like the others; their samples add `<key>.src2.jpg` (and
`<key>.src3.jpg`), every source of the target's pixel size, and every sample says
`extra["edit"]["num_sources"]` (1 for the single-source types). When the drawn type
does not apply, types with as many sources (one, or several) are tried first; when
none applies, another scene is composed.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data_pipelines.pairs.edit import EDIT_TYPES, MULTI_SOURCE_EDIT_TYPES, EditMaker
from data_pipelines.core.sharded import JobSettings, Produced, Tally, run_sharded
from data_pipelines.core.schema import (
    CAPTION_EXTENSION,
    EXTRA_SOURCE_PREFIXES,
    INSTRUCTION_EXTENSION,
    MAX_SOURCES,
    META_EXTENSION,
    SOURCE_IMAGE_PREFIX,
)
from data_pipelines.core.shards import derive_seed, encode_image
from data_pipelines.jobs.synthetic import FontsConfig, TextConfig, build_renderer, SyntheticJob
from data_pipelines.sources.render import RenderConfig

SHARD_PREFIX = "edit"
SCENE_SOURCES = ("synthetic", "design")
MAX_SCENES = 8
"""Scenes composed for one sample before giving up, when no configured edit type applies
(reconstruct and background always apply; multi-image types alone may not)."""


@dataclass
class EditPairsJob(JobSettings):
    """Shared settings (data_pipelines.core.sharded.JobSettings) plus the pair generator's."""

    jpeg_quality: int = 95
    """Higher than renders' default: edits are judged by small differences."""
    scene_sources: dict[str, float] = field(default_factory=lambda: {"synthetic": 0.5, "design": 0.5})
    """Where scenes come from: the synthetic renderer and/or the design composer, by weight."""
    edit_types: dict[str, float] = field(
        default_factory=lambda: {
            "replace_text": 0.25, "recolor": 0.1, "resize": 0.1, "reweight": 0.05, "move": 0.1,
            "add_line": 0.1, "remove_line": 0.1, "background": 0.1, "reconstruct": 0.1,
            "title_from_picture": 0.0, "logo_onto_poster": 0.0, "style_from_picture": 0.0,
        }
    )
    """Edit types (data_pipelines.pairs.edit.EDIT_TYPES) with weights (normalised by their sum);
    `reconstruct` makes I2I pairs; `title_from_picture`, `logo_onto_poster` and
    `style_from_picture` make multi-image pairs (2 or 3 sources, for the
    qwen_image_edit_plus family). They are off by default, so the default shards serve
    the single-image editors unchanged (a one-source model's loader filters such pairs
    out); 0.05 each gives about 13% multi-image pairs."""
    instruction_zh_fraction: float = 0.5
    """Probability of a Chinese instruction (else English)."""
    reconstruction_instruction_en: str = ""
    reconstruction_instruction_zh: str = ""
    """The fixed instruction of I2I pairs (empty by default)."""
    fonts: FontsConfig = field(default_factory=FontsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, weight in self.edit_types.items():
            if name not in EDIT_TYPES:
                raise ValueError(f"edit_types: unknown edit type {name!r}; use {EDIT_TYPES}")
            if weight < 0:
                raise ValueError(f"edit_types.{name} = {weight} is negative")
        if sum(self.edit_types.values()) <= 0:
            raise ValueError("edit_types must have a positive sum")
        for name, weight in self.scene_sources.items():
            if name not in SCENE_SOURCES or weight < 0:
                raise ValueError(f"scene_sources: {name!r}: {weight}; use {SCENE_SOURCES} with weights >= 0")
        if sum(self.scene_sources.values()) <= 0:
            raise ValueError("scene_sources must have a positive sum")
        if not 0 <= self.instruction_zh_fraction <= 1:
            raise ValueError(f"instruction_zh_fraction = {self.instruction_zh_fraction} must lie in [0, 1]")


def _scene_renderers(job: EditPairsJob) -> dict[str, Any]:
    synthetic = build_renderer(SyntheticJob(out_dir=job.out_dir, fonts=job.fonts, text=job.text, render=job.render))
    renderers: dict[str, Any] = {}
    if job.scene_sources.get("synthetic", 0) > 0:
        renderers["synthetic"] = synthetic
    if job.scene_sources.get("design", 0) > 0:
        from data_pipelines.sources.design import DesignComposer, DesignConfig

        renderers["design"] = DesignComposer(fonts=synthetic.fonts, text=synthetic.text, config=job.render, design=DesignConfig())
    return renderers


class EditPairProducer:
    def __init__(self, job: EditPairsJob):
        self.job = job
        self.renderers = _scene_renderers(job)
        self.makers = {
            name: EditMaker(r, reconstruction_instruction=(job.reconstruction_instruction_en, job.reconstruction_instruction_zh))
            for name, r in self.renderers.items()
        }
        self.source_names = [n for n in self.renderers]
        self.source_weights = [job.scene_sources[n] for n in self.source_names]
        self.type_names = [t for t, w in job.edit_types.items() if w > 0]
        self.type_weights = [job.edit_types[t] for t in self.type_names]

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        for j in range(job.samples_per_shard):
            seed = derive_seed(job.seed, index, j)
            rng = random.Random(seed)
            source = rng.choices(self.source_names, self.source_weights)[0]
            renderer, maker = self.renderers[source], self.makers[source]
            key = f"{SHARD_PREFIX}_{index:06d}_{j:06d}"
            scene = renderer.compose(derive_seed(seed, "scene"), key)
            zh = rng.random() < job.instruction_zh_fraction
            first = rng.choices(self.type_names, self.type_weights)[0]
            multi = first in MULTI_SOURCE_EDIT_TYPES
            rest = [t for t in rng.sample(self.type_names, len(self.type_names)) if t != first]
            # Same kind of sources first (a stable sort keeps the seeded order within each).
            order = [first] + sorted(rest, key=lambda t: (t in MULTI_SOURCE_EDIT_TYPES) != multi)
            edit = None
            for attempt in range(MAX_SCENES):
                if attempt:  # no configured type applied (none of reconstruct, background): another scene
                    tally.add("scene_redrawn", "no_edit_applies")
                    scene = renderer.compose(derive_seed(seed, "scene", attempt), key)
                for edit_type in order:
                    edit = maker.ops[edit_type](scene, rng, zh)
                    if edit is not None:
                        break
                    tally.add("edit_not_applicable", edit_type)
                if edit is not None:
                    break
            if edit is None:
                raise RuntimeError(f"{key}: none of the edit types {self.type_names} applied to {MAX_SCENES} scenes; "
                                   f"give reconstruct or background a weight > 0")
            src = renderer.draw(scene)
            tgt = renderer.draw(edit.target)
            pictures = [renderer.draw(picture) for picture in edit.sources]  # Pictures 2 (and 3)
            assert edit.num_sources <= MAX_SOURCES
            assert all(p.image.size == src.image.size == tgt.image.size for p in pictures), "sources and target share one size"
            tgt.meta.source = "edit"
            x0, y0, x1, y1 = (round(v, 1) for v in edit.region)
            tgt.meta.extra["edit"] = {
                "type": edit.edit_type,
                "instruction": edit.instruction,
                "instruction_language": "zh" if zh else "en",
                "region": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                "details": edit.details,
                "scene_source": source,
                "source_lines": [line.__dict__ for line in src.meta.lines],
                "source_text_class": src.meta.text_class,
                "num_sources": edit.num_sources,
            }
            if pictures:
                # The lines of Pictures 2 (and 3), as source_lines holds Picture 1's.
                tgt.meta.extra["edit"]["extra_source_lines"] = [[line.__dict__ for line in p.meta.lines] for p in pictures]
            tally.add("edit_type", edit.edit_type)
            tally.add("scene_source", source)
            tally.add("num_sources", str(edit.num_sources))
            fmt = job.image_format
            members = {
                f"{SOURCE_IMAGE_PREFIX}.{fmt}": encode_image(src.image, fmt, job.jpeg_quality),
                **{f"{prefix}.{fmt}": encode_image(p.image, fmt, job.jpeg_quality)
                   for prefix, p in zip(EXTRA_SOURCE_PREFIXES, pictures)},
                fmt: encode_image(tgt.image, fmt, job.jpeg_quality),
                CAPTION_EXTENSION: tgt.caption.encode("utf-8"),
                INSTRUCTION_EXTENSION: edit.instruction.encode("utf-8"),
                META_EXTENSION: tgt.meta.to_json().encode("utf-8"),
            }
            yield Produced(key, members, tgt.meta)


def run(job: EditPairsJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    producer = EditPairProducer(job)  # validates fonts/corpora before any worker starts
    return run_sharded(
        job.sharded(
            prefix=SHARD_PREFIX,
            make_producer=functools.partial(EditPairProducer, job),
            manifest_extra={"source": "edit", "config": resolved_config if resolved_config is not None else asdict(job)},
        ),
        producer,
    )
