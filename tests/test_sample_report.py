"""`qwenimg-sample` on the tiny checkpoint (T2I, edits, bad inputs) and `qwenimg-report`
on a real logged training run (plots, grids, summary.md)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import STAGES, compose_debug, compose_tool
from data_pipelines.core.config import from_mapping
from qwenimg_train.tools.report import ReportJob, ema, ocr_columns, read_metrics, report
from qwenimg_train.tools.sample import SampleJob, job_mapping, sample
from qwenimg_train.training.train import train


def _valid_png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()
    image = Image.open(path)
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


# --- qwenimg-sample -----------------------------------------------------------------------


def test_sample_t2i_writes_images_grid_and_record(tiny_checkpoint, tmp_path):
    prompts = ["a sign reading “你好”", "a red poster titled “SALE”"]
    out = tmp_path / "t2i"
    result = sample(SampleJob(checkpoint_dir=str(tiny_checkpoint), out_dir=str(out), prompts=prompts, guidance=2.0,
                              steps=2, seed=5, resolution=32, progress=False))
    record = json.loads((out / "samples.json").read_text(encoding="utf-8"))
    assert record["samples"] == result["samples"]
    assert [s["prompt"] for s in record["samples"]] == prompts
    assert [s["seed"] for s in record["samples"]] == [5, 6]
    assert record["negative_prompt"] == " " and record["guidance"] == 2.0
    for s in record["samples"]:
        assert s["task"] == "t2i" and s["finite"]
        assert _valid_png(out / s["file"]).size == (32, 32)
    _valid_png(out / "grid.png")
    # Prompt i's seed is seed + i: one image redrawn alone is the same image.
    again = sample(SampleJob(checkpoint_dir=str(tiny_checkpoint), out_dir=str(tmp_path / "again"), prompts=prompts[1:],
                             guidance=2.0, steps=2, seed=6, resolution=32, progress=False))
    assert again["samples"][0]["seed"] == 6
    assert np.array_equal(np.asarray(Image.open(out / "001.png")), np.asarray(Image.open(tmp_path / "again/000.png")))


def test_sample_jsonl_mixes_t2i_and_edit(tiny_checkpoint, tmp_path):
    Image.fromarray(np.full((40, 32, 3), 180, dtype=np.uint8)).save(tmp_path / "source.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a slide titled “Q3”", "seed": 11}) + "\n\n"
                    + json.dumps({"prompt": "make it red", "source_image": "source.png"}, ensure_ascii=False) + "\n")
    out = tmp_path / "mixed"
    result = sample(SampleJob(checkpoint_dir=str(tiny_checkpoint), out_dir=str(out), prompts_file=str(jobs),
                              guidance=1.0, steps=2, seed=0, width=32, height=32, progress=False))
    t2i, edit = result["samples"]
    assert (t2i["task"], t2i["seed"], edit["task"], edit["seed"]) == ("t2i", 11, "edit", 1)
    assert edit["source_image"] == str(tmp_path / "source.png")
    assert result["negative_prompt"] is None
    assert _valid_png(out / edit["file"]).size == (32, 32) and edit["finite"]
    _valid_png(out / "grid.png")  # three cells: the T2I image, the source, the edit
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "grid.png"]


def test_sample_input_mistakes_are_clear(tiny_checkpoint, tmp_path):
    ok = dict(checkpoint_dir=str(tiny_checkpoint), out_dir=str(tmp_path / "out"), resolution=32, steps=1)
    with pytest.raises(ValueError, match="steps = 1 .* NaN"):
        sample(SampleJob(**ok, prompts=["x"]))
    ok["steps"] = 2
    with pytest.raises(ValueError, match="not a diffusers folder"):
        sample(SampleJob(**{**ok, "checkpoint_dir": str(tmp_path / "missing")}, prompts=["x"]))
    with pytest.raises(ValueError, match="no prompts"):
        sample(SampleJob(**ok))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        sample(SampleJob(**ok, prompts_file=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="prompts_file .* does not exist"):
        sample(SampleJob(**ok, prompts_file=str(tmp_path / "none.txt")))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        sample(SampleJob(**ok, prompts=["make it red"], source_images=[str(tmp_path / "broken.png")]))
    with pytest.raises(ValueError, match="cannot be read as an image"):
        sample(SampleJob(**ok, prompts=["make it red"], source_images=[str(tmp_path / "absent.png")]))
    with pytest.raises(ValueError, match="source_images has 1 entries for 2 prompts"):
        sample(SampleJob(**ok, prompts=["a", "b"], source_images=[str(tmp_path / "broken.png")]))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "negative": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown key"):
        sample(SampleJob(**ok, prompts_file=str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match="both prompts and prompts_file"):
        SampleJob(**ok, prompts=["x"], prompts_file="p.txt")
    with pytest.raises(ValueError, match="resolution = 30 must be a positive multiple of 16"):
        SampleJob(**{**ok, "resolution": 30})
    with pytest.raises(ValueError, match="guidance"):
        SampleJob(**ok, guidance=0.5)


def test_sample_edit_needs_an_edit_folder(tmp_path):
    from qwenimg_train.models.qwen_image.tiny import build_tiny_checkpoint

    t2i_only = build_tiny_checkpoint(tmp_path / "t2i", pipeline_class="QwenImagePipeline")
    Image.new("RGB", (32, 32)).save(tmp_path / "source.png")
    with pytest.raises(ValueError, match="no processor/"):
        sample(SampleJob(checkpoint_dir=str(t2i_only), out_dir=str(tmp_path / "out"), prompts=["make it red"],
                         source_images=[str(tmp_path / "source.png")], resolution=32, steps=2))


def test_commands_compose_into_their_jobs(tmp_path):
    cfg = compose_tool("sample", ["checkpoint_dir=ck", "out_dir=o", 'prompts=["a “你好” sign",b]',
                              "source_images=[null,s.png]"])
    job = from_mapping(SampleJob, job_mapping(cfg), "sample")
    assert job.prompts == ["a “你好” sign", "b"] and job.source_images == [None, "s.png"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['out_dir'\]"):
        job_mapping(compose_tool("sample", ["checkpoint_dir=ck"]))
    job = from_mapping(ReportJob, job_mapping(compose_tool("report", ["run_dir=r", "eval_json=e.json"])), "report")
    assert (job.run_dir, job.out_dir, job.eval_json) == ("r", None, "e.json")
    with pytest.raises(ValueError, match="run_dir"):
        job_mapping(compose_tool("report", []))


# --- qwenimg-report -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, shard_sources) -> Path:
    """A 9-step run through the three stages (3 steps each), logged by the CSV logger."""
    root = tmp_path_factory.mktemp("report-run")
    train(compose_debug(shard_sources, "callbacks.checkpoint.every_n_train_steps=9", out=root / "train",
                        models=root / "models"))
    return root / "train"


def test_report_on_a_logged_run(logged_run, tmp_path):
    out = tmp_path / "report"
    result = report(ReportJob(run_dir=str(logged_run), out_dir=str(out)))
    assert result["plots"] == ["loss.png", "lr.png", "throughput.png", "sigma.png"]
    assert set(result["skipped"]) == {"ocr.png"}
    for name in result["plots"]:
        _valid_png(out / name)
    assert not (out / "ocr.png").exists() and not (out / "samples.png").exists()
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| stage | steps | loss | t2i | ti2i | i2i |" in md
    summary = json.loads((logged_run / "summary.json").read_text())
    for name in STAGES:
        assert f"| {name} | 3 | {summary['stages'][name]['loss']:.4g} |" in md
    assert "no_text (0–2) → simple_text (3–5) → complex_layout (6–8)" in md
    assert "OCR metrics over steps: skipped" in md
    for name in result["plots"]:
        assert f"]({name})" in md
    # The default out_dir is <run_dir>/report.
    assert report(ReportJob(run_dir=str(logged_run)))["out_dir"] == str(logged_run / "report")


def _copy_run(run: Path, dest: Path) -> Path:
    (dest / "logs").mkdir(parents=True)
    for name in ("summary.json", "config.yaml", "logs/metrics.csv"):
        shutil.copyfile(run / name, dest / name)
    return dest


def test_report_draws_ocr_metrics_grids_and_eval_json(logged_run, tmp_path):
    run = _copy_run(logged_run, tmp_path / "run")
    # What an OCR validation callback would add (evaluation.flat_metrics's layout under eval/ocr).
    path = run / "logs" / "metrics.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    extra = {"eval/ocr/char_accuracy": 0.0, "eval/ocr/char_accuracy/en_short": 0.1,
             "eval/ocr/char_accuracy/zh_short": 0.2, "eval/ocr/ned_score": 0.3, "eval/ocr/ned_score/en_short": 0.4}
    fields = list(rows[0]) + list(extra)
    rows += [{"step": str(step), "epoch": "0", **{k: str(v + step / 100) for k, v in extra.items()}} for step in (2, 8)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for step, colour in ((3, "red"), (9, "blue")):
        (run / "eval" / f"step{step:06d}").mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(run / "eval" / f"step{step:06d}" / "en_short.png")
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (8, 8), "green").save(tmp_path / "samples" / "grid.png")
    ocr_json = tmp_path / "ocr.json"
    ocr_json.write_text(json.dumps({
        "config": {"checkpoint": "export", "steps": 30},
        "aggregates": {"overall": {"char_accuracy": 0.5, "n": 4},
                       "suites": {"en_short": {"char_accuracy": 0.5, "char_accuracy_se": 0.1, "n": 4}}},
        "results": [{"prompt": "x"}]}))

    out = tmp_path / "report"
    result = report(ReportJob(run_dir=str(run), out_dir=str(out), eval_json=str(ocr_json),
                              samples_dir=str(tmp_path / "samples")))
    assert "ocr.png" in result["plots"] and not result["skipped"]
    _valid_png(out / "ocr.png")
    assert _valid_png(out / "eval_en_short.png").getpixel((0, 0)) == (0, 0, 255)  # the latest step's grid
    assert _valid_png(out / "samples.png").getpixel((0, 0)) == (0, 128, 0)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "The last values logged during training (step 8):" in md
    assert "| overall | 0.08 | 0.38 |" in md and "| zh_short | 0.28 | – |" in md
    assert "| `suites/en_short` | 0.5 ± 0.1 | 4 |" in md and "Settings: checkpoint export, steps 30" in md
    assert "at step 9" in md and "](eval_en_short.png)" in md and "](samples.png)" in md


def test_report_mistakes_are_clear(logged_run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        report(ReportJob(run_dir=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no logs/metrics.csv"):
        report(ReportJob(run_dir=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="eval_json"):
        report(ReportJob(run_dir=str(logged_run), out_dir=str(tmp_path / "r"), eval_json=str(tmp_path / "x.json")))
    with pytest.raises(ValueError, match="smoothing"):
        ReportJob(run_dir="r", smoothing=1.0)


def test_metric_reading_helpers(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss,train/loss/i2i,data/skipped/x\n"
                    "0,1.0,0.5,1\n1,0.9,nan,1\n2,0.8,0.4,2\n1,0.7,,\n")
    series = read_metrics(path)
    assert series["train/loss"] == [(0, 1.0), (1, 0.7), (2, 0.8)]  # a re-logged step keeps its last value
    assert series["train/loss/i2i"] == [(0, 0.5), (2, 0.4)]  # NaN: no i2i sample at step 1
    assert series["data/skipped/x"] == [(0, 1.0), (1, 1.0), (2, 2.0)]  # counts may repeat
    both = ocr_columns({"eval/ocr/en/char_accuracy": [(1, 0.1)], "eval/ned_score": [(1, 0.2)],
                        "eval/ned_score/zh": [(1, 0.3)]})
    assert both == {"char_accuracy": {"en": [(1, 0.1)]}, "ned_score": {"overall": [(1, 0.2)], "zh": [(1, 0.3)]}}
    assert ema([2.0, 4.0], 0.5) == pytest.approx([2.0, (0.25 * 2 + 0.5 * 4) / 0.75])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_report_plots_ocr_per_suite_against_steps_with_stage_boundaries(tmp_path, monkeypatch):
    """A fake metrics.csv: three stages of 3 steps, an OCR evaluation at the start (step 0) and
    at each stage end (3, 6, 9), as callbacks.ocr_eval logs them (eval/ocr/<metric>/<group>)."""
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    stages = ["glyphs", "lines", "edits"]
    ocr = {0: (0.0, 0.0, 0.1), 3: (0.25, 0.5, 0.0), 6: (0.5, 0.75, 0.25), 9: (0.75, 1.0, 0.5)}
    fields = ["step", "epoch", "train/loss", "curriculum/stage", *(f"train/loss/stage/{s}" for s in stages),
              "eval/ocr/char_accuracy", "eval/ocr/char_accuracy/glyph_char", "eval/ocr/char_accuracy/glyph_two_line",
              "eval/ocr/char_accuracy/zh-Hans", "eval/ocr/char_accuracy/gb2312_level1", "eval/ocr/exact",
              "eval/ocr/exact/glyph_char"]
    rows = []
    for step in range(9):
        stage = step // 3
        rows.append({"step": step, "epoch": stage, "train/loss": 1 - step / 10, "curriculum/stage": stage,
                     f"train/loss/stage/{stages[stage]}": 1 - step / 10})
    for step, (overall, char, two) in ocr.items():
        rows.append({"step": step, "eval/ocr/char_accuracy": overall, "eval/ocr/char_accuracy/glyph_char": char,
                     "eval/ocr/char_accuracy/glyph_two_line": two, "eval/ocr/char_accuracy/zh-Hans": overall,
                     "eval/ocr/char_accuracy/gb2312_level1": char, "eval/ocr/exact": overall,
                     "eval/ocr/exact/glyph_char": char})
    with open(run / "logs" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    figures = {}
    real_savefig = Figure.savefig

    def savefig(self, path, *args, **kwargs):
        figures[Path(path).name] = self
        return real_savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    result = report(ReportJob(run_dir=str(run), out_dir=str(tmp_path / "report")))
    assert "ocr.png" in result["plots"]
    _valid_png(tmp_path / "report" / "ocr.png")
    char_ax, exact_ax = [ax for ax in figures["ocr.png"].axes if ax.get_visible() and ax.get_title(loc="left")]
    assert char_ax.get_title(loc="left") == "char_accuracy" and exact_ax.get_title(loc="left") == "exact"
    curves = {line.get_label(): line for line in char_ax.get_lines() if not line.get_label().startswith("_")}
    assert list(curves) == ["glyph_char", "glyph_two_line", "overall"]  # one line per suite; no levels, languages
    for label, line in curves.items():
        assert line.get_marker() == "o" and list(line.get_xdata()) == [0, 3, 6, 9], label
    assert list(curves["glyph_char"].get_ydata()) == [0.0, 0.5, 0.75, 1.0]
    boundaries = sorted(line.get_xdata()[0] for line in char_ax.get_lines()
                        if line.get_linestyle() == "--" and line.get_label().startswith("_"))
    assert boundaries == [3, 6]  # a dashed line where each later stage starts
    assert char_ax.get_xlim()[0] <= 0 and char_ax.get_xlim()[1] >= 9

    md = (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")
    assert "char_accuracy against training steps" in md and "plotted in [ocr.png](ocr.png)" in md
    assert "| step | stage | overall | glyph_char | glyph_two_line |" in md
    assert "| 0 | before training | 0 | 0 | 0.1 |" in md
    assert "| 3 | glyphs | 0.25 | 0.5 | 0 |" in md and "| 9 | edits | 0.75 | 1 | 0.5 |" in md
    assert "![OCR metrics over steps](ocr.png)" in md


def test_demo_summary_curve_holds_suites_per_evaluation():
    """make demo's summary.json: the OCR curve per step and suite, named after the stage it ends."""
    from qwenimg_train.tools.demo import ocr_curve

    train_summary = {"stages": {"no_text": {"steps": 3}, "simple_text": {"steps": 4}},
                     "ocr_eval": [{"step": 0, "metrics": {"eval/ocr/char_accuracy/glyph_char": 0.0}},
                                  {"step": 7, "metrics": {"eval/ocr/char_accuracy": 0.4,
                                                          "eval/ocr/char_accuracy/glyph_char": 0.75,
                                                          "eval/ocr/char_accuracy/zh-Hans": 0.5,
                                                          "eval/ocr/edit_success/glyph_edit": 0.25}}]}
    assert ocr_curve(train_summary) == [
        {"step": 0, "after": "start", "glyph_char": {"char_accuracy": 0.0}},
        {"step": 7, "after": "simple_text", "glyph_char": {"char_accuracy": 0.75},
         "glyph_edit": {"edit_success": 0.25}}]
