"""Precomputed encoder inputs: what a shard stores, and the tag that guards it.

At scale the frozen Qwen2.5-VL-7B and the VAE need not sit on the training GPUs:
`qwenimg-data --config-name precompute` (data_pipelines.jobs.precompute) runs them once
and writes their outputs into shards beside the images, and `qwenimg-train
data.precomputed=true` reads them with the encoders never loaded. The released
model's own infrastructure works this way (producers encode, trainers train:
Qwen-Image report, §4).

Each sample gains one member, `<key>.pre.safetensors` (safetensors: no pickle, so a
shard cannot run code), holding what the model family's encoders give for the sample
alone (`encode_ahead` of the family's frozen encoders), for every bucket set `b` of the
job. Its keys are `<kind>@<W>x<H>`, the bucket the loader would pick for the sample in
that bucket set (the nearest aspect ratio, `data_pipelines.core.images.nearest_bucket`),
or `<kind>` alone for what does not depend on the bucket. The kinds (`KINDS`):

    target       normalised VAE latents of the target                     every family
    text         the prompt's encoder hidden states, real tokens only      every family
    null         the same for the empty prompt (caption dropout)            every family
    source       VAE latents of the (first) source image                   Qwen-Image, Edit(-Plus)
    source2/3    of the second and third source (multi-image edits)        Edit-Plus
    slots        bool: the condition images' slots in `text`               Qwen-Image-2.1
    nullslots    the same in `null`                                        Qwen-Image-2.1
    conditions   the condition images' latents, in order, [M, C]           Qwen-Image-2.1
    condshapes   int [k, 3]: (frame, h, w) of each condition               Qwen-Image-2.1

T2I samples' text does not depend on the bucket, so it is stored once, under `text` /
`null`; an edit's does (its sources go through the vision tower at the bucket size),
hence per-bucket keys. `for_bucket` picks one sample's tensors for a bucket, the empty
prompt's in place of the prompt's when the caption is dropped; the family's model
collates them (text rows unpadded: it pads and masks them as its online encoder does).

The tag (`PrecomputeTag`) names what made the tensors: content fingerprints of the
text encoder (with its tokenizer and processor) and of the VAE, the model family's
prompt fingerprint (templates and their drop counts), the sequence cap, the dtype and
the bucket sets. It lives in the folder's manifest.json under "precompute"; training
compares it with the tag its own model folder and settings give, and refuses a stale
cache with an error naming both tags.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from data_pipelines.core.geometry import bucket_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

MEMBER = "pre.safetensors"
"""The tar member suffix (WebDataset field name) of a sample's precomputed tensors."""
ENCODER_DTYPES = ("float32", "bfloat16", "float16")
"""dtypes the encoders may run in and the tensors be stored in (model.encoder_dtype)."""
TAG_FORMAT = 1
# Files whose whole content is hashed; larger ones are sampled (see _file_digest).
_SMALL_FILE = 64 << 20
_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16
# What a stored tensor holds (the key's part before "@"); the module docstring says which family stores which.
KINDS = ("target", "text", "null", "source", "source2", "source3", "slots", "nullslots", "conditions", "condshapes")
# A dropped caption reads these in place of the prompt's.
NULL_KINDS = {"text": "null", "slots": "nullslots"}


def size_name(size: tuple[int, int]) -> str:
    return bucket_name(size)


def tensor_key(kind: str, size: tuple[int, int] | None = None) -> str:
    """The key of a stored tensor: `kind` (`KINDS`) at the bucket `size`, or without a
    bucket (the text and null rows of a T2I sample)."""
    assert kind in KINDS, kind
    return kind if size is None else f"{kind}@{size_name(size)}"


def for_bucket(stored: Mapping[str, "torch.Tensor"], size: tuple[int, int], *, dropped: bool) -> dict[str, "torch.Tensor"]:
    """One sample's tensors for bucket `size`, by kind: those stored at `size` or without a
    bucket; with `dropped` (caption dropout) the empty prompt's (`null`, `nullslots`) under
    the prompt's names. A KeyError names a missing target or text (a shard that does not
    match its manifest's tag)."""
    at = size_name(size)
    chosen: dict[str, "torch.Tensor"] = {}
    for key, tensor in stored.items():
        kind, _, bucket = key.partition("@")
        if not bucket or bucket == at:
            chosen[kind] = tensor
    for kind, null in NULL_KINDS.items():
        if dropped and null not in chosen and kind in chosen:
            raise KeyError(tensor_key(null, size))
        replacement = chosen.pop(null, None)
        if dropped:
            chosen[kind] = replacement
    for kind in ("target", "text"):
        if chosen.get(kind) is None:
            raise KeyError(tensor_key(kind, size))
    return {k: v for k, v in chosen.items() if v is not None}


