"""`qwenimg-data --config-name design`: design data (posters, slides, UI), ingested or composed.

With `input:` set it ingests existing images (data_pipelines.sources.ingest); with
`input: null` (the embedded default) the design composer (data_pipelines.sources.design)
lays out text, shapes and pictures, and the synthetic job's loop renders, OCR-checks
and encodes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from data_pipelines.core.schema import Source
from data_pipelines.jobs.synthetic import FontsConfig, OcrConfig, SyntheticJob, SyntheticProducer, TextConfig, build_renderer
from data_pipelines.sources.design import DesignComposer, DesignConfig
from data_pipelines.sources.ingest import SourceJob
from data_pipelines.sources.render import RenderConfig


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

    prefix = Source.DESIGN.value

    def __init__(self, job: DesignJob):
        base = build_renderer(SyntheticJob(out_dir=job.out_dir, fonts=job.fonts, text=job.text, render=job.render))
        composer = DesignComposer(fonts=base.fonts, text=base.text, config=job.render, design=job.design)
        super().__init__(job, composer)  # type: ignore[arg-type]


def run_design(job: DesignJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    producer = (lambda: DesignProducer(job)) if job.input is None else None
    return job._run(Source.DESIGN.value, functools.partial(DesignProducer, job), producer, resolved_config)
