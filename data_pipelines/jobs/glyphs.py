"""`qwenimg-data --config-name glyphs`: the glyph world's training data, as shards.

The learnable tiny world (docs/model.md) trains on what this job writes: 64² images
(`data_pipelines.sources.glyphs`) of its held-in characters, in the three text classes
the curriculum filters on, and edit pairs:

    <out_dir>/synthetic   text-to-image samples, by `text_classes` weight:
                          none     a grey circle, square or bar ("a grey circle")
                          simple   one character (“the character “八””)
                          complex  two lines of one character each ("two lines: “八” over “K””)
    <out_dir>/edit        pairs in the same three classes: a shape replaced by another
                          ("replace the circle with a square"), the character of a
                          one-character image or one of a two-line image replaced
                          ("replace “八” with “K””): TI2I; or, `reconstruct_fraction`
                          of them, the source itself with the empty instruction (I2I)

By default (`jitter` 0) each character, pair and layout has one look, centred: the
tiny transformer learns that on 2 cores in minutes, where jittered renders need several
times the steps; `jitter` up to 1 varies size and place (seeded per sample). Same sharding, determinism,
resume and manifest as every `qwenimg-data` job (data_pipelines.core.sharded); the two
folders are two sharded runs with one settings fingerprint each.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data_pipelines.core.geometry import check_size
from data_pipelines.core.remote import join_location
from data_pipelines.core.schema import (
    CAPTION_EXTENSION,
    INSTRUCTION_EXTENSION,
    META_EXTENSION,
    SOURCE_IMAGE_PREFIX,
    LineMeta,
    SampleMeta,
    TextClass,
    classify_text,
    sample_languages,
    script_languages,
)
from data_pipelines.core.sharded import JobSettings, Produced, Tally, run_sharded
from data_pipelines.core.shards import derive_seed, encode_image
from data_pipelines.sources import glyphs

SCENE_FOLDER = "synthetic"
EDIT_FOLDER = "edit"


@dataclass
class GlyphsJob(JobSettings):
    """Shared settings (data_pipelines.core.sharded.JobSettings) plus the glyph world's.
    `num_shards` x `samples_per_shard` samples are written to each of the two folders."""

    image_format: str = "png"
    """Lossless: the glyphs are small and JPEG ringing around 1-px strokes is what a VAE would learn."""
    canvas: int = glyphs.CANVAS
    """Side of every image (a multiple of 16)."""
    characters: str = glyphs.HELD_IN
    """The vocabulary drawn (default: the held-in set; the evaluation's held-out characters must not be here)."""
    text_classes: dict[str, float] = field(default_factory=lambda: {"none": 0.2, "simple": 0.4, "complex": 0.4})
    """Samples by text class (none, simple, complex), by weight, in both folders: an edit pair's class is
    its images' (a shape replaced by another shape; one character; two lines, one of them replaced)."""
    reconstruct_fraction: float = 0.2
    """Share of pairs that are I2I reconstructions (the source unchanged, empty instruction)."""
    jitter: float = 0.0
    """How much each text image varies in size and place, in [0, 1] (`glyphs.draw_glyph_lines`).
    0, the default: every character has one look, the fastest world to learn on 2 cores
    (docs/model.md: varied renders need several times the steps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size(self.canvas, self.canvas, "canvas: ")
        if len(set(self.characters)) < 2 or any(ch.isspace() for ch in self.characters):
            raise ValueError(f"characters = {self.characters!r}: give at least two distinct non-space characters")
        known = [c.value for c in TextClass]
        for name, weight in self.text_classes.items():
            if name not in known or weight < 0:
                raise ValueError(f"text_classes: {name!r}: {weight}; use {known} with weights >= 0")
        if sum(self.text_classes.values()) <= 0:
            raise ValueError("text_classes must have a positive sum")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter = {self.jitter} must lie in [0, 1]")
        if not 0 <= self.reconstruct_fraction <= 1:
            raise ValueError(f"reconstruct_fraction = {self.reconstruct_fraction} must lie in [0, 1]")
        held_out = set(self.characters) & set(glyphs.HELD_OUT)
        if held_out:
            raise ValueError(f"characters include held-out character(s) {sorted(held_out)}: the held-out "
                             "evaluation suite would no longer measure generalisation")


def _meta(key: str, source: str, drawn: glyphs.GlyphImage | None, size: int, seed: int, layout: str) -> SampleMeta:
    lines = []
    if drawn is not None:
        for text, (x0, y0, x1, y1) in zip(drawn.lines, drawn.boxes):
            language = "+".join(script_languages(text)) or "en"
            lines.append(LineMeta(text=text, language=language, font="glyph", font_size=0,
                                  polygon=[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    return SampleMeta(key=key, source=source, width=size, height=size, text_class=classify_text(lines).value,
                      languages=sample_languages(lines), lines=lines, layout=layout, format="glyph",
                      background="solid", seed=seed)


class _GlyphProducer:
    """A shard's samples: each with its seed, generator, key and text class (by weight)."""

    prefix = ""
    stream = ""

    def __init__(self, job: GlyphsJob):
        self.job = job
        self.classes = [c for c, w in job.text_classes.items() if w > 0]
        self.weights = [job.text_classes[c] for c in self.classes]

    def samples(self, index: int) -> Iterator[tuple[int, random.Random, str, str]]:
        for j in range(self.job.samples_per_shard):
            seed = derive_seed(self.job.seed, self.stream, index, j)
            rng = random.Random(seed)
            yield seed, rng, f"{self.prefix}_{index:06d}_{j:06d}", rng.choices(self.classes, self.weights)[0]


class GlyphSceneProducer(_GlyphProducer):
    prefix, stream = "glyphs", "scene"

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job, size = self.job, self.job.canvas
        for seed, rng, key, text_class in self.samples(index):
            if text_class == TextClass.NONE.value:
                shape = rng.choice(glyphs.SHAPES)
                image, drawn, caption = glyphs.draw_shape(shape, size, rng), None, glyphs.NO_TEXT_PROMPT.format(shape=shape)
            else:
                count = 1 if text_class == TextClass.SIMPLE.value else 2
                drawn = glyphs.draw_glyph_lines([rng.choice(job.characters) for _ in range(count)], size, rng, job.jitter)
                image, caption = drawn.image, glyphs.glyph_prompt(drawn.lines)
            meta = _meta(key, "synthetic", drawn, size, seed, "none" if drawn is None else f"{len(drawn.lines)}_line")
            yield Produced(key, {job.image_format: encode_image(image, job.image_format, job.jpeg_quality),
                                 CAPTION_EXTENSION: caption.encode("utf-8"),
                                 META_EXTENSION: meta.to_json().encode("utf-8")}, meta)


class GlyphEditProducer(_GlyphProducer):
    prefix, stream = "glyph_edit", "edit"

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job, size = self.job, self.job.canvas
        for seed, rng, key, text_class in self.samples(index):
            reconstruct = rng.random() < job.reconstruct_fraction
            place = rng.getrandbits(32)  # one jitter for source and target: only the content changes
            details: dict[str, Any] = {}
            if text_class == TextClass.NONE.value:
                old_shape = rng.choice(glyphs.SHAPES)
                new_shape = rng.choice([s for s in glyphs.SHAPES if s != old_shape])
                src_image = glyphs.draw_shape(old_shape, size, random.Random(place))
                src = tgt = None
                tgt_image = src_image if reconstruct else glyphs.draw_shape(new_shape, size, random.Random(place))
                caption = glyphs.NO_TEXT_PROMPT.format(shape=old_shape if reconstruct else new_shape)
                if not reconstruct:
                    instruction = glyphs.SHAPE_EDIT_INSTRUCTION.format(old=old_shape, new=new_shape)
                    details = {"old": old_shape, "new": new_shape}
            else:
                count = 1 if text_class == TextClass.SIMPLE.value else 2
                lines = [rng.choice(job.characters) for _ in range(count)]
                src = tgt = glyphs.draw_glyph_lines(lines, size, random.Random(place), job.jitter)
                if not reconstruct:
                    k = rng.randrange(count)
                    old, new = lines[k], rng.choice([c for c in job.characters if c != lines[k]])
                    tgt = glyphs.draw_glyph_lines(lines[:k] + [new] + lines[k + 1:], size, random.Random(place), job.jitter)
                    instruction = glyphs.EDIT_INSTRUCTION.format(old=old, new=new)
                    details = {"line": k, "old": old, "new": new}
                src_image, tgt_image, caption = src.image, tgt.image, glyphs.glyph_prompt(tgt.lines)
            if reconstruct:
                instruction, edit_type = glyphs.RECONSTRUCT_INSTRUCTION, "reconstruct"
            else:
                edit_type = "replace_text" if src is not None else "replace_shape"
            meta = _meta(key, "edit", tgt, size, seed, "none" if tgt is None else f"{len(tgt.lines)}_line")
            box = tgt.boxes[details["line"]] if "line" in details else (0, 0, size, size)
            x0, y0, x1, y1 = (round(v, 1) for v in box)
            meta.extra["edit"] = {
                "type": edit_type, "instruction": instruction, "instruction_language": "en",
                "region": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "details": details, "scene_source": "glyphs",
                "source_lines": [line.__dict__ for line in _meta(key, "edit", src, size, seed, "").lines],
                "source_text_class": text_class,
            }
            tally.add("edit_type", edit_type)
            fmt = job.image_format
            yield Produced(key, {f"{SOURCE_IMAGE_PREFIX}.{fmt}": encode_image(src_image, fmt, job.jpeg_quality),
                                 fmt: encode_image(tgt_image, fmt, job.jpeg_quality),
                                 CAPTION_EXTENSION: caption.encode("utf-8"),
                                 INSTRUCTION_EXTENSION: instruction.encode("utf-8"),
                                 META_EXTENSION: meta.to_json().encode("utf-8")}, meta)


def run(job: GlyphsJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write (or complete) both folders; returns {"synthetic": summary, "edit": summary}."""
    glyphs.draw_glyph_lines([job.characters[0]], job.canvas)  # no CJK font: fail here, with its message
    config = resolved_config if resolved_config is not None else asdict(job)
    summaries = {}
    for folder, producer_class, source in ((SCENE_FOLDER, GlyphSceneProducer, "synthetic"),
                                           (EDIT_FOLDER, GlyphEditProducer, "edit")):
        sub = GlyphsJob(**{**asdict(job), "out_dir": join_location(job.out_dir, folder)})
        sharded = sub.sharded(prefix=producer_class.prefix, make_producer=functools.partial(producer_class, sub),
                              manifest_extra={"source": source, "image_format": job.image_format, "config": config,
                                              "world": "glyphs"})
        summaries[folder] = run_sharded(sharded, producer_class(sub))
    return summaries
