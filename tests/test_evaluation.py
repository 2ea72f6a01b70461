"""Text-rendering evaluation: the suites, the OCR metric validated against renders of
known quality, and `qwenimg-eval` on the tiny checkpoint."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.text import charsets
from data_pipelines.core.ocr import OcrEngine, normalize
from data_pipelines.text.corpus import builtin_phrases
from qwenimg_train.eval import suites as S
from qwenimg_train.eval.metrics import (
    METRICS,
    aggregate,
    flat_metrics,
    reading_order,
    score_image,
    score_text,
    word_accuracy,
    write_report,
)
from qwenimg_train.eval.suites import Record, load_suites, reference_image, render_text_image

GT_SIZE = 256  # reference renders: rapidocr upscales anything smaller than 736 px, so a bigger canvas only costs drawing


@pytest.fixture(scope="module")
def ocr():
    return OcrEngine(threads=1)


# --- the suites ----------------------------------------------------------------------


def test_committed_suites_are_the_generator_output():
    """The JSONL files are `build_suites()` (rerun `python -m qwenimg_train.eval.suites` after changing it)."""
    built = S.build_suites()
    loaded = load_suites("all")
    assert [r.id for r in loaded] == [r.id for records in built.values() for r in records]
    assert loaded == [r for records in built.values() for r in records]


def test_suites_are_well_formed():
    records = load_suites("all")
    assert len({r.id for r in records}) == len(records)
    by_suite = {name: [r for r in records if r.suite == name] for name in S.SUITES}
    for name, rows in by_suite.items():
        assert 20 <= len(rows) <= 100, (name, len(rows))
        info = S.SUITES[name]
        for r in rows:
            assert r.language == info.language and r.text == "\n".join(r.lines)
            assert r.direction == ("vertical" if info.kind == "vertical" else "horizontal")
            quoted = [r.source_text, r.target_text] if r.is_edit else r.lines
            for s in quoted:  # every expected string is quoted exactly in the prompt
                assert f"“{s}”" in r.prompt, (r.id, s)
            if info.kind == "char":
                assert len(r.text) == 1 and charsets.gb2312_level(r.text) == r.level == int(name[-1])
                assert r.text not in S.JUDGE_UNREADABLE
            else:
                assert r.level is None
            if info.kind == "edit":
                assert r.is_edit and r.target_text == r.text and r.instruction == r.prompt
                src, dst = normalize(r.source_text), normalize(r.target_text)
                assert src not in dst and dst not in src, r.id  # "old gone" and "new present" stay decidable
                assert set(r.render) == {"seed", "background", "color", "font_scale"}
            else:
                assert not r.is_edit and r.render is None
    # The small subset: the first SMALL_LIMIT of every suite.
    small = load_suites("all", limit=S.SMALL_LIMIT)
    assert [r.id for r in small] == [r.id for rows in by_suite.values() for r in rows[:S.SMALL_LIMIT]]
    with pytest.raises(ValueError, match="unknown suite"):
        load_suites(["zh_char_l3"])


def test_suite_texts_are_held_out_from_the_training_word_lists():
    seen = set(builtin_phrases("zh-Hans")) | set(builtin_phrases("en"))
    for r in load_suites("all"):
        strings = set(r.lines) | ({r.source_text} if r.is_edit else set())
        assert not strings & seen, (r.id, strings & seen)


def test_edit_sources_are_deterministic():
    (record,) = load_suites("edit_zh", limit=1)
    a = reference_image(record, (128, 128), which="source")
    b = reference_image(record, (128, 128), which="source")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.getpixel((0, 0)) == tuple(record.render["background"])
    assert not np.array_equal(np.asarray(a), np.asarray(reference_image(record, (128, 128))))


# --- pure metric functions -------------------------------------------------------------


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_reading_order_horizontal_and_vertical():
    dets = [(_box(60, 50, 100, 70), "world", 1.0), (_box(0, 52, 50, 68), "hello", 1.0), (_box(0, 0, 80, 20), "title", 1.0)]
    assert reading_order(dets, "horizontal") == ["title", "hello world"]
    columns = [(_box(10, 0, 30, 100), "左列", 1.0), (_box(50, 0, 70, 60), "右列上", 1.0), (_box(50, 70, 70, 100), "下", 1.0)]
    assert reading_order(columns, "vertical") == ["右列上 下", "左列"]
    assert reading_order([], "horizontal") == []


def test_word_accuracy_rules():
    assert word_accuracy("Good Morning", "good morning!", "en") == 1.0
    assert word_accuracy("GOODMORNING", "Good Morning", "en") == 1.0  # a dropped space
    assert word_accuracy("Good Evening", "Good Morning", "en") == 0.5
    assert word_accuracy("春风拂", "春风拂面", "zh-Hans") == 0.75  # Chinese: characters are the words
    assert word_accuracy("面拂风春", "春风拂面", "zh-Hans") == 1.0  # a multiset: order is char_accuracy's business


def test_score_text_metrics_and_edits():
    record = Record(id="x", suite="zh_long", language="zh-Hans", prompt="", text="白日依山尽\n黄河入海流",
                    lines=["白日依山尽", "黄河入海流"])
    s = score_text(["白日依山尽", "黄河入海流"], record)
    assert (s["char_accuracy"], s["ned_score"], s["word_accuracy"], s["exact"]) == (1.0, 1.0, 1.0, 1.0)
    s = score_text(["白日依山尽", "黄河入海"], record)
    assert s["char_accuracy"] == pytest.approx(0.9) and s["exact"] == 0.0
    s = score_text(["白日依山尽黄河入海流", "多余的字多余的字多余的字"], record)  # extra text costs char accuracy only
    assert s["char_accuracy"] == 0.0 and s["word_accuracy"] == 1.0 and s["ned_score"] == pytest.approx(10 / 22, abs=1e-3)
    (edit,) = load_suites("edit_en", limit=1)  # OPEN -> CLOSED
    assert score_text(["CLOSED"], edit)["edit_success"] == 1.0
    both = score_text(["OPEN CLOSED"], edit)
    assert (both["old_gone"], both["new_present"], both["edit_success"]) == (0.0, 1.0, 0.0)
    assert score_text([], edit)["old_gone"] == 1.0 and score_text([], edit)["edit_success"] == 0.0


def test_aggregate_and_report(tmp_path):
    records = load_suites(["zh_char_l1", "zh_char_l2", "edit_en"], limit=2)
    results = [score_text([r.text] if i % 2 == 0 else [], r) for i, r in enumerate(records)]
    agg = aggregate(results)
    assert agg["suites"]["zh_char_l1"]["char_accuracy"] == 0.5 and agg["suites"]["zh_char_l1"]["n"] == 2
    assert set(agg["levels"]) == {"gb2312_level1", "gb2312_level2"}
    assert set(agg["languages"]) == {"zh-Hans", "en"}
    assert agg["overall"]["char_accuracy"] == 0.5 and agg["overall"]["edit_success"] == 0.5
    assert flat_metrics(agg)["eval/char_accuracy/gb2312_level2"] == 0.5
    doc = write_report(results, tmp_path / "ocr.json", tmp_path / "ocr.md", config={"seed": 0})
    assert json.loads((tmp_path / "ocr.json").read_text())["aggregates"] == doc["aggregates"]
    md = (tmp_path / "ocr.md").read_text()
    assert "| `zh_char_l1` | 2 | 0.500 ± 0.500 |" in md and "gb2312_level2" in md


# --- the metric validated against renders of known quality -------------------------------


def _per_suite_char_accuracy(ocr, records, image_of):
    scores: dict[str, list[float]] = {}
    for r in records:
        scores.setdefault(r.suite, []).append(score_image(ocr, image_of(r), r)["char_accuracy"])
    return {name: sum(v) / len(v) for name, v in scores.items()}


def test_ground_truth_renders_score_high(ocr):
    """The expected text drawn cleanly reads back: >= 0.95 mean character accuracy per suite
    (first 4 prompts of each suite here; every prompt in the slow test below)."""
    records = load_suites("all", limit=4)
    means = _per_suite_char_accuracy(ocr, records, lambda r: reference_image(r, (GT_SIZE, GT_SIZE)))
    assert set(means) == set(S.SUITES)
    assert all(m >= 0.95 for m in means.values()), means


@pytest.mark.slow
def test_ground_truth_renders_score_high_on_every_prompt(ocr):
    means = _per_suite_char_accuracy(ocr, load_suites("all"), lambda r: reference_image(r, (GT_SIZE, GT_SIZE)))
    assert all(m >= 0.95 for m in means.values()), means


def test_noise_scores_near_zero(ocr):
    rng = np.random.default_rng(0)
    records = load_suites(["zh_char_l1", "zh_phrase", "en_word", "zh_long", "en_long", "edit_en"], limit=1)
    noise = {r.id: Image.fromarray(rng.integers(0, 256, (GT_SIZE, GT_SIZE, 3), dtype=np.uint8)) for r in records}
    results = [score_image(ocr, noise[r.id], r) for r in records]
    for m in METRICS:
        assert np.mean([s[m] for s in results]) <= 0.05, (m, results)


def _swap(text: str, fraction: float, rng: random.Random, pool: str) -> tuple[str, int]:
    """`text` with round(fraction * n) of its n scored characters replaced by others from `pool`."""
    positions = [i for i, ch in enumerate(text) if normalize(ch)]
    chosen = rng.sample(positions, round(fraction * len(positions)))
    out = list(text)
    for i in chosen:
        out[i] = rng.choice([c for c in pool if normalize(c) != normalize(text[i]) and c not in text])
    return "".join(out), len(chosen)


def test_swapped_characters_score_the_expected_fraction(ocr):
    """30% of the characters replaced: character accuracy 0.70 within a few points."""
    rng = random.Random(0)
    measured, expected = [], []
    records = load_suites("zh_long", limit=3) + load_suites("en_long", limit=3)
    for r in records:
        pool = charsets.gb2312_level1() if r.language == "zh-Hans" else "abcdefghijklmnopqrstuvwxyz"
        swapped = [_swap(line, 0.3, rng, pool) for line in r.lines]
        n = len(normalize(r.text))
        expected.append(1 - sum(k for _, k in swapped) / n)
        image = render_text_image([s for s, _ in swapped], language=r.language, direction=r.direction,
                                  spec=S.reference_spec(r), size=(GT_SIZE, GT_SIZE))
        measured.append(score_image(ocr, image, r)["char_accuracy"])
    assert np.mean(expected) == pytest.approx(0.70, abs=0.02)
    assert np.mean(measured) == pytest.approx(np.mean(expected), abs=0.05), (measured, expected)


# --- qwenimg-eval on the tiny checkpoint ------------------------------------------------


def _check_report(out: Path, doc: dict, suites: list[str], per_suite: int) -> None:
    on_disk = json.loads((out / "ocr.json").read_text())
    assert set(on_disk) >= {"config", "aggregates", "results", "timing"}
    assert on_disk["aggregates"] == doc["aggregates"]
    ids = [r["id"] for r in on_disk["results"]]
    assert ids == [r.id for r in load_suites(suites, limit=per_suite)]
    assert list(on_disk["aggregates"]["suites"]) == suites
    for name, summary in on_disk["aggregates"]["suites"].items():
        assert summary["n"] == per_suite
        for m in METRICS:
            assert 0.0 <= summary[m] <= 1.0
        if name in S.EDIT_SUITES:
            assert 0.0 <= summary["edit_success"] <= 1.0
    for r in on_disk["results"]:
        assert isinstance(r["read"], str) and 0.0 <= r["char_accuracy"] <= 1.0
        image = Image.open(out / "images" / r["suite"] / f"{r['id']}.png")
        assert image.size == (on_disk["config"]["resolution"],) * 2
        if r["suite"] in S.EDIT_SUITES:
            assert (out / "images" / r["suite"] / f"{r['id']}.source.png").is_file()
    md = (out / "ocr.md").read_text()
    for name in suites:
        assert f"| `{name}` | {per_suite} |" in md
        assert (out / "grids" / f"{name}.png").is_file()
    assert all(re.fullmatch(r"eval/[a-z_]+(/[A-Za-z0-9_\-]+)?", k) for k in doc["metrics"])


def test_evaluate_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path, ocr):
    """Both pipelines, one prompt of a few suites (the tiny model draws noise: structure, not quality)."""
    from qwenimg_train.eval.runner import evaluate

    suites = ["zh_char_l1", "en_long", "zh_vertical", "edit_en"]
    doc = evaluate(tiny_checkpoint, suites, limit=1, resolution=64, steps=2, guidance=1.0, out_dir=tmp_path,
                   ocr=ocr, progress=False)
    _check_report(tmp_path, doc, suites, per_suite=1)
    assert doc["config"]["steps"] == 2 and doc["timing"]["generate_s"] > 0


def test_generate_callable_and_seeds_fix_the_outputs(tmp_path, ocr):
    """A callable generator (what a training callback can pass): reference renders for
    T2I prompts, the source image for edits, so "old gone" fails exactly on edits."""
    from qwenimg_train.eval.runner import evaluate, prompt_seed

    calls = []

    def generate(prompts, sources, seeds):
        calls.append((len(prompts), sources is not None, list(seeds)))
        return sources if sources is not None else [Image.new("RGB", (64, 64), "white") for _ in prompts]

    records = load_suites(["en_word", "edit_en"], limit=3)
    doc = evaluate(generate, records=records, resolution=64, batch_size=2, seed=5, ocr=ocr, progress=False)
    assert [c[:2] for c in calls] == [(2, False), (1, False), (2, True), (1, True)]  # batches never mix suites
    assert [s for c in calls for s in c[2]] == [prompt_seed(5, r.id) for r in records]
    assert doc["aggregates"]["suites"]["edit_en"]["old_gone"] < 0.5  # the unchanged source still shows the old text
    assert doc["aggregates"]["suites"]["en_word"]["char_accuracy"] == 0.0


@pytest.mark.slow
def test_qwenimg_eval_writes_a_complete_report(tiny_checkpoint, tmp_path):
    """The console script's path (configs/tools/eval.yaml composed, run()): every suite, 2 prompts each."""
    from conftest import compose_tool
    from data_pipelines.core.config import from_mapping, to_plain
    from qwenimg_train.eval.runner import EvalJob, run

    overrides = [f"checkpoint_dir={tiny_checkpoint}", f"out_dir={tmp_path}", "limit=2", "resolution=64", "steps=2",
                 "progress=false"]
    cfg = compose_tool("eval", overrides)
    job = from_mapping(EvalJob, {k: v for k, v in to_plain(cfg).items() if k != "hydra"}, "eval")
    doc = run(job)
    _check_report(tmp_path, doc, list(S.SUITES), per_suite=2)
    assert doc["config"]["job"]["checkpoint_dir"] == str(tiny_checkpoint)
    # The tiny model draws noise: nothing reads back.
    assert doc["aggregates"]["overall"]["char_accuracy"] <= 0.05


