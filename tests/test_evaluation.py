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
    loaded = load_suites(list(S.SUITES))  # every suite, both worlds
    assert [r.id for r in loaded] == [r.id for records in built.values() for r in records]
    assert loaded == [r for records in built.values() for r in records]


def test_suites_are_well_formed():
    records = load_suites("all")
    assert len({r.id for r in records}) == len(records)
    by_suite = {name: [r for r in records if r.suite == name] for name in S.suite_names("all")}
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


def test_all_means_the_open_suites_and_glyph_the_glyph_world():
    from data_pipelines.sources import glyphs

    open_names = [n for n, info in S.SUITES.items() if info.world == "open"]
    assert len(open_names) == 9 and S.suite_names("all") == open_names
    assert S.suite_names("glyph") == ["glyph_char", "glyph_two_line", "glyph_held_out", "glyph_edit"]
    assert {info.world for info in S.SUITES.values()} == set(S.WORLDS)
    assert "glyph_edit" in S.EDIT_SUITES and S.suite_names("glyph_char") == ["glyph_char"]
    assert {r.suite for r in load_suites("all")} == set(open_names)
    by_suite = {name: load_suites(name) for name in S.suite_names("glyph")}
    assert sorted(r.text for r in by_suite["glyph_char"]) == sorted(glyphs.HELD_IN)
    assert sorted(r.text for r in by_suite["glyph_held_out"]) == sorted(glyphs.HELD_OUT)
    for r in by_suite["glyph_char"] + by_suite["glyph_held_out"]:
        assert r.prompt == glyphs.glyph_prompt([r.text]) == glyphs.ONE_LINE_PROMPT.format(text=r.text)
        assert r.language == "zh-Hans" and r.level is None and not r.is_edit
    two = by_suite["glyph_two_line"]
    assert len(two) == 16 and len({tuple(r.lines) for r in two}) == 16
    for r in two:
        top, bottom = r.lines
        assert top != bottom and {top, bottom} <= set(glyphs.HELD_IN) and r.text == f"{top}\n{bottom}"
        assert r.prompt == glyphs.TWO_LINE_PROMPT.format(top=top, bottom=bottom)
    edits = by_suite["glyph_edit"]
    assert len(edits) == 16 and len({(r.source_text, r.target_text) for r in edits}) == 16
    for r in edits:
        assert r.source_text != r.target_text and {r.source_text, r.target_text} <= set(glyphs.HELD_IN)
        assert r.prompt == r.instruction == glyphs.EDIT_INSTRUCTION.format(old=r.source_text, new=r.target_text)
        assert r.lines == [r.target_text] and r.render is None
    # Reference images are the glyph world's drawings, centred, at the canvas size asked for.
    r = edits[0]
    source = reference_image(r, (64, 64), which="source")
    assert np.array_equal(np.asarray(source), np.asarray(glyphs.draw_glyph_lines([r.source_text], 64).image))
    assert np.array_equal(np.asarray(reference_image(two[0], (64, 64))),
                          np.asarray(glyphs.draw_glyph_lines(two[0].lines, 64).image))
    with pytest.raises(ValueError, match="glyph"):
        S.suite_names("glyphs")


def test_glyph_group_is_accepted_by_the_eval_job_and_the_callback(tmp_path):
    from qwenimg_train.eval.runner import EvalJob
    from qwenimg_train.training.callbacks.ocr_eval import OcrEvalCallback

    job = EvalJob(checkpoint_dir=str(tmp_path), suites="glyph", resolution=64, edit_source_area=64 * 64)
    assert job.suites == "glyph" and job.edit_source_area == 4096
    with pytest.raises(ValueError, match="edit_source_area"):
        EvalJob(checkpoint_dir=str(tmp_path), edit_source_area=100)
    callback = OcrEvalCallback(output_dir=str(tmp_path), scheduler_dir="unused", suites="glyph", resolution=64,
                               edit_source_area=4096)
    assert callback.suites == "glyph" and callback.edit_source_area == 4096


def test_ocr_eval_callback_at_start_evaluates_before_the_first_step(tmp_path):
    from types import SimpleNamespace

    from qwenimg_train.training.callbacks.ocr_eval import OcrEvalCallback

    calls = []
    for at_start in (False, True):
        callback = OcrEvalCallback(output_dir=str(tmp_path), scheduler_dir="unused", every_n_steps=None,
                                   at_start=at_start, stage_ending_at=lambda step: 0 if step == 3 else None)
        callback.run = lambda trainer, module, step, at_start=at_start: calls.append((at_start, step))
        callback.on_train_start(SimpleNamespace(global_step=0), None)
        callback.on_train_start(SimpleNamespace(global_step=5), None)  # a resumed run: no step-0 evaluation
        for step in (1, 2, 3):
            callback.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, step - 1)
    assert calls == [(False, 3), (True, 0), (True, 3)]


