"""`qwenimg-data --config-name synthetic`: synthetic text renders as WebDataset shards.

Flow: config -> per-process renderer (fonts, text sampler, OCR engine) -> for each of
this node's incomplete shards: render samples by derived seed, optionally read them
back with OCR and drop the illegible ones, write the shard atomically with its
statistics -> manifest once every shard exists.

Determinism: the sample with index j of shard i is rendered from
`derive_seed(seed, i, j, attempt)`; nothing depends on the process that renders it,
so the same seed and config give byte-identical shards for any worker count.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data_pipelines.text.fonts import FontRegistry
from data_pipelines.core.ocr import DEFAULT_OCR_LANGUAGES, OCR_MODES, OcrEngine, verify_sample
from data_pipelines.core.schema import CAPTION_EXTENSION, META_EXTENSION
from data_pipelines.core.sharded import JobSettings, Produced, Tally, run_sharded
from data_pipelines.core.shards import derive_seed, encode_image
from data_pipelines.sources.render import RenderConfig, SyntheticRenderer
from data_pipelines.text.corpus import Corpus, TextSampler

log = logging.getLogger(__name__)

SHARD_PREFIX = "synthetic"


@dataclass
class FontsConfig:
    dirs: list[str] = field(default_factory=list)
    """Extra folders searched for .ttf/.otf/.ttc/.otc files."""
    use_fontconfig: bool = True
    """Also use every font fontconfig (`fc-list`) knows."""
    include: list[str] = field(default_factory=list)
    """Regexes on family names; when set, only matching faces are used."""
    exclude: list[str] = field(default_factory=lambda: ["Mono CJK"])
    """Regexes on family names of faces never used. Default: Noto's Mono CJK faces, whose
    CJK glyphs repeat Sans CJK's (fewer faces: the font cache hits more often)."""
    cache_size: int = 128
    """Pillow font objects (face x size) kept open per process: up to ~5 MB each once
    used; 128 keeps a worker near 0.9 GB, 256 near 1.5 GB and ~5% faster (measured)."""


@dataclass
class TextConfig:
    language_weights: dict[str, float] = field(
        default_factory=lambda: {"zh-Hans": 0.45, "zh-Hant": 0.05, "en": 0.25, "ja": 0.1, "ko": 0.05, "mixed": 0.1}
    )
    """Languages (BCP 47 tags, or `mixed` for CJK + English lines) with weights."""
    phrase_weight: float = 0.6
    """Weight of the built-in word/phrase lists among a language's sources."""
    random_chars_weight: float = 0.4
    """Weight of random characters from the codec-derived sets (rare glyphs)."""
    level2_fraction: float = 0.2
    """Share of GB 2312 level-2 (JIS level-2 for Japanese) among random hanzi."""
    corpora: list[dict[str, Any]] = field(default_factory=list)
    """User corpora: [{path, language, weight}], one item a line."""

    def __post_init__(self) -> None:
        parsed = []
        for i, c in enumerate(self.corpora):
            unknown = set(c) - {"path", "language", "weight"}
            if unknown or "path" not in c or "language" not in c:
                raise ValueError(f"text.corpora[{i}] = {c}: needs path and language (and optionally weight), nothing else")
            parsed.append(Corpus(str(c["path"]), str(c["language"]), float(c.get("weight", 1.0))))
        self.corpus_list = parsed


@dataclass
class OcrConfig:
    mode: str = "off"
    """off | crops (recogniser on each line's polygon) | full (detection + recognition)."""
    fraction: float = 1.0
    """Share of samples verified (chosen by seed): 1.0 every sample, 0.1 a tenth."""
    max_ned: float = 0.2
    """Drop a sample whose normalised edit distance (over its scored lines) exceeds this."""
    threads: int = 1
    """onnxruntime threads per worker process."""
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_OCR_LANGUAGES))
    """Languages the recogniser is trusted on; other lines are stored unverified."""

    def __post_init__(self) -> None:
        if self.mode not in OCR_MODES:
            raise ValueError(f"ocr.mode = {self.mode!r}; use one of {OCR_MODES}")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"ocr.fraction = {self.fraction} must lie in [0, 1]")
        if not 0 <= self.max_ned <= 1:
            raise ValueError(f"ocr.max_ned = {self.max_ned} must lie in [0, 1]")
        if self.threads < 1:
            raise ValueError(f"ocr.threads = {self.threads} must be >= 1")


