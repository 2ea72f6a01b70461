"""Part of `make demo`: sample the glyph world's export through diffusers, write the summary.

    python -m qwenimg_train.tools.demo --root outputs/demo

After `qwenimg-train experiment=glyphs`, `qwenimg-export` and `qwenimg-eval` on the
export, this draws the prompted characters through the export with
`qwenimg_train.tools.sample` (diffusers' own `QwenImagePipeline` and
`QwenImageEditPipeline`: the proof that the export is a working diffusers folder) into
`samples/` (images, `grid.png`, `samples.json`): every held-in character, two two-line
prompts, two held-out characters and two edits whose sources are drawn as the glyph data
draws them. It writes `summary.json` at the root: steps and loss per stage and task,
throughput, the OCR curve of the training-time evaluation (step 0 and every stage end,
per suite: held-in single characters and two lines, held-out characters, edits), the
final scores of `eval/ocr.json` on the export (qwenimg-eval runs before), timings and
paths (the `outputs/demo/` contract in README.md). `qwenimg-report` runs after it and
draws `report/`, with the OCR curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_pipelines.sources import glyphs

TWO_LINE = [("安", "K"), ("7", "白")]
EDITS = [("八", "B"), ("3", "爱")]
SIZE = glyphs.CANVAS


def demo_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """The grid's T2I prompts (held-in characters, two lines, two held-out characters) and its edits."""
    t2i = [glyphs.glyph_prompt([c]) for c in glyphs.HELD_IN]
    t2i += [glyphs.glyph_prompt(list(pair)) for pair in TWO_LINE]
    t2i += [glyphs.glyph_prompt([c]) for c in glyphs.HELD_OUT[:2]]
    return t2i, EDITS


def sample_grid(export_dir: Path, out_dir: Path, *, steps: int = 20, guidance: float = 1.0, seed: int = 0) -> dict:
    """The demo's prompts through `qwenimg_train.tools.sample` into `out_dir`; a short record for summary.json."""
    from qwenimg_train.tools.sample import SampleJob, sample

    t2i, edits = demo_prompts()
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    source_paths: list[str | None] = [None] * len(t2i)
    for old, new in edits:
        path = out_dir / "sources" / f"edit_{len(source_paths) - len(t2i)}.png"
        glyphs.draw_glyph_lines([old], SIZE).image.save(path)
        source_paths.append(str(path))
    prompts = t2i + [glyphs.EDIT_INSTRUCTION.format(old=old, new=new) for old, new in edits]
    result = sample(SampleJob(
        checkpoint_dir=str(export_dir), out_dir=str(out_dir), prompts=prompts, source_images=source_paths,
        guidance=guidance, steps=steps, seed=seed, width=SIZE, height=SIZE, edit_source_area=SIZE * SIZE,
        columns=8, progress=False))
    tasks = [r["task"] for r in result["samples"]]
    return {"t2i": tasks.count("t2i"), "edits": tasks.count("edit"), "size": SIZE, "steps": steps,
            "guidance": guidance, "finite": all(r["finite"] for r in result["samples"]),
            "grid": str(out_dir / "grid.png")}


def ocr_curve(train_summary: dict) -> list[dict]:
    """The training-time OCR evaluations: per step, char accuracy per suite (and edit success);
    the evaluation's per-language groups are left out (the glyph suites are one language)."""
    from qwenimg_train.eval.suites import SUITES

    curve, stage_ends, total = [], {}, 0
    for name, stage in train_summary.get("stages", {}).items():
        total += stage["steps"]
        stage_ends[total] = name
    for entry in train_summary.get("ocr_eval") or []:
        m = entry["metrics"]
        point = {"step": entry["step"], "after": "start" if entry["step"] == 0 else stage_ends.get(entry["step"])}
        for key, value in sorted(m.items()):
            parts = key.split("/")  # eval/ocr/<metric>/<suite>
            if len(parts) == 4 and parts[2] in ("char_accuracy", "edit_success") and parts[3] in SUITES:
                point.setdefault(parts[3], {})[parts[2]] = round(value, 4)
        curve.append(point)
    return curve


def _final_scores(path: Path) -> dict | None:
    """Per-suite char accuracy (and edit success) of qwenimg-eval's ocr.json, if it ran."""
    if not path.is_file():
        return None
    suites = json.loads(path.read_text()).get("aggregates", {}).get("suites", {})
    keep = ("n", "char_accuracy", "char_accuracy_se", "exact", "edit_success", "edit_success_se")
    return {name: {k: v for k, v in agg.items() if k in keep} for name, agg in suites.items()}


def write_summary(root: Path, samples: dict, sample_seconds: float) -> dict:
    train = json.loads((root / "train" / "summary.json").read_text())
    data = {}
    for folder in ("synthetic", "edit"):
        manifest = root / "data" / "glyphs" / folder / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            data[folder] = {"samples": m.get("num_samples"), "shards": m.get("num_shards"),
                            "text_class": m.get("counts", {}).get("text_class")}
    summary = {
        "steps": train["global_step"],
        "stages": train["stages"],
        "throughput": train["throughput"],
        "timings_s": {"train_fit": train.get("fit_seconds"), "sampling": round(sample_seconds, 1)},
        "ocr_during_training": ocr_curve(train),
        "ocr_export": _final_scores(root / "eval" / "ocr.json"),
        "samples": samples,
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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args(argv)
    root = Path(args.root)
    start = time.perf_counter()
    samples = sample_grid(root / "export", root / "samples", steps=args.steps, guidance=args.guidance)
    summary = write_summary(root, samples, time.perf_counter() - start)
    print(json.dumps({"steps": summary["steps"], "ocr_export": summary["ocr_export"],
                      "timings_s": summary["timings_s"]}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
