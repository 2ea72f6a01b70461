"""`qwenimg-data --config-name natural`: text-free natural images, ingested or generated.

With `input:` set it ingests existing photos (data_pipelines.sources.ingest); with
`input: null` (the embedded default) the procedural generator
(data_pipelines.sources.natural) stands in for them.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from data_pipelines.core.schema import CAPTION_EXTENSION, META_EXTENSION, SampleMeta, Source, TextClass
from data_pipelines.core.sharded import Produced, Tally
from data_pipelines.core.shards import derive_seed, encode_image
from data_pipelines.sources.ingest import SourceJob
from data_pipelines.sources.natural import NaturalImages


@dataclass
class NaturalJob(SourceJob):
    sizes: list[str] = field(default_factory=lambda: ["512x512"])
    """Procedural mode: canvas sizes, "WxH" or "WxH:weight"."""
    caption_zh_fraction: float = 0.5


class NaturalProducer:
    """Shard `index` of procedural natural images: seeds, metadata and encoding."""

    def __init__(self, job: NaturalJob):
        self.job = job
        self.images = NaturalImages(job.sizes, job.caption_zh_fraction)

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        for j in range(job.samples_per_shard):
            seed = derive_seed(job.seed, index, j)
            rng = random.Random(seed)
            image, kind = self.images.image(rng)
            caption = self.images.caption(rng, image, kind)
            key = f"{Source.NATURAL.value}_{index:06d}_{j:06d}"
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
    return job._run(Source.NATURAL.value, functools.partial(NaturalProducer, job), producer, resolved_config)
