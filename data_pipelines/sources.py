"""`qwenimg-data --config-name design` and `--config-name natural`.

Each source has two producers: ingest of existing images (`input:` set; see
data_pipelines.ingest) or a procedural generator (`input: null`, the embedded
default): the design composer for design data, and a text-free image generator
(gradients, textures, shapes, simple scenes) standing in for photos.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data_pipelines.design import DesignComposer, DesignConfig
from data_pipelines.ingest import IngestConfig, run_ingest
from data_pipelines.jobs import Produced, ShardedJob, Tally, run_sharded
from data_pipelines.ocr import OcrEngine
from data_pipelines.schema import CAPTION_EXTENSION, META_EXTENSION, SampleMeta, Source, TextClass
from data_pipelines.shards import derive_seed, encode_image
from data_pipelines.synthetic import background as bgmod
from data_pipelines.synthetic.captions import color_name
from data_pipelines.synthetic.job import FontsConfig, OcrConfig, SyntheticJob, TextConfig, build_renderer, ocr_check
from data_pipelines.synthetic.render import RenderConfig


@dataclass
class SourceJob:
    """Settings shared by the design and natural jobs."""

    out_dir: str
    seed: int = 0
    num_shards: int = 4
    """Procedural mode only: ingest derives the shard count from the input."""
    samples_per_shard: int = 256
    workers: int = 1
    node_rank: int | None = None
    num_nodes: int | None = None
    overwrite: bool = False
    progress: bool = True
    image_format: str = "jpg"
    jpeg_quality: int = 90
    input: IngestConfig | None = None
    """Ingest existing images (folder, jsonl, webdataset, anyword) instead of generating."""

    def __post_init__(self) -> None:
        for name in ("num_shards", "samples_per_shard", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format = {self.image_format!r}; use 'jpg' or 'png'")

    def content_settings(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("out_dir", "workers", "node_rank", "num_nodes", "overwrite", "progress", "num_shards", "input"):
            d.pop(key)
        d.get("ocr", {}).pop("threads", None)
        return d

    def _run(self, source: str, make_producer, producer, resolved_config) -> dict[str, Any]:
        if self.input is not None:
            return run_ingest(
                self.input, source=source, out_dir=self.out_dir, workers=self.workers, node_rank=self.node_rank,
                num_nodes=self.num_nodes, overwrite=self.overwrite, progress=self.progress, resolved_config=resolved_config,
            )
        return run_sharded(
            ShardedJob(
                out_dir=self.out_dir, prefix=source, num_shards=self.num_shards, settings=self.content_settings(),
                make_producer=make_producer, workers=self.workers, node_rank=self.node_rank, num_nodes=self.num_nodes,
                overwrite=self.overwrite, progress=self.progress, samples_per_shard=self.samples_per_shard,
                manifest_extra={
                    "source": source, "seed": self.seed, "samples_per_shard": self.samples_per_shard,
                    "config": resolved_config if resolved_config is not None else asdict(self),
                },
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


class DesignProducer:
    def __init__(self, job: DesignJob):
        self.job = job
        base = build_renderer(SyntheticJob(out_dir=job.out_dir, fonts=job.fonts, text=job.text, render=job.render))
        self.composer = DesignComposer(fonts=base.fonts, text=base.text, config=job.render, design=job.design)
        self.ocr = OcrEngine(threads=job.ocr.threads, languages=job.ocr.languages) if job.ocr.mode != "off" else None

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        attempts = 0
        for j in range(job.samples_per_shard):
            while True:
                if attempts >= 4 * job.samples_per_shard:
                    raise RuntimeError(f"design shard {index}: OCR drops too many designs (raise ocr.max_ned)")
                seed = derive_seed(job.seed, index, j, attempts)
                attempts += 1
                key = f"design_{index:06d}_{j:06d}"
                sample = self.composer.render(seed, key)
                if ocr_check(self.ocr, job.ocr, seed, sample.image, sample.meta, tally):
                    break
            yield Produced(
                key,
                {
                    job.image_format: encode_image(sample.image, job.image_format, job.jpeg_quality),
                    CAPTION_EXTENSION: sample.caption.encode("utf-8"),
                    META_EXTENSION: sample.meta.to_json().encode("utf-8"),
                },
                sample.meta,
            )


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
