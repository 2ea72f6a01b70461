"""Loader throughput against a bare tarfile + PIL floor, one process, mixed sources and buckets.

    (a) qwenimg_train.data.loader.StageStream at stage settings, with mixing, filtering
        and bucketing on: two T2I sources by weight (synthetic 0.6, design 0.4) and a
        task mix (T2I 0.8, TI2I 0.2 from edit-pair shards), the stage's text-class
        filter (`simple`, `complex`: text-free samples are rejected; the TI2I stream
        also rejects reconstructions), three aspect buckets (512x512, 640x384,
        384x640), caption dropout, a shuffle buffer of 256 (configs/data/default.yaml)
        and typed batches of 16;
    (b) the floor: a bare `tarfile` loop over the same shards that parses each
        sample's json, applies the same filter, and decodes with PIL
        (`np.asarray(im.convert("RGB"))`) exactly the images the loader delivered:
        as many targets per source, and a target and a source image per TI2I pair.

The shards (generated once into outputs/bench/loader/<source>/ by the project's own
synthetic, design and edit-pairs jobs) hold JPEGs at the buckets' sizes, so both
sides decode at equal output resolution and neither resizes. Samples the filter
rejects are never decoded by either side. From local files the floor reads only the
json, caption and image members it needs (tarfile seeks over the rest); over HTTP a
tar is a stream, so both sides read every byte.

The loader is timed in steady state: after `--warmup` untimed batches, by which its
three shuffle buffers are full (filling them reads 768 samples ahead, once per run)
and its buckets hold their usual partial batches. The floor then decodes what those
timed batches delivered, stream by stream (`delivered_by_stream`).

A second row serves the same folders with `http.server.ThreadingHTTPServer` on
127.0.0.1 and runs the loader from the URLs (`SourceShards.from_location`, which reads
them with curl) against a floor that streams the same tars through `urllib`
(`tarfile.open(fileobj=..., mode="r|")`).

Prints samples/second of each side (median of interleaved rounds, each round's
figures too) and the ratio a/b per row (the median of the rounds' ratios: a round
times both sides back to back, and the shared machine's speed drifts between rounds),
with PASS or FAIL against a/b >= 0.9.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import statistics
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from data_pipelines.jobs.design import DesignJob, run_design
from data_pipelines.jobs.edit_pairs import EditPairsJob
from data_pipelines.jobs.edit_pairs import run as run_edit_pairs
from data_pipelines.jobs.synthetic import SyntheticJob
from data_pipelines.jobs.synthetic import run as run_synthetic
from data_pipelines.sources.render import RenderConfig
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SourceShards, StageStream

DATA = Path("outputs/bench/loader")
BUCKETS = ["512x512", "640x384", "384x640"]
TARGET = 0.9
BATCH = 16
STAGE = Stage(name="bench", fraction=1.0, source_weights={"synthetic": 0.6, "design": 0.4},
              task_mix={"t2i": 0.8, "ti2i": 0.2}, text_classes=["simple", "complex"], buckets=BUCKETS,
              caption_dropout=0.1)


def generate() -> None:
    """The three sources' shards, rendered at the buckets' sizes (512x512 twice as often)."""
    render = functools.partial(RenderConfig, sizes=["512x512:2", "640x384", "384x640"])
    common = dict(num_shards=1, progress=False)
    if not (DATA / "synthetic" / "manifest.json").exists():
        run_synthetic(SyntheticJob(out_dir=str(DATA / "synthetic"), samples_per_shard=1200, seed=11, render=render(), **common))
    if not (DATA / "design" / "manifest.json").exists():
        run_design(DesignJob(out_dir=str(DATA / "design"), samples_per_shard=800, seed=12, render=render(), **common))
    if not (DATA / "edit" / "manifest.json").exists():
        run_edit_pairs(EditPairsJob(out_dir=str(DATA / "edit"), samples_per_shard=500, seed=13, render=render(), **common))


# --- (a) the loader ------------------------------------------------------------------


def loader(sources: dict[str, SourceShards], batches: int, warmup: int) -> tuple[float, Counter]:
    """Samples/second of StageStream over `batches` after `warmup` untimed ones, and how
    many samples each stream delivered in the timed span."""
    stream = iter(StageStream(stage=STAGE, stage_index=0, sources=sources, batch_size=BATCH, shuffle_buffer=256))
    for _ in range(warmup):
        next(stream)
    delivered: Counter = Counter()
    start = time.perf_counter()
    count = 0
    for batch in itertools.islice(stream, batches):  # consumed and dropped, as a training loop does
        count += len(batch)
        delivered.update(t if t != "t2i" else s for t, s in zip(batch.task, batch.source))
    return count / (time.perf_counter() - start), delivered


# --- (b) the floor -------------------------------------------------------------------


def admitted(meta: dict, stream: str) -> bool:
    """The stage's filter, as the loader applies it (text class; TI2I: no reconstructions)."""
    if meta.get("text_class") not in STAGE.text_classes:
        return False
    return stream != "ti2i" or meta.get("extra", {}).get("edit", {}).get("type") != "reconstruct"


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def local_samples(path: str) -> Iterator[tuple[dict, Callable[[str], bytes]]]:
    """(meta, read) per sample of a local tar: members are read only when asked for."""
    with tarfile.open(path) as tar:
        for key, members in itertools.groupby(tar, key=lambda m: m.name.split(".", 1)[0]):
            by_ext = {m.name.split(".", 1)[1]: m for m in members}
            meta = json.loads(tar.extractfile(by_ext["json"]).read())
            yield meta, lambda ext: tar.extractfile(by_ext[ext]).read()


