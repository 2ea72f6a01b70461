"""Shard files: naming, atomic writing, resume, splitting work, the manifest.

A job writes `<prefix>-<index:06d>.tar` shards of a fixed sample count. Each shard is
written under a temporary name and renamed when complete, then its statistics go to
a `.stats.json` side file (also atomically). A shard counts as complete only when
both exist and the statistics carry the job's config fingerprint, so a rerun keeps
complete shards, redoes partial ones, and refuses to mix shards of two configs.

Work is split by shard index: node `r` of `n` takes indices `i % n == r` (SLURM
array tasks or torchrun ranks), and the processes of a node share that list. The
manifest is written by whichever process finds every shard complete.

`out_dir` may also be an fsspec URL (s3://, gs://, memory://, ...): the files are then
written to a local staging folder as above and uploaded (data_pipelines.core.remote.
Destination), each shard's tar before its statistics, so "complete" means the same at
the destination; the manifest goes up last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import webdataset as wds

from data_pipelines.core import files, remote
from data_pipelines.core.config import redact_secrets

MANIFEST_NAME = "manifest.json"
# Fixed tar header fields: the same samples always give the same bytes.
TAR_MTIME = 0
TAR_USER = "qwenimg"


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of the settings that determine a shard's content."""
    blob = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (base seed, shard, sample, attempt, ...), stable across processes and machines."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def node_split(node_rank: int | None, num_nodes: int | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world) of this node: explicit values, else SLURM array / torchrun variables, else (0, 1)."""
    env = os.environ if env is None else env
    if num_nodes is None:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            num_nodes = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "WORLD_SIZE" in env:
            num_nodes = int(env["WORLD_SIZE"])
        else:
            num_nodes = 1
    if node_rank is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            node_rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        elif "RANK" in env:
            node_rank = int(env["RANK"])
        else:
            node_rank = 0
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank={node_rank} must lie in [0, num_nodes={num_nodes})")
    return node_rank, num_nodes


def node_shards(num_shards: int, node_rank: int, num_nodes: int) -> list[int]:
    return [i for i in range(num_shards) if i % num_nodes == node_rank]


