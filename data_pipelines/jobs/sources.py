"""`qwenimg-data --config-name design` and `--config-name natural`.

Each source has two producers: ingest of existing images (`input:` set; see
data_pipelines.sources.ingest) or a procedural generator (`input: null`, the embedded
default): the design composer for design data, and a text-free image generator
(gradients, textures, shapes, simple scenes) standing in for photos.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data_pipelines.sources.design import DesignComposer, DesignConfig
from data_pipelines.sources.ingest import IngestConfig, run_ingest
from data_pipelines.core.sharded import JobSettings, Produced, Tally, run_sharded
from data_pipelines.core.schema import CAPTION_EXTENSION, META_EXTENSION, SampleMeta, Source, TextClass
from data_pipelines.core.shards import derive_seed, encode_image
from data_pipelines.sources import background as bgmod
from data_pipelines.text.captions import color_name
from data_pipelines.jobs.synthetic import FontsConfig, OcrConfig, SyntheticJob, SyntheticProducer, TextConfig, build_renderer
from data_pipelines.sources.render import RenderConfig


@dataclass
class SourceJob(JobSettings):
    """Shared settings (data_pipelines.core.sharded.JobSettings) plus the ingest input."""

    num_shards: int = 4
    """Procedural mode only: ingest derives the shard count from the input."""
    input: IngestConfig | None = None
    """Ingest existing images (folder, jsonl, webdataset, anyword) instead of generating."""

    RUN_ONLY = (*JobSettings.RUN_ONLY, "input")

    def content_settings(self) -> dict[str, Any]:
        d = super().content_settings()
        d.get("ocr", {}).pop("threads", None)
        return d

    def _run(self, source: str, make_producer, producer, resolved_config) -> dict[str, Any]:
        if self.input is not None:
            return run_ingest(
                self.input, source=source, out_dir=self.out_dir, workers=self.workers, node_rank=self.node_rank,
                num_nodes=self.num_nodes, overwrite=self.overwrite, progress=self.progress, resolved_config=resolved_config,
            )
        return run_sharded(
            self.sharded(
                prefix=source,
                make_producer=make_producer,
                manifest_extra={"source": source, "config": resolved_config if resolved_config is not None else asdict(self)},
            ),
            producer(),
        )


# --- design ----------------------------------------------------------------------


@dataclass
class DesignJob(SourceJob):
    design: DesignConfig = field(default_factory=DesignConfig)
    fonts: FontsConfig = field(default_factory=FontsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    max_attempts_factor: int = 4
    """Give up on a shard after samples_per_shard x this many designs (OCR drops)."""


class DesignProducer(SyntheticProducer):
    """The synthetic producer's loop (seeds, OCR check, encoding) over composed designs."""

    prefix = "design"

    def __init__(self, job: DesignJob):
        base = build_renderer(SyntheticJob(out_dir=job.out_dir, fonts=job.fonts, text=job.text, render=job.render))
        composer = DesignComposer(fonts=base.fonts, text=base.text, config=job.render, design=job.design)
        super().__init__(job, composer)  # type: ignore[arg-type]


def run_design(job: DesignJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    producer = (lambda: DesignProducer(job)) if job.input is None else None
    return job._run("design", functools.partial(DesignProducer, job), producer, resolved_config)


# --- natural ---------------------------------------------------------------------


@dataclass
class NaturalJob(SourceJob):
    sizes: list[str] = field(default_factory=lambda: ["512x512"])
    """Procedural mode: canvas sizes, "WxH" or "WxH:weight"."""
    caption_zh_fraction: float = 0.5


_SCENE_WORDS = {  # (en, zh)
    "scene": ("a simple scene of shapes under a {c} sky", "{c}天空下由几何形状组成的简单场景"),
    "gradient": ("a smooth {c} gradient", "平滑的{c}渐变"),
    "texture": ("a {c} texture", "{c}纹理"),
    "shapes": ("overlapping shapes on a {c} background", "{c}背景上交叠的几何形状"),
}


class NaturalProducer:
    """Text-free stand-ins for photos: procedural scenes, gradients, textures, shapes."""

    def __init__(self, job: NaturalJob):
        self.job = job
        self.render = RenderConfig(sizes=job.sizes, caption_zh_fraction=job.caption_zh_fraction)
        self.photos = bgmod.PhotoPool(None)

    def image(self, rng: random.Random):
        size = rng.choices(self.render.size_list, self.render.size_weights)[0]
        kind = rng.choice(tuple(_SCENE_WORDS))
        if kind == "scene":
            image = bgmod.picture(rng, size, self.photos)
        elif kind == "shapes":
            image, _ = bgmod.background(rng, size, rng.choice(("solid", "gradient")), self.photos)
            for _ in range(rng.randint(1, 3)):
                w, h = size
                pw, ph = int(w * rng.uniform(0.25, 0.6)), int(h * rng.uniform(0.25, 0.6))
                piece = bgmod.picture(rng, (pw, ph), self.photos)
                image.paste(piece, (rng.randint(0, w - pw), rng.randint(0, h - ph)))
        else:
            image, kind = bgmod.background(rng, size, kind, self.photos)
        return image, kind

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        for j in range(job.samples_per_shard):
            seed = derive_seed(job.seed, index, j)
            rng = random.Random(seed)
            image, kind = self.image(rng)
            mean = tuple(int(c) for c in image.resize((1, 1), bgmod.Image.Resampling.BOX).getpixel((0, 0)))
            zh = rng.random() < job.caption_zh_fraction
            en_words, zh_words = _SCENE_WORDS[kind]
            caption = (
                f"一张{zh_words.format(c=color_name(mean, True))}的图片，没有文字。" if zh  # type: ignore[arg-type]
                else f"An image of {en_words.format(c=color_name(mean, False))}, with no text."  # type: ignore[arg-type]
            )
            key = f"natural_{index:06d}_{j:06d}"
            meta = SampleMeta(
                key=key, source=Source.NATURAL.value, width=image.width, height=image.height,
                text_class=TextClass.NONE.value, languages=[], lines=[], layout="none", format=f"procedural:{kind}",
                background=kind, seed=seed,
            )
            tally.add("kind", kind)
            yield Produced(
                key,
                {
                    job.image_format: encode_image(image, job.image_format, job.jpeg_quality),
                    CAPTION_EXTENSION: caption.encode("utf-8"),
                    META_EXTENSION: meta.to_json().encode("utf-8"),
                },
                meta,
            )


def run_natural(job: NaturalJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    producer = (lambda: NaturalProducer(job)) if job.input is None else None
    return job._run("natural", functools.partial(NaturalProducer, job), producer, resolved_config)
