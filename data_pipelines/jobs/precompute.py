"""`qwenimg-data --config-name precompute`: encoder outputs written into shards, once.

The producer side of precomputed training (data_pipelines.core.precomputed has the format
and the tag). For every sample of an input shard folder (synthetic, design, natural
or edit pairs, as the other jobs write them) it runs the frozen encoders of a model
folder exactly as training would online:

    decode      the target and an edit's one to three sources at the bucket the loader
                would pick, with the loader's own decoder
                (`data_pipelines.core.images.decode_image`), for each bucket set of the job
    encode      the model family's encoders (`encode_ahead`, `family=`): its VAE latents
                of every image, its vision-language encoder over the caption, or the
                instruction with the source images; and the empty prompt (caption dropout)

and writes the sample back under the same shard name with one more member,
`<key>.pre.safetensors`, plus the original members (images too, unless
keep_images=false). The output folder's manifest carries the tag.

Work is split by shard index across processes and nodes like every `qwenimg-data`
job: under torchrun each rank takes its slice (RANK / WORLD_SIZE) and runs on
`cuda:LOCAL_RANK`; under a SLURM array each task takes its slice. Shards are written
atomically, a rerun keeps complete ones, and an unreadable sample is skipped and
counted, never fatal.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from data_pipelines.core.geometry import bucket_name, check_size, parse_bucket
from data_pipelines.core.images import decode_image, nearest_bucket
from data_pipelines.core.precomputed import ENCODER_DTYPES, MEMBER, AheadSample, PrecomputeTag, to_bytes
from data_pipelines.core.sharded import Produced, ShardedJob, Tally, run_sharded
from data_pipelines.core.schema import (
    CAPTION_EXTENSION,
    EXTRA_SOURCE_PREFIXES,
    IMAGE_EXTENSIONS,
    INSTRUCTION_EXTENSION,
    META_EXTENSION,
    SOURCE_IMAGE_PREFIX,
    SampleMeta,
    Task,
)
from data_pipelines.core.untrusted import MAX_IMAGE_PIXELS, BadSample, check_key, parse_meta, read_tar_samples
from data_pipelines.jobs.verify import check_in_out, input_shards

log = logging.getLogger(__name__)


@dataclass
class PrecomputeJob:
    in_dir: str
    """A shard folder written by another qwenimg-data job (its manifest is carried over), local
    or a remote folder location (https://, s3://, pipe:...; data_pipelines.core.remote)."""
    out_dir: str
    """Folder for the shards with precomputed inputs (same names) and their manifest."""
    pretrained_path: str
    """The diffusers model folder whose encoders train with: the same as model.pretrained_path."""
    family: str = "qwen_image"
    """The run's model.family (qwenimg_train.models.FAMILIES): loads the encoders, names the prompt templates."""
    encoder_dtype: str = "float32"
    """dtype the encoders run and the tensors are stored in: the run's model.encoder_dtype."""
    max_sequence_length: int = 1024
    """The run's model.max_sequence_length."""
    resolutions: list[int] = field(default_factory=lambda: [512])
    """Square resolutions to encode at, one bucket set each (a stage's `resolution`)."""
    bucket_sets: list[list[str]] = field(default_factory=list)
    """Aspect-ratio bucket sets ("WxH" lists, a stage's `buckets`), in addition to resolutions."""
    null_prompts: bool = True
    """Also store the empty prompt's encoding (needed by stages with caption_dropout > 0)."""
    keep_images: bool = True
    """Copy the image members too (previews, evaluation); false keeps captions and metadata only."""
    reduced_decode: bool = True
    """Decode JPEGs at reduced size where the bucket allows, as the loader does (data.reduced_decode)."""
    batch_size: int = 8
    """Samples encoded together."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are skipped as `oversized` (decompression bombs)."""
    device: str = "auto"
    """auto: cuda:LOCAL_RANK when a GPU is present, else cpu."""
    build_tiny: bool = False
    """Build the tiny folder at pretrained_path when missing (tests, demo)."""
    tiny_world: str = "random"
    """Which tiny folder build_tiny builds: random weights, or "glyphs" (= the run's model.tiny_world)."""
    workers: int = 1
    """Processes on this node (each loads the encoders: on GPUs use torchrun ranks instead)."""
    node_rank: int | None = None
    num_nodes: int | None = None
    overwrite: bool = False
    progress: bool = True
    remote_retries: int = 3
    """A remote in_dir: tries after a failed manifest or shard download (then the job stops)."""
    remote_backoff_s: float = 2.0
    """Seconds before the first retry, doubling after each."""

    def __post_init__(self) -> None:
        from qwenimg_train.models import FAMILIES, get_family

        check_in_out(self.in_dir, self.out_dir, "precompute")
        if self.remote_retries < 0 or self.remote_backoff_s < 0:
            raise ValueError(f"remote_retries = {self.remote_retries} and remote_backoff_s = {self.remote_backoff_s} "
                             "must be >= 0")
        if self.family not in FAMILIES:
            raise ValueError(f"family = {self.family!r}; use one of {sorted(FAMILIES)} (the run's model.family)")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(f"encoder_dtype = {self.encoder_dtype!r}; use one of {sorted(ENCODER_DTYPES)}")
        cap = get_family(self.family).max_sequence_length
        if not 1 <= self.max_sequence_length <= cap:
            raise ValueError(f"max_sequence_length = {self.max_sequence_length} must lie in [1, {cap}]")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("batch_size and workers must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {self.max_image_pixels} must be >= 1 (default {MAX_IMAGE_PIXELS})")
        if not self.resolutions and not self.bucket_sets:
            raise ValueError("resolutions and bucket_sets are both empty: give at least one (e.g. resolutions=[512])")
        for w, h in (s for b in self.sizes() for s in b):
            check_size(w, h)

    def sizes(self) -> list[list[tuple[int, int]]]:
        """Every bucket set as (width, height) pairs."""
        return [[(r, r)] for r in self.resolutions] + [[parse_bucket(b) for b in s] for s in self.bucket_sets]

    def bucket_names(self) -> list[list[str]]:
        return [[bucket_name(size) for size in s] for s in self.sizes()]


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class _Item:
    raw: dict[str, Any]
    meta: SampleMeta
    sample: AheadSample


class PrecomputeProducer:
    """Encodes input shard `index` (one per process: the encoders load once)."""

    def __init__(self, job: PrecomputeJob):
        from qwenimg_train.models import get_family

        self.job = job
        self.folder = input_shards(job.in_dir, job.remote_retries, job.remote_backoff_s)[1]
        self.device = _device(job.device)
        self.encoders = get_family(job.family).load_encoders(job.pretrained_path, dtype=job.encoder_dtype,
                                                             max_sequence_length=job.max_sequence_length).to(self.device)
        self.bucket_sets = job.sizes()

    def produce(self, index: int, tally: Tally) -> Iterator[Produced]:
        shard = self.folder.shards[index]
        with self.folder.local_copy(shard) as path:
            yield from self._encoded(shard, path, tally)

    def _encoded(self, shard, path: Path, tally: Tally) -> Iterator[Produced]:
        chunk: list[_Item] = []
        for raw in read_tar_samples(str(path), report=tally.skip, label=shard.location):
            item = self._read(raw, f"{shard.name}:{raw.get('__key__')!r}", tally)
            if item is None:
                continue
            chunk.append(item)
            if len(chunk) == self.job.batch_size:
                yield from self._flush(chunk, tally)
                chunk = []
        if chunk:
            yield from self._flush(chunk, tally)

    def _read(self, raw: dict[str, Any], where: str, tally: Tally) -> _Item | None:
        pixels = self.job.max_image_pixels
        try:
            check_key(raw["__key__"])  # it names the output's tar members
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext is None or META_EXTENSION not in raw:
                raise BadSample("missing_member", "image or json member missing")
            meta = parse_meta(raw[META_EXTENSION])
            edit = f"{SOURCE_IMAGE_PREFIX}.{ext}" in raw and INSTRUCTION_EXTENSION in raw
            members = [ext]  # the target, then the sources in picture order (as the loader reads them)
            if edit:
                count = ((meta.extra or {}).get("edit") or {}).get("num_sources", 1)
                if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1 + len(EXTRA_SOURCE_PREFIXES):
                    raise BadSample("bad_meta", f"extra.edit.num_sources = {count!r}")
                members += [f"{prefix}.{ext}" for prefix in (SOURCE_IMAGE_PREFIX, *EXTRA_SOURCE_PREFIXES)[:count]]
                missing = [m for m in members if m not in raw]
                if missing:
                    raise BadSample("missing_member", f"no {', '.join(missing)} member")
            prompt_member = INSTRUCTION_EXTENSION if edit else CAPTION_EXTENSION
            if prompt_member not in raw:
                raise BadSample("missing_member", f"no {prompt_member} member")
            try:
                prompt = raw[prompt_member].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample("bad_caption", str(exc)) from None
            images = {}
            for sizes in self.bucket_sets:
                size = nearest_bucket(meta.width, meta.height, sizes)
                if size in images:
                    continue
                # HWC uint8 as the loader decodes it (a writable copy, as its collate
                # makes), then the CHW view its Batch carries: the target, then the sources.
                images[size] = [torch.from_numpy(decode_image(raw[m], size, self.job.reduced_decode, pixels).copy())
                                .permute(2, 0, 1) for m in members]
        except BadSample as bad:  # a bad sample is skipped and counted, never fatal
            tally.skip(where, str(bad))
            return None
        return _Item(raw, meta, AheadSample(prompt, images))

    @torch.no_grad()
    def _flush(self, chunk: list[_Item], tally: Tally) -> Iterator[Produced]:
        """The family's encoders encode the chunk (`encode_ahead`: what its model encodes online)."""
        encoded = self.encoders.encode_ahead([it.sample for it in chunk], null_prompts=self.job.null_prompts)
        for it, tensors in zip(chunk, encoded):
            tally.add("precompute", "edit" if it.sample.num_sources else Task.T2I.value)
            fields = {k: v for k, v in it.raw.items() if k != "__key__"}
            if not self.job.keep_images:
                fields = {k: v for k, v in fields.items() if k.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS}
            fields[MEMBER] = to_bytes(tensors)
            yield Produced(it.raw["__key__"], fields, it.meta)


def job_tag(job: PrecomputeJob) -> PrecomputeTag:
    from qwenimg_train.models import get_family

    return PrecomputeTag.for_model(job.pretrained_path, family=get_family(job.family), dtype=job.encoder_dtype,
                                   max_sequence_length=job.max_sequence_length, bucket_sets=job.bucket_names(),
                                   null_prompts=job.null_prompts)


def run(job: PrecomputeJob) -> dict[str, Any]:
    from qwenimg_train.models import get_family

    family = get_family(job.family)
    if job.build_tiny:
        family.build_tiny(job.pretrained_path, world=job.tiny_world)
    family.check_folder(job.pretrained_path)
    prefix, folder = input_shards(job.in_dir, job.remote_retries, job.remote_backoff_s)
    tag = job_tag(job)
    extra: dict[str, Any] = {"precompute": tag.to_dict(), "precomputed_from": folder.identity}
    if folder.manifest is not None:
        source = folder.manifest
        extra["source_manifest"] = source
        if "source" in source:
            extra["source"] = source["source"]
    settings = {"in_dir": extra["precomputed_from"], "tag": tag.to_dict(), "keep_images": job.keep_images,
                "reduced_decode": job.reduced_decode}
    if job.max_image_pixels != MAX_IMAGE_PIXELS:  # only when changed: earlier outputs keep their fingerprint
        settings["max_image_pixels"] = job.max_image_pixels
    summary = run_sharded(
        ShardedJob(
            out_dir=job.out_dir, prefix=prefix, num_shards=len(folder.shards), settings=settings,
            make_producer=functools.partial(PrecomputeProducer, job), workers=job.workers, node_rank=job.node_rank,
            num_nodes=job.num_nodes, overwrite=job.overwrite, progress=job.progress, manifest_extra=extra,
        )
    )
    summary["precompute"] = tag.to_dict()
    return summary