class ShardSet:
    """The shards of one job folder: a local folder, or an fsspec URL (files staged in
    `out_dir`, a local folder, and uploaded as each is complete)."""

    def __init__(self, out_dir: str | Path, prefix: str, num_shards: int, fingerprint: str):
        self.destination = remote.Destination(str(out_dir)) if remote.is_remote(out_dir) else None
        self.out_dir = self.destination.staging if self.destination else remote.local_path(out_dir)
        self.prefix = prefix
        self.num_shards = num_shards
        self.fingerprint = fingerprint

    def make_dirs(self) -> None:
        if self.destination:
            self.destination.make_dirs()
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def where(self, index: int) -> str:
        """Where shard `index` lives, for messages (its URL for a remote destination)."""
        path = self.tar_path(index)
        return self.destination.where(path.name) if self.destination else str(path)

    def tar_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def stats_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.stats.json"

    def read_stats(self, index: int) -> dict[str, Any] | None:
        path = self.stats_path(index)
        if self.destination:
            text = self.destination.read_text(path.name)
            if text is None or not self.destination.exists(self.tar_path(index).name):
                return None
        else:
            if not path.exists() or not self.tar_path(index).exists():
                return None
            try:
                text = path.read_text("utf-8")
            except OSError:
                return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None

    def is_complete(self, index: int) -> bool:
        stats = self.read_stats(index)
        if stats is None:
            return False
        if stats.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.where(index)} was made with another configuration (fingerprint "
                f"{stats.get('fingerprint')} != {self.fingerprint}); write to a new out_dir, or set overwrite=true"
            )
        return True

    def clean(self, indices: Iterable[int]) -> None:
        """Remove these shards, their statistics and temporary files, and the manifest.

        Only the given indices: with several nodes, each cleans its own shards and
        never touches another node's work in progress.
        """
        for index in indices:
            for path in self.out_dir.glob(f"{self.prefix}-{index:06d}.*"):
                path.unlink(missing_ok=True)
            if self.destination:
                for path in (self.tar_path(index), self.stats_path(index)):
                    self.destination.remove(path.name)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        if self.destination:
            self.destination.remove(MANIFEST_NAME)

    def remove_partial(self, indices: Iterable[int]) -> None:
        """Delete temporary files a killed run left for these shards (this node's only),
        and a manifest's that a killed process of this host left (never one another
        live process may still be renaming)."""
        for index in indices:
            for path in self.out_dir.glob(f"{self.prefix}-{index:06d}.*.tmp-*"):
                path.unlink(missing_ok=True)
        host = socket.gethostname()
        for path in self.out_dir.glob(f"{MANIFEST_NAME}{files.TMP_MARK}*"):
            owner = files.tmp_owner(path)
            if owner is not None and owner[0] == host and not _alive(owner[1]):
                path.unlink(missing_ok=True)

    def write_stats(self, index: int, stats: Mapping[str, Any]) -> None:
        """Mark shard `index` complete (its tar is in place). For a remote destination the
        staged tar is uploaded, then the statistics: their presence marks it complete."""
        files.atomic_write_text(self.stats_path(index), json.dumps(dict(stats, fingerprint=self.fingerprint), sort_keys=True, ensure_ascii=False, indent=1))
        if self.destination:
            self.destination.upload(self.tar_path(index), self.tar_path(index).name)
            self.destination.upload(self.stats_path(index), self.stats_path(index).name)

    def all_complete(self) -> bool:
        return all(self.is_complete(i) for i in range(self.num_shards))

    def write_manifest(self, extra: Mapping[str, Any]) -> Path | str:
        """Aggregate every shard's statistics into manifest.json; its path (or URL)."""
        shards = []
        totals: dict[str, Counter] = {}
        num_samples = 0
        for i in range(self.num_shards):
            stats = self.read_stats(i)
            assert stats is not None, f"shard {i} incomplete"
            shards.append({"file": self.tar_path(i).name, "num_samples": stats["num_samples"]})
            num_samples += stats["num_samples"]
            for name, counts in stats.get("counts", {}).items():
                totals.setdefault(name, Counter()).update(counts)
        manifest = {
            "prefix": self.prefix,
            "num_shards": self.num_shards,
            "num_samples": num_samples,
            "fingerprint": self.fingerprint,
            "counts": {name: dict(sorted(c.items())) for name, c in sorted(totals.items())},
            "shards": shards,
            **redact_secrets(dict(extra)),  # a job's config may hold a signed URL or a pipe: header
        }
        path = self.out_dir / MANIFEST_NAME
        files.atomic_write_text(path, json.dumps(manifest, sort_keys=True, ensure_ascii=False, indent=1))
        if self.destination:
            self.destination.upload(path, MANIFEST_NAME)
            return self.destination.where(MANIFEST_NAME)
        return path


class AtomicShardWriter:
    """A WebDataset tar written under a temporary name (`files.tmp_path`), renamed into
    place on `commit`: streamed sample by sample, never held whole in memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = files.tmp_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        # encoder=False: every field is already bytes, encoded by the caller.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER)
        self.count = 0

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        self._tar.write({"__key__": key, **fields})
        self.count += 1

    def commit(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iter_tar_samples(path: str | Path) -> Iterable[dict[str, bytes]]:
    """Samples of one shard as {ext: bytes, '__key__': key}, read with plain tarfile and
    grouped as WebDataset groups them; a broken tar raises (jobs that read untrusted
    shards use `data_pipelines.core.untrusted.read_tar_samples`, which counts instead)."""
    from data_pipelines.core.untrusted import read_tar_samples

    return read_tar_samples(str(path))


def encode_image(image, fmt: str, jpeg_quality: int) -> bytes:
    """Deterministic encoding (fixed options, no metadata)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality, optimize=False, subsampling="4:2:0")
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=3)
    else:
        raise ValueError(f"image_format {fmt!r}: use 'jpg' or 'png'")
    return buf.getvalue()
