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

import logging
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipelines.fonts import FontRegistry
from data_pipelines.ocr import DEFAULT_OCR_LANGUAGES, OCR_MODES, OcrEngine, verify_sample
from data_pipelines.schema import CAPTION_EXTENSION, META_EXTENSION
from data_pipelines.shards import (
    AtomicShardWriter,
    ShardSet,
    derive_seed,
    encode_image,
    fingerprint,
    node_shards,
    node_split,
)
from data_pipelines.synthetic.render import RenderConfig, SyntheticRenderer
from data_pipelines.synthetic.text import Corpus, TextSampler

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
class SyntheticJob:
    out_dir: str
    """Folder for the shards, their statistics and manifest.json."""
    seed: int = 0
    num_shards: int = 8
    samples_per_shard: int = 256
    """Samples in every shard (a fixed count: OCR drops are replaced by new renders)."""
    workers: int = 1
    """Processes on this node."""
    node_rank: int | None = None
    """This node's index among `num_nodes`; null reads SLURM_ARRAY_TASK_ID or RANK."""
    num_nodes: int | None = None
    """Nodes sharing the job by shard index; null reads SLURM_ARRAY_TASK_COUNT or WORLD_SIZE."""
    overwrite: bool = False
    """Delete this node's existing shards first (else complete shards are kept: resume)."""
    image_format: str = "jpg"
    jpeg_quality: int = 90
    max_attempts_factor: int = 4
    """Give up on a shard after samples_per_shard x this many renders (OCR drops)."""
    progress: bool = True
    fonts: FontsConfig = field(default_factory=FontsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)

    def __post_init__(self) -> None:
        for name in ("num_shards", "samples_per_shard", "workers", "max_attempts_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format = {self.image_format!r}; use 'jpg' or 'png'")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality = {self.jpeg_quality} must lie in [1, 100]")

    def content_settings(self) -> dict[str, Any]:
        """The settings that decide shard content (the resume fingerprint)."""
        d = asdict(self)
        for key in ("out_dir", "workers", "node_rank", "num_nodes", "overwrite", "progress", "num_shards"):
            d.pop(key)
        d["ocr"].pop("threads")
        return d


# --- per-process state ---------------------------------------------------------------

_STATE: dict[str, Any] = {}


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


def _init_worker(job: SyntheticJob, counter, renderer: SyntheticRenderer | None = None) -> None:
    _STATE["job"] = job
    _STATE["renderer"] = renderer or build_renderer(job)
    _STATE["ocr"] = OcrEngine(threads=job.ocr.threads, languages=job.ocr.languages) if job.ocr.mode != "off" else None
    _STATE["counter"] = counter


def generate_shard(index: int) -> dict[str, Any]:
    """Render, verify and write one shard; returns its statistics."""
    job: SyntheticJob = _STATE["job"]
    renderer: SyntheticRenderer = _STATE["renderer"]
    ocr: OcrEngine | None = _STATE["ocr"]
    counter = _STATE.get("counter")
    shards = ShardSet(job.out_dir, SHARD_PREFIX, job.num_shards, fingerprint(job.content_settings()))
    counts: dict[str, Counter] = {k: Counter() for k in ("text_class", "language", "layout", "format", "background", "ocr")}
    writer = AtomicShardWriter(shards.tar_path(index))
    attempts = 0
    try:
        for j in range(job.samples_per_shard):
            while True:
                if attempts >= job.samples_per_shard * job.max_attempts_factor:
                    raise RuntimeError(
                        f"shard {index}: {attempts} renders for {j} accepted samples; OCR drops too many "
                        f"(raise ocr.max_ned or check fonts/sizes)"
                    )
                seed = derive_seed(job.seed, index, j, attempts)
                attempts += 1
                key = f"{SHARD_PREFIX}_{index:06d}_{j:06d}"
                sample = renderer.render(seed, key)
                if ocr is not None and derive_seed(seed, "ocr") / 2**63 < job.ocr.fraction:
                    score = verify_sample(ocr, sample.image, sample.meta, job.ocr.mode)
                    if not sample.meta.lines:
                        counts["ocr"]["no_text"] += 1
                    elif score is None:
                        counts["ocr"]["unscored"] += 1  # only languages the recogniser does not read
                    elif score > job.ocr.max_ned:
                        counts["ocr"]["dropped"] += 1
                        continue
                    else:
                        counts["ocr"]["passed"] += 1
                else:
                    counts["ocr"]["not_checked"] += 1
                break
            sample.meta.validate()
            writer.write(
                key,
                {
                    job.image_format: encode_image(sample.image, job.image_format, job.jpeg_quality),
                    CAPTION_EXTENSION: sample.caption.encode("utf-8"),
                    META_EXTENSION: sample.meta.to_json().encode("utf-8"),
                },
            )
            counts["text_class"][sample.meta.text_class] += 1
            counts["layout"][sample.meta.layout] += 1
            counts["format"][sample.meta.format] += 1
            counts["background"][sample.meta.background] += 1
            for lang in sample.meta.languages:
                counts["language"][lang] += 1
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats = {
        "shard": index,
        "num_samples": writer.count,
        "renders": attempts,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
    }
    shards.write_stats(index, stats)
    return stats


