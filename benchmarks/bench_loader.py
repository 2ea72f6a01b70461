"""Loader throughput against a plain tarfile + PIL floor, one process, 512x512 JPEG.

    (a) qwenimg_train.data.loader.StageStream at stage settings (one T2I source, 512²
        output, shuffle buffer, text-class filter, typed batches of 16);
    (b) the floor: a bare `tarfile` loop over the same shard decoding every JPEG
        with PIL to a uint8 array of the same size.

Both read the same 1,000 samples (generated once into outputs/bench/loader/);
prints samples/second (median of interleaved rounds) and the ratio a/b; the
target is at least 0.8 at equal output resolution.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.jobs.synthetic import SyntheticJob
from data_pipelines.jobs.synthetic import run as run_synthetic
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SourceShards, StageStream

DATA = Path("outputs/bench/loader")


def floor(url: str) -> float:
    start = time.perf_counter()
    n = 0
    with tarfile.open(url) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                with Image.open(io.BytesIO(data)) as im:
                    np.asarray(im.convert("RGB"))
                n += 1
    return n / (time.perf_counter() - start)


def loader(source: SourceShards, n: int) -> float:
    stage = Stage(name="bench", fraction=1.0, source_weights={"synthetic": 1.0}, task_mix={"t2i": 1.0},
                  text_classes=["none", "simple", "complex"], resolution=512, caption_dropout=0.1)
    stream = StageStream(stage=stage, stage_index=0, sources={"synthetic": source}, batch_size=16, shuffle_buffer=64)
    start = time.perf_counter()
    count = 0
    for batch in itertools.islice(iter(stream), n // 16):  # consumed and dropped, as a training loop does
        count += len(batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (DATA / "manifest.json").exists():
        run_synthetic(SyntheticJob(out_dir=str(DATA), num_shards=1, samples_per_shard=1000, seed=11, progress=False))
    source = SourceShards.from_folder("synthetic", DATA)
    a_rates, b_rates = [], []
    for _ in range(args.rounds):
        a_rates.append(loader(source, 1000))
        b_rates.append(floor(source.urls[0]))
    a, b = statistics.median(a_rates), statistics.median(b_rates)
    print(json.dumps({
        "samples": 1000,
        "a_loader_samples_s": round(a, 1),
        "b_tarfile_pil_floor_samples_s": round(b, 1),
        "ratio_a_over_b": round(a / b, 3),
        "target_a_over_b": 0.8,
        "meets_target": a / b >= 0.8,
    }, indent=1))


if __name__ == "__main__":
    main()
