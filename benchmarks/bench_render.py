"""Synthetic renderer throughput against a plain Pillow floor, one process, 512x512 JPEG.

    (a) this renderer, OCR off: background, layout, colours, drawing, caption,
        metadata, JPEG encode;
    (b) plain Pillow: the same strings, in the same (cached) fonts and sizes, drawn at
        the same places on a blank canvas of the same size, then JPEG encode: the
        floor of any Pillow-based renderer;
    (c) this renderer with OCR verification on (`crops`: the recogniser on every
        line), and (d) with `full` detection + recognition on a few samples.

Prints images/second (median of 5 rounds, a and b interleaved so drift hits both) and
the ratio a/b; the target is a/b >= 0.5. Usage: python benchmarks/bench_render.py
[--samples N] [--rounds R]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

from PIL import Image, ImageDraw

from data_pipelines.text.fonts import face_tables
from data_pipelines.core.ocr import OcrEngine, verify_sample
from data_pipelines.core.shards import encode_image
from data_pipelines.jobs.synthetic import SyntheticJob, build_renderer


def run_renderer(renderer, seeds, ocr=None, mode="crops"):
    start = time.perf_counter()
    for seed in seeds:
        sample = renderer.render(seed, "bench")
        if ocr is not None:
            verify_sample(ocr, sample.image, sample.meta, mode)
        encode_image(sample.image, "jpg", 90)
        sample.meta.to_json().encode()
        sample.caption.encode()
    return len(seeds) / (time.perf_counter() - start)


def baseline_jobs(renderer, seeds):
    """What (b) draws: per sample, (size, [(font, xy, text)])."""
    fonts = {f.name: f for f in renderer.fonts.faces}
    jobs = []
    for seed in seeds:
        meta = renderer.render(seed, "bench").meta
        draws = []
        for line in meta.lines:
            font = renderer.fonts.font(fonts[line.font], line.font_size)
            draws.append((font, (line.polygon[0][0], line.polygon[0][1]), line.text))
        jobs.append(((meta.width, meta.height), draws))
    return jobs


def run_baseline(jobs):
    start = time.perf_counter()
    for size, draws in jobs:
        image = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for font, xy, text in draws:
            draw.text(xy, text, font=font, fill=(0, 0, 0))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
    return len(jobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ocr-samples", type=int, default=40)
    args = parser.parse_args()

    renderer = build_renderer(SyntheticJob(out_dir="unused"))
    seeds = list(range(10_000, 10_000 + args.samples))
    for face in renderer.fonts.faces:  # warm-up: every face's tables (a one-off per process)
        face_tables(face.path, face.index)
    for seed in range(300):  # warm-up: font objects and measurement caches
        renderer.render(seed, "warm")
    jobs = baseline_jobs(renderer, seeds)
    chars = sum(len(text) for _, draws in jobs for _, _, text in draws)

    a_rates, b_rates = [], []
    for _ in range(args.rounds):
        a_rates.append(run_renderer(renderer, seeds))
        b_rates.append(run_baseline(jobs))
    a, b = statistics.median(a_rates), statistics.median(b_rates)

    ocr = OcrEngine(threads=1)
    ocr_seeds = seeds[: args.ocr_samples]
    warm = renderer.render(0, "warm")
    verify_sample(ocr, warm.image, warm.meta, "crops")
    c = run_renderer(renderer, ocr_seeds, ocr, "crops")
    d = run_renderer(renderer, ocr_seeds[:5], ocr, "full")

    result = {
        "samples": args.samples,
        "chars_per_sample": round(chars / len(jobs), 1),
        "a_renderer_img_s": round(a, 1),
        "b_pillow_floor_img_s": round(b, 1),
        "c_renderer_ocr_crops_img_s": round(c, 2),
        "d_renderer_ocr_full_img_s": round(d, 2),
        "ratio_a_over_b": round(a / b, 3),
        "ratio_c_over_b": round(c / b, 4),
        "target_a_over_b": 0.5,
        "meets_target": a / b >= 0.5,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