def test_small_images_are_upscaled_before_reading(ocr):
    """rapidocr finds nothing in a 64x64 canvas; read_image upscales it to MIN_READ_SIDE first."""
    from data_pipelines.sources.glyphs import draw_glyph_lines
    from qwenimg_train.eval.metrics import MIN_READ_SIDE, read_image, upscale_for_reading

    assert MIN_READ_SIDE == 256
    assert upscale_for_reading(Image.new("RGB", (64, 32))).size == (512, 256)
    big = Image.new("RGB", (300, 256))
    assert upscale_for_reading(big) is big
    assert read_image(ocr, draw_glyph_lines(["八"]).image) == ["八"]
    record = Record(id="g", suite="glyph_two_line", language="zh-Hans", prompt="", text="安\nK", lines=["安", "K"])
    scores = score_image(ocr, draw_glyph_lines(["安", "K"]).image, record)
    assert scores["char_accuracy"] == 1.0 and scores["exact"] == 1.0


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
    assert set(means) == set(S.suite_names("all"))
    assert all(m >= 0.95 for m in means.values()), means


@pytest.mark.slow
def test_ground_truth_renders_score_high_on_every_prompt(ocr):
    means = _per_suite_char_accuracy(ocr, load_suites("all"), lambda r: reference_image(r, (GT_SIZE, GT_SIZE)))
    assert all(m >= 0.95 for m in means.values()), means


def test_glyph_references_read_back_at_the_glyph_canvas(ocr):
    """Every glyph-world record drawn as its training data draws it, at 64 px, reads back
    exactly; an edit's source still shows the old character."""
    from data_pipelines.sources.glyphs import CANVAS

    records = load_suites("glyph")
    means = _per_suite_char_accuracy(ocr, records, lambda r: reference_image(r, (CANVAS, CANVAS)))
    assert means == {name: 1.0 for name in S.suite_names("glyph")}, means
    for r in records:
        if r.is_edit:
            assert score_image(ocr, reference_image(r, (CANVAS, CANVAS), which="source"), r)["old_gone"] == 0.0, r.id


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


def test_edit_source_area_sizes_the_vae_input(tiny_checkpoint):
    """The edit pipeline resizes a source to about 1024² for its VAE; edit_source_area=64*64
    hands the VAE the source at 64x64 (what the glyph world trains on)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module

    from qwenimg_train.eval.runner import PipelineGenerator

    generate = PipelineGenerator.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", steps=2,
                                                 guidance=1.0, resolution=64, edit_source_area=64 * 64)
    vae, encode, seen = generate.edit.vae, generate.edit.vae.encode, []

    class Seen(Exception):
        pass

    def recording(x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        if generate.edit_source_area is None:
            raise Seen  # the 1024² default: the shape is all this test needs
        return encode(x, *args, **kwargs)

    original = edit_module.calculate_dimensions
    source = Image.new("RGB", (64, 64), "white")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vae, "encode", recording)
        (image,) = generate(["replace “八” with “白”"], [source], [0])
        assert image.size == (64, 64) and seen == [(64, 64)]
        assert edit_module.calculate_dimensions is original  # restored after the call
        generate.edit_source_area = None
        with pytest.raises(Seen):
            generate(["replace “八” with “白”"], [source], [0])
        assert seen[1] == (1024, 1024)
    assert edit_module.calculate_dimensions is original


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
    _check_report(tmp_path, doc, S.suite_names("all"), per_suite=2)
    assert doc["config"]["job"]["checkpoint_dir"] == str(tiny_checkpoint)
    # The tiny model draws noise: nothing reads back.
    assert doc["aggregates"]["overall"]["char_accuracy"] <= 0.05


def test_suites_a_model_cannot_run():
    """A text-to-image-only model (no processor/): "all" leaves the edit suites out, naming one is an error."""
    from types import SimpleNamespace

    from qwenimg_train.eval.runner import _supported_suites

    t2i_only = SimpleNamespace(supports_edit=False, supports_t2i=True)
    open_suites = S.suite_names("all")
    assert _supported_suites("all", t2i_only) == [n for n in open_suites if n not in S.EDIT_SUITES]
    with pytest.raises(ValueError, match="edit_zh"):
        _supported_suites(["zh_phrase", "edit_zh"], t2i_only)
    assert _supported_suites("all", lambda *a: None) == open_suites  # a plain callable is assumed to do both
    assert _supported_suites("glyph", t2i_only) == ["glyph_char", "glyph_two_line", "glyph_held_out"]


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