def streamed_samples(url: str) -> Iterator[tuple[dict, Callable[[str], bytes]]]:
    """(meta, read) per sample of a tar streamed over HTTP: every member is read in order."""
    with urllib.request.urlopen(url) as response, tarfile.open(fileobj=response, mode="r|") as tar:
        for key, members in itertools.groupby(tar, key=lambda m: m.name.split(".", 1)[0]):
            data = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in members}
            yield json.loads(data["json"]), data.__getitem__


def floor(shards: dict[str, str], delivered: Counter, samples: Callable[..., Iterator]) -> float:
    """Samples/second of a bare loop decoding what the loader delivered, stream by stream."""
    source_of = {"ti2i": "edit"}
    start = time.perf_counter()
    count = 0
    for stream, quota in delivered.items():
        images = ("jpg", "src.jpg") if stream == "ti2i" else ("jpg",)
        text = "instruction.txt" if stream == "ti2i" else "txt"
        done = 0
        while done < quota:  # one pass holds enough; a shorter shard would be read again
            for meta, read in samples(shards[source_of.get(stream, stream)]):
                if not admitted(meta, stream):
                    continue
                read(text).decode("utf-8")
                for ext in images:
                    decode(read(ext))
                done += 1
                if done == quota:
                    break
        count += done
    return count / (time.perf_counter() - start)


# --- HTTP ----------------------------------------------------------------------------


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """The folder over HTTP on 127.0.0.1 (a free port), as a URL prefix ending in '/'."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            # The loader closes a shard's connection mid-file when a round ends: not an error here.
            pass

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def measure(name: str, sources: dict[str, SourceShards], shards: dict[str, str], samples, batches: int,
            warmup: int, rounds: int) -> dict:
    a_rates, b_rates = [], []
    for _ in range(rounds):
        rate, delivered = loader(sources, batches, warmup)
        a_rates.append(rate)
        b_rates.append(floor(shards, delivered, samples))
    a, b = statistics.median(a_rates), statistics.median(b_rates)
    # Each round measures the loader, then the floor, back to back: the machine's load
    # drifts between rounds far more than within one, so the ratio is the median of the
    # rounds' own ratios.
    ratio = statistics.median(x / y for x, y in zip(a_rates, b_rates))
    return {
        "row": name,
        "samples": sum(delivered.values()),
        "delivered_by_stream": dict(sorted(delivered.items())),
        "a_loader_samples_s": round(a, 1),
        "b_tarfile_pil_floor_samples_s": round(b, 1),
        "ratio_a_over_b": round(ratio, 3),
        "rounds_ratio": [round(x / y, 3) for x, y in zip(a_rates, b_rates)],
        "rounds_a": [round(r, 1) for r in a_rates],
        "rounds_b": [round(r, 1) for r in b_rates],
        "target_a_over_b": TARGET,
        "result": "PASS" if ratio >= TARGET else "FAIL",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=64, help=f"batches of {BATCH} per loader round")
    parser.add_argument("--warmup", type=int, default=64,
                        help="untimed batches first, until every shuffle buffer is full (steady state)")
    parser.add_argument("--no-http", action="store_true", help="only the local-file row")
    args = parser.parse_args()
    generate()
    names = ("synthetic", "design", "edit")
    local = {n: SourceShards.from_folder(n, DATA / n) for n in names}
    shards = {n: local[n].urls[0] for n in names}
    rows = [measure("local files", local, shards, local_samples, args.batches, args.warmup, args.rounds)]
    if not args.no_http:
        if not hasattr(SourceShards, "from_location"):
            rows.append({"row": "http", "result": "NOT RUN: SourceShards.from_location (remote sources) is missing"})
        else:
            with serve(DATA) as prefix:
                remote = {n: SourceShards.from_location(n, f"{prefix}{n}/") for n in names}
                urls = {n: f"{prefix}{n}/{Path(shards[n]).name}" for n in names}
                rows.append(measure("http", remote, urls, streamed_samples, args.batches, args.warmup, args.rounds))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
