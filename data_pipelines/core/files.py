"""Files written whole or not at all: a temporary sibling, then `os.replace`.

A reader (another rank, a rerun after a kill, a node on the same shared file system)
sees the old file or the new one, never half of one. The temporary name carries the
host and the pid (who may remove a stale one: `tmp_owner`) and a random suffix (two
threads of one process never share it). Directory swaps (the tiny model folder, an
export) are not covered: `os.replace` cannot replace a non-empty directory.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"
"""Between a file's name and its temporary suffix: `<name>.tmp-<host>-<pid>-<random>`."""


def tmp_path(path: str | Path) -> Path:
    """A fresh temporary sibling of `path`, unique across hosts, processes and calls."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def tmp_owner(path: str | Path) -> tuple[str, int] | None:
    """(host, pid) that wrote a temporary file named by `tmp_path`, or None for another name."""
    suffix = Path(path).name.rpartition(TMP_MARK)[2]
    rest, _, _random = suffix.rpartition("-")
    host, _, pid = rest.rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically; `fsync` also forces it to disk before the rename
    (a power loss then leaves the old file or the new one, not an empty one)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """`atomic_write_bytes` of `text` encoded."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
