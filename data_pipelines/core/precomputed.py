"""Precomputed encoder inputs: what a shard stores, and the tag that guards it.

At scale the frozen Qwen2.5-VL-7B and the VAE need not sit on the training GPUs:
`qwenimg-data --config-name precompute` (data_pipelines.jobs.precompute) runs them once
and writes their outputs into shards beside the images, and `qwenimg-train
data.precomputed=true` reads them with the encoders never loaded. The released
model's own infrastructure works this way (producers encode, trainers train:
Qwen-Image report, §4).

Each sample gains one member, `<key>.pre.safetensors` (safetensors: no pickle, so a
shard cannot run code), holding for every bucket set `b` of the job:

    target@<W>x<H>    normalised VAE latents of the target at the sample's bucket   [z, H/8, W/8]
    source@<W>x<H>    the same for the source image (edit and reconstruction pairs)  [z, H/8, W/8]
    text@<W>x<H>      Qwen2.5-VL last hidden states, template prefix dropped         [T, D]
    null@<W>x<H>      the same for the empty prompt (caption dropout)               [T0, D]

keyed by the bucket the loader would pick for the sample in that bucket set (the
nearest aspect ratio, `data_pipelines.core.images.nearest_bucket`). T2I samples carry
no source, and their text does not depend on the bucket, so it is stored once, under
`text` / `null`. Edit samples' text does (the source image goes through the vision
tower at the bucket size), hence the per-bucket keys (`tensor_key` names them all).
Text rows hold only real tokens; the loader pads and masks them, as the online
encoder does.

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
# What a stored tensor holds (the key's part before "@").
KINDS = ("target", "source", "text", "null")


def size_name(size: tuple[int, int]) -> str:
    return bucket_name(size)


def tensor_key(kind: str, size: tuple[int, int] | None = None) -> str:
    """The key of a stored tensor: `kind` (target, source, text, null) at the bucket
    `size`, or without a bucket (the text and null rows of a T2I sample)."""
    assert kind in KINDS, kind
    return kind if size is None else f"{kind}@{size_name(size)}"


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