def test_suites_a_model_cannot_run():
    """A text-to-image-only model (no processor/): "all" leaves the edit suites out, naming one is an error."""
    from types import SimpleNamespace

    from qwenimg_train.eval.runner import _supported_suites

    t2i_only = SimpleNamespace(supports_edit=False, supports_t2i=True)
    assert _supported_suites("all", t2i_only) == [n for n in S.SUITES if n not in S.EDIT_SUITES]
    with pytest.raises(ValueError, match="edit_zh"):
        _supported_suites(["zh_phrase", "edit_zh"], t2i_only)
    assert _supported_suites("all", lambda *a: None) == list(S.SUITES)  # a plain callable is assumed to do both


def test_eval_config_composes_into_a_job(tiny_checkpoint, tmp_path):
    from conftest import compose_tool
    from data_pipelines.core.config import from_mapping, to_plain
    from qwenimg_train.eval.runner import EvalJob

    cfg = compose_tool("eval", [f"checkpoint_dir={tiny_checkpoint}", "suites=[zh_phrase,edit_zh]"])
    job = from_mapping(EvalJob, {k: v for k, v in to_plain(cfg).items() if k != "hydra"}, "eval")
    assert job.suites == ["zh_phrase", "edit_zh"] and job.limit is None and job.resolution == 512


def test_eval_job_errors_name_the_value(tmp_path):
    from qwenimg_train.eval.runner import EvalJob

    with pytest.raises(ValueError, match="checkpoint_dir"):
        EvalJob(checkpoint_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown suite"):
        EvalJob(checkpoint_dir=str(tmp_path), suites=["zh_char_l9"])
    with pytest.raises(ValueError, match="multiple of 16"):
        EvalJob(checkpoint_dir=str(tmp_path), resolution=100)