@dataclass
class AheadSample:
    """One sample as the precompute job hands it to a family's `encode_ahead`."""

    prompt: str
    images: dict[tuple[int, int], list["torch.Tensor"]]
    """Per bucket: uint8 CHW images decoded as the loader would, the target first, then the
    sources in picture order (none for T2I)."""

    @property
    def num_sources(self) -> int:
        return len(next(iter(self.images.values()))) - 1


def rows(embeds_btd: "torch.Tensor", mask_bt: "torch.Tensor") -> list["torch.Tensor"]:
    """Padded encoder output -> each row's real tokens [T_i, D] (right padding)."""
    return [e[: int(m.sum())] for e, m in zip(embeds_btd, mask_bt)]


def _file_digest(path: Path, h) -> None:
    """Feed a file into `h`: its size, then all of it when small, else (a 7B encoder is
    16 GB) its first 1 MiB (a safetensors header lists every tensor's name, dtype,
    shape and offset) plus 16 evenly spaced 64 KiB samples. Two checkpoints that differ
    in any trained weight differ in nearly every sampled block."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if size <= _SMALL_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        h.update(f.read(1 << 20))
        for k in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * k // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))


def folder_fingerprint(*folders: str | Path) -> str:
    """A content fingerprint of model folders (paths do not enter it: a copied or
    re-downloaded checkpoint keeps its fingerprint)."""
    h = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            h.update(b"<absent>\n")
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode() + b"\n")
            _file_digest(path, h)
    return h.hexdigest()[:16]


@dataclass
class PrecomputeTag:
    """What made a folder's precomputed tensors (stored in its manifest)."""

    encoder: str
    """Fingerprint of text_encoder/, tokenizer/ and processor/ of the model folder."""
    vae: str
    """Fingerprint of vae/."""
    template: str
    """The model family's prompt fingerprint (templates and their drop counts)."""
    max_sequence_length: int
    dtype: str
    """dtype the encoders ran and the tensors are stored in (model.encoder_dtype)."""
    bucket_sets: list[list[str]] = field(default_factory=list)
    """Each a list of "WxH" buckets; a training stage's buckets must equal one of them."""
    null_prompts: bool = True
    """Whether empty-prompt encodings are stored (needed when caption_dropout > 0)."""
    format: int = TAG_FORMAT

    @classmethod
    def for_model(cls, model_folder: str | Path, *, family: Any, dtype: str, max_sequence_length: int,
                  bucket_sets: Sequence[Sequence[str]] = (), null_prompts: bool = True) -> "PrecomputeTag":
        """The tag of `model_folder`'s encoders; `family` (qwenimg_train.models.get_family)
        gives the prompt fingerprint."""
        folder = Path(model_folder)
        return cls(
            encoder=folder_fingerprint(folder / "text_encoder", folder / "tokenizer", folder / "processor"),
            vae=folder_fingerprint(folder / "vae"),
            template=family.prompt_fingerprint(),
            max_sequence_length=max_sequence_length, dtype=dtype,
            bucket_sets=[list(b) for b in bucket_sets], null_prompts=null_prompts,
        )

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], where: str) -> "PrecomputeTag":
        tag = manifest.get("precompute")
        if not isinstance(tag, Mapping):
            raise ValueError(
                f"{where} holds no precomputed inputs (its manifest.json has no 'precompute' tag): run "
                f"`qwenimg-data --config-name precompute in_dir=<its images> out_dir=...` and point data.sources "
                "at the output, or train with data.precomputed=false"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in tag.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_against(self, expected: "PrecomputeTag", where: str) -> None:
        """Refuse tensors made by other encoders, templates, dtype or sequence cap."""
        keys = ("format", "encoder", "vae", "template", "max_sequence_length", "dtype")
        differ = [k for k in keys if getattr(self, k) != getattr(expected, k)]
        if differ:
            mine = {k: getattr(self, k) for k in keys}
            theirs = {k: getattr(expected, k) for k in keys}
            raise ValueError(
                f"precomputed inputs in {where} do not match this run ({', '.join(differ)} differ): made with "
                f"{mine}, this run's model and settings give {theirs}. Precompute again with the run's model folder "
                "and model.encoder_dtype / model.max_sequence_length, or set them to the tag's values"
            )

    def check_buckets(self, stage_name: str, sizes: Sequence[tuple[int, int]], where: str) -> None:
        wanted = sorted(size_name(s) for s in sizes)
        if not any(sorted(b) == wanted for b in self.bucket_sets):
            raise ValueError(
                f"stage {stage_name!r} trains at buckets {wanted}, but the precomputed inputs in {where} were made "
                f"for bucket sets {self.bucket_sets}; precompute with resolutions/bucket_sets that include {wanted}"
            )


def to_bytes(tensors: Mapping[str, "torch.Tensor"]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load

    return load(data)
