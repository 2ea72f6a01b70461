"""Part of `make demo`: sample through the exported diffusers folder, write the summary.

    python -m qwenimg_train.tools.demo --root outputs/demo

After `qwenimg-train experiment=smoke` and `qwenimg-export`, this draws four T2I
samples and two edits through the export with `qwenimg_train.tools.sample` (diffusers' own
`QwenImagePipeline` and `QwenImageEditPipeline`: the proof that the export is a
working diffusers folder) into `samples/` (images, `grid.png`, `samples.json`), and
writes `summary.json` at the root: steps and loss per stage and task, throughput, the
OCR scores of `eval/ocr.json` (qwenimg-eval runs before), timings and paths (the
`outputs/demo/` contract in README.md). `qwenimg-report` runs after it and draws `report/`. The tiny model is trained for minutes on
random initialisation: its images are noise with colour, not text; the grid shows the
path works, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


def sample_grid(export_dir: Path, out_dir: Path, *, edit_dir: Path | None, size: int = 256, steps: int = 8,
                seed: int = 0) -> dict:
    """The demo's prompts through `qwenimg_train.tools.sample` into `out_dir`; a short record for summary.json."""
    from qwenimg_train.tools.sample import SampleJob, sample

    sources = _edit_sources(edit_dir, len(EDIT_PROMPTS)) if edit_dir is not None else []
    source_paths: list[str | None] = [None] * len(T2I_PROMPTS)
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    for i, source in enumerate(sources):
        source.save(out_dir / "sources" / f"edit{i}.png")
        source_paths.append(str(out_dir / "sources" / f"edit{i}.png"))
    result = sample(SampleJob(
        checkpoint_dir=str(export_dir), out_dir=str(out_dir), prompts=T2I_PROMPTS + EDIT_PROMPTS[:len(sources)],
        source_images=source_paths, guidance=2.0, steps=steps, seed=seed, width=size, height=size,
        columns=len(T2I_PROMPTS), progress=False))
    tasks = [r["task"] for r in result["samples"]]
    return {"t2i": tasks.count("t2i"), "edits": tasks.count("edit"), "size": size, "steps": steps,
            "finite": all(r["finite"] for r in result["samples"]), "grid": str(out_dir / "grid.png")}


def _ocr_overall(path: Path) -> dict | None:
    """The overall OCR aggregates of qwenimg-eval's ocr.json, if it ran."""
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("aggregates", {}).get("overall")


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
        "ocr": _ocr_overall(root / "eval" / "ocr.json"),
        "data": data,
        "paths": {
            "data": str(root / "data"), "preview": str(root / "preview"), "train": str(root / "train"),
            "checkpoints": str(root / "train" / "checkpoints"), "export": str(root / "export"),
            "samples": str(root / "samples" / "grid.png"), "eval": str(root / "eval" / "ocr.json"),
            "report": str(root / "report" / "summary.md"),
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
    samples = sample_grid(root / "export", root / "samples", edit_dir=root / "data" / "edit", size=args.size,
                          steps=args.steps)
    summary = write_summary(root, samples, time.perf_counter() - start)
    print(json.dumps({k: summary[k] for k in ("steps", "stages", "throughput", "timings_s")}, indent=1,
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
