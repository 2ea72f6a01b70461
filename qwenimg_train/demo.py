"""The tail of `make demo`: sample through the exported diffusers folder, write the summary.

    python -m qwenimg_train.demo --root outputs/demo

After `qwenimg-train experiment=smoke` and `qwenimg-export`, this loads the export
with diffusers' own `QwenImagePipeline` and `QwenImageEditPipeline` (the proof that
the export is a working diffusers folder), draws a grid of T2I samples and edits
(`report/samples.png`), and writes `summary.json` at the root: steps and loss per
stage and task, throughput, timings and paths (DESIGN.md, interface contract).
The tiny model is trained for minutes on random initialisation: its images are noise
with colour, not text; the grid shows the path works, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

T2I_PROMPTS = [
    "a red poster with the title “春节快乐”",
    "a slide titled “Quarterly report” on a white background",
    "a sign that reads “欢迎光临” in gold letters",
    "a photo of a quiet lake at dawn",
]
EDIT_PROMPTS = ["change the text to “新年好”", "make the background blue"]


def _edit_sources(edit_dir: Path, count: int) -> list[Image.Image]:
    """Source images of the first edit pairs in the demo's edit shards."""
    import io
    import tarfile

    images = []
    for shard in sorted(edit_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".src.jpg"):
                    images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    if len(images) == count:
                        return images
    return images


def _grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return sheet


def sample_grid(export_dir: Path, out_png: Path, *, edit_dir: Path | None, size: int = 256, steps: int = 8,
                seed: int = 0) -> dict:
    import torch
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    from qwenimg_train.encoding import load_processor

    t2i = QwenImagePipeline.from_pretrained(export_dir)
    generator = torch.Generator().manual_seed(seed)
    images = t2i(prompt=T2I_PROMPTS, negative_prompt=[" "] * len(T2I_PROMPTS), true_cfg_scale=2.0, height=size,
                 width=size, num_inference_steps=steps, generator=generator).images
    rows = [images]
    sources = _edit_sources(edit_dir, len(EDIT_PROMPTS)) if edit_dir is not None else []
    if sources:
        # The processor is passed in: transformers 5 cannot build Qwen2VLProcessor
        # without torchvision (encoding.load_processor falls back to an image-only one).
        edit = QwenImageEditPipeline.from_pretrained(export_dir, processor=load_processor(export_dir))
        edited = [edit(image=src.resize((size, size)), prompt=p, height=size, width=size, num_inference_steps=steps,
                       generator=torch.Generator().manual_seed(seed)).images[0]
                  for src, p in zip(sources, EDIT_PROMPTS)]
        rows.append([im for pair in zip(sources, edited) for im in pair])  # source, edit, source, edit
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _grid([im.resize((size, size)) for row in rows for im in row], columns=len(T2I_PROMPTS)).save(out_png)
    finite = all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for row in rows for im in row)
    return {"t2i": len(images), "edits": len(sources), "size": size, "steps": steps, "finite": bool(finite)}


def write_summary(root: Path, samples: dict, sample_seconds: float) -> dict:
    train = json.loads((root / "train" / "summary.json").read_text())
    data = {}
    for source in ("synthetic", "design", "natural", "edit"):
        manifest = root / "data" / source / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            data[source] = {"samples": m.get("num_samples"), "shards": m.get("num_shards"),
                            "text_class": m.get("counts", {}).get("text_class")}
    summary = {
        "steps": train["global_step"],
        "stages": train["stages"],
        "throughput": train["throughput"],
        "timings_s": {"train_fit": train.get("fit_seconds"), "sampling": sample_seconds},
        "samples": samples,
        "data": data,
        "paths": {
            "data": str(root / "data"), "preview": str(root / "preview"), "train": str(root / "train"),
            "checkpoints": str(root / "train" / "checkpoints"), "export": str(root / "export"),
            "samples": str(root / "report" / "samples.png"),
        },
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="outputs/demo")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    root = Path(args.root)
    start = time.perf_counter()
    samples = sample_grid(root / "export", root / "report" / "samples.png", edit_dir=root / "data" / "edit",
                          size=args.size, steps=args.steps)
    summary = write_summary(root, samples, time.perf_counter() - start)
    print(json.dumps({k: summary[k] for k in ("steps", "stages", "throughput", "timings_s")}, indent=1,
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