@dataclass
class SyntheticJob(JobSettings):
    """Shared settings (data_pipelines.core.sharded.JobSettings) plus the renderer's."""

    max_attempts_factor: int = 4
    """Give up on a shard after samples_per_shard x this many renders (OCR drops
    are replaced by new renders, so every shard has samples_per_shard samples)."""
    fonts: FontsConfig = field(default_factory=FontsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_attempts_factor < 1:
            raise ValueError(f"max_attempts_factor = {self.max_attempts_factor} must be >= 1")

    def content_settings(self) -> dict[str, Any]:
        d = super().content_settings()
        d["ocr"].pop("threads")
        return d


# --- the producer ------------------------------------------------------------------


def build_renderer(job: SyntheticJob) -> SyntheticRenderer:
    fonts = FontRegistry.discover(
        dirs=job.fonts.dirs,
        use_fontconfig=job.fonts.use_fontconfig,
        include=job.fonts.include,
        exclude=job.fonts.exclude,
        cache_size=job.fonts.cache_size,
    )
    text = TextSampler(
        language_weights=job.text.language_weights,
        phrase_weight=job.text.phrase_weight,
        random_chars_weight=job.text.random_chars_weight,
        level2_fraction=job.text.level2_fraction,
        corpora=job.text.corpus_list,
        covered=fonts.union_covers,
    )
    return SyntheticRenderer(fonts=fonts, text=text, config=job.render)


def ocr_check(ocr: OcrEngine | None, config: OcrConfig, seed: int, image, meta, tally: Tally) -> bool:
    """Verify a fresh render when the seed selects it; False means drop it. Counts outcomes."""
    if ocr is None or derive_seed(seed, "ocr") / 2**63 >= config.fraction:
        tally.add("ocr", "not_checked")
        return True
    score = verify_sample(ocr, image, meta, config.mode)
    if not meta.lines:
        tally.add("ocr", "no_text")
    elif score is None:
        tally.add("ocr", "unscored")  # only languages the recogniser does not read
    elif score > config.max_ned:
        tally.add("ocr", "dropped")
        return False
    else:
        tally.add("ocr", "passed")
    return True


class SyntheticProducer:
    """Renders shard `index` from derived seeds; OCR drops are replaced by new renders.

    Any renderer with `render(seed, key)` serves (the design composer reuses this).
    """

    prefix = SHARD_PREFIX

    def __init__(self, job: SyntheticJob, renderer: SyntheticRenderer | None = None):
        self.job = job
        self.renderer = renderer or build_renderer(job)
        self.ocr = OcrEngine(threads=job.ocr.threads, languages=job.ocr.languages) if job.ocr.mode != "off" else None

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        job = self.job
        attempts = 0
        for j in range(job.samples_per_shard):
            while True:
                if attempts >= job.samples_per_shard * job.max_attempts_factor:
                    raise RuntimeError(
                        f"{self.prefix} shard {index}: {attempts} renders for {j} accepted samples; OCR drops too many "
                        f"(raise ocr.max_ned or check fonts/sizes)"
                    )
                seed = derive_seed(job.seed, index, j, attempts)
                attempts += 1
                key = f"{self.prefix}_{index:06d}_{j:06d}"
                sample = self.renderer.render(seed, key)
                if ocr_check(self.ocr, job.ocr, seed, sample.image, sample.meta, tally):
                    break
            tally.add("background", sample.meta.background)
            yield Produced(
                key,
                {
                    job.image_format: encode_image(sample.image, job.image_format, job.jpeg_quality),
                    CAPTION_EXTENSION: sample.caption.encode("utf-8"),
                    META_EXTENSION: sample.meta.to_json().encode("utf-8"),
                },
                sample.meta,
            )
        tally.add("renders", "total", attempts)


def run(job: SyntheticJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate this node's shards; write the manifest when all shards exist. Returns a summary."""
    # Built here first: a bad font folder or corpus fails now, with its message,
    # instead of inside a worker pool; it also serves the in-process path.
    producer = SyntheticProducer(job)
    text_stats = producer.renderer.text.stats
    sharded = job.sharded(
        prefix=SHARD_PREFIX,
        make_producer=functools.partial(SyntheticProducer, job),
        manifest_extra={
            "source": "synthetic",
            "image_format": job.image_format,
            "config": resolved_config if resolved_config is not None else asdict(job),
            "corpus_items": text_stats["corpus_items"],
            "corpus_items_dropped_uncovered": text_stats["corpus_items_dropped_uncovered"],
        },
    )
    return run_sharded(sharded, producer)
