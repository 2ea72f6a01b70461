"""Checkpoint paths that are never half-written (the callbacks that save are in
`callbacks/checkpoint.py`).

A checkpoint (a file, or a DeepSpeed ZeRO-3 directory with one shard per rank) is
written to a temporary sibling and renamed into place once every rank finished. Replacing an existing path renames
the old one aside first and deletes it after; `resolve_checkpoint` falls back to that
aside copy if a crash hit between the two renames. A shared file system across nodes
is assumed (as for any sharded checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished checkpoint into place (rank 0 only)."""
    if tmp.is_file() and not final.is_dir():
        os.replace(tmp, final)  # atomic for files
        return
    old = final.with_name(final.name + OLD_SUFFIX)
    remove_path(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    remove_path(old)


def resolve_checkpoint(path: Path) -> Path | None:
    """`path`, or its aside copy when a crash came between the two renames of a replace."""
    if path.exists():
        return path
    old = path.with_name(path.name + OLD_SUFFIX)
    return old if old.exists() else None