def run(job: SyntheticJob, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate this node's shards; write the manifest when all shards exist. Returns a summary."""
    node_rank, num_nodes = node_split(job.node_rank, job.num_nodes)
    # Built here too, before any worker starts: a bad font folder or corpus fails now,
    # with its message, instead of inside a pool.
    checked = build_renderer(job)
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = ShardSet(out_dir, SHARD_PREFIX, job.num_shards, fingerprint(job.content_settings()))
    mine = node_shards(job.num_shards, node_rank, num_nodes)
    if job.overwrite:
        shards.clean(mine)
    shards.remove_partial(mine)  # temporary files of a killed run (this node's shards only)
    todo = [i for i in mine if not shards.is_complete(i)]
    kept = len(mine) - len(todo)
    if kept:
        log.info("resuming: %d of this node's %d shards are complete and kept", kept, len(mine))

    start = time.perf_counter()
    total = len(mine) * job.samples_per_shard
    bar = tqdm(total=total, initial=kept * job.samples_per_shard, unit="img", desc=f"synthetic [node {node_rank}/{num_nodes}]", disable=not job.progress)
    if job.workers == 1 or len(todo) <= 1:
        _init_worker(job, None, checked)
        for index in todo:
            stats = generate_shard(index)
            bar.update(stats["num_samples"])
    else:
        ctx = mp.get_context("spawn")  # onnxruntime and FreeType state are not fork-safe
        counter = ctx.Value("l", 0)
        with ctx.Pool(min(job.workers, len(todo)), initializer=_init_worker, initargs=(job, counter)) as pool:
            pending = pool.map_async(generate_shard, todo, chunksize=1)
            seen = 0
            while not pending.ready():
                pending.wait(0.2)
                value = counter.value
                bar.update(value - seen)
                seen = value
            pending.get()  # re-raises a worker's exception
            bar.update(counter.value - seen)
    bar.close()
    elapsed = time.perf_counter() - start
    rendered = len(todo) * job.samples_per_shard

    summary: dict[str, Any] = {
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "shards_written": len(todo),
        "shards_kept": kept,
        "samples_written": rendered,
        "seconds": round(elapsed, 2),
        "images_per_second": round(rendered / elapsed, 1) if rendered and elapsed > 0 else None,
        "manifest": None,
    }
    if shards.all_complete():
        extra = {
            "source": "synthetic",
            "seed": job.seed,
            "samples_per_shard": job.samples_per_shard,
            "image_format": job.image_format,
            "config": resolved_config if resolved_config is not None else asdict(job),
        }
        extra["corpus_items"] = checked.text.stats["corpus_items"]
        extra["corpus_items_dropped_uncovered"] = checked.text.stats["corpus_items_dropped_uncovered"]
        summary["manifest"] = str(shards.write_manifest(extra))
    log.info("synthetic: %s", summary)
    return summary
