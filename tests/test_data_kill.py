"""Data generation killed (SIGKILL) mid-shard, mid-statistics and mid-manifest: a rerun of
the same command completes the job with every shard listed once, every key once, no
temporary file left, and shards byte-identical to an uninterrupted run's.

The synthetic job is deterministic by seed: sample j of shard i is rendered from
`derive_seed(seed, i, j, attempt)` (data_pipelines/jobs/synthetic.py) and written with
fixed tar headers (data_pipelines/core/shards.py), so the same command gives the same bytes.
A shard is written under `<name>.tmp-<host>-<pid>-<random>` and renamed when complete, then its
statistics (also tmp + rename); the manifest is written last, tmp + rename. The kills:

- mid-shard: the real CLI in a subprocess, SIGKILLed as soon as shard 1's temporary
  file appears;
- after a shard's rename but before its statistics, and in the middle of the manifest
  write: the CLI with the atomic-write helper wrapped to write half its temporary file
  and SIGKILL its own process (the exact instant a kill would leave that state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from data_pipelines.core.shards import iter_tar_samples

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NUM_SHARDS, PER_SHARD = 3, 40
ARGS = [f"num_shards={NUM_SHARDS}", f"samples_per_shard={PER_SHARD}", "seed=5", "progress=false"]
CLI = [sys.executable, "-m", "data_pipelines.cli"]
# Runs the CLI with `atomic_write_text` wrapped: when it is asked to write the file named
# argv[1], it writes half of the temporary file and SIGKILLs its own process.
KILLING_CLI = [sys.executable, "-c", """
import os, signal, sys
import data_pipelines.core.files as files
target, real = sys.argv[1], files.atomic_write_text
def write(path, text, **kwargs):
    if path.name == target:
        files.tmp_path(path).write_text(text[: len(text) // 2], "utf-8")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, text, **kwargs)
files.atomic_write_text = write
sys.argv = ["qwenimg-data"] + sys.argv[2:]
from data_pipelines.cli import main
main()
"""]


def tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def check_complete(folder: Path, reference: dict[str, bytes]) -> None:
    assert not list(folder.glob("*.tmp-*")), list(folder.glob("*.tmp-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert files == [f"synthetic-{i:06d}.tar" for i in range(NUM_SHARDS)]  # each shard exactly once
    assert manifest["num_samples"] == NUM_SHARDS * PER_SHARD
    assert all(s["num_samples"] == PER_SHARD for s in manifest["shards"])
    keys = Counter(s["__key__"] for p in sorted(folder.glob("*.tar")) for s in iter_tar_samples(p))
    assert len(keys) == NUM_SHARDS * PER_SHARD and set(keys.values()) == {1}  # no duplicate, none missing
    for p in folder.glob("*.tar"):
        with tarfile.open(p) as tar:
            tar.getmembers()  # every shard reads to its end
    assert tars(folder) == reference  # byte-identical to the uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("fresh")
    subprocess.run([*CLI, f"out_dir={out}", *ARGS], cwd=REPO, check=True, capture_output=True)
    return tars(out)


def test_sigkill_mid_shard_then_rerun(tmp_path, reference):
    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, f"out_dir={out}", *ARGS], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("synthetic-000001.tar.tmp-*")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list(out.glob("synthetic-000001.tar.tmp-*"))
    assert partial, "the run finished (or never started shard 1) before it was killed"
    assert (out / "synthetic-000000.stats.json").exists() and not (out / "manifest.json").exists()
    kept = (out / "synthetic-000000.tar").stat().st_mtime_ns

    rerun = subprocess.run([*CLI, f"out_dir={out}", *ARGS], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "synthetic-000000.tar").stat().st_mtime_ns == kept  # the complete shard was kept
    check_complete(out, reference)


@pytest.mark.parametrize("target", ["synthetic-000001.stats.json", "manifest.json"])
def test_sigkill_mid_statistics_or_manifest_write_then_rerun(tmp_path, reference, target):
    out = tmp_path / "killed"
    killed = subprocess.run([*KILLING_CLI, target, f"out_dir={out}", *ARGS], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(out.glob(f"{target}.tmp-*")), "the kill left the half-written temporary file"
    assert not (out / target).exists()

    rerun = subprocess.run([*CLI, f"out_dir={out}", *ARGS], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{\n"):])  # the CLI prints its summary last
    # Killed mid-manifest: every shard was complete and is kept; mid-statistics: shard 1
    # (its tar renamed, its statistics missing) is redone.
    assert summary["shards_written"] == (0 if target == "manifest.json" else NUM_SHARDS - 1)
    check_complete(out, reference)
