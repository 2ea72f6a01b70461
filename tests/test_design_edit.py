"""Design composer, procedural natural images and edit pairs (issue: design, natural and editing data)."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from data_pipelines.sources.design import DesignComposer, DesignConfig
from data_pipelines.pairs.edit import EDIT_TYPES, EditMaker
from data_pipelines.jobs.edit_pairs import EditPairsJob
from data_pipelines.jobs.edit_pairs import run as run_edit_pairs
from data_pipelines.core.ocr import OcrEngine
from data_pipelines.core.schema import SampleMeta
from data_pipelines.jobs.natural import NaturalJob, run_natural
from data_pipelines.sources.natural import NaturalImages
from data_pipelines.sources.render import RenderConfig


@pytest.fixture(scope="module")
def composer(renderer):
    return DesignComposer(fonts=renderer.fonts, text=renderer.text, config=RenderConfig(), design=DesignConfig())


@pytest.fixture(scope="module")
def ocr():
    return OcrEngine(threads=1)


def test_designs_cover_every_kind_and_are_valid(composer):
    samples = [composer.render(seed, f"d_{seed}") for seed in range(40)]
    assert {s.meta.format for s in samples} == {"poster", "slide", "ui"}
    classes = Counter(s.meta.text_class for s in samples)
    assert classes["none"] >= 1 and classes["simple"] >= 5 and classes["complex"] >= 10, classes
    for s in samples:
        s.meta.validate()
        assert s.meta.source == "design"
        for line in s.meta.lines:
            assert line.text in s.caption
        if s.meta.text_class == "none":
            assert not s.meta.lines


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box(points):
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def test_ocr_boxes_on_composed_posters_match_the_composer(composer, ocr):
    posters = DesignComposer(fonts=composer.fonts, text=composer.text, config=RenderConfig(),
                             design=DesignConfig(kinds={"poster": 1.0}, text_free_fraction=0.0, single_line_fraction=0.0))
    matched = total = 0
    for seed in range(4):
        s = posters.render(seed, "p")
        detections = [box(b) for b, _, score in ocr.detect_and_recognize(s.image) if score >= 0.5]
        for line in s.meta.lines:
            if not ocr.supports(line.language):
                continue
            total += 1
            if detections and max(iou(box(line.polygon), d) for d in detections) >= 0.5:
                matched += 1
    assert total >= 8
    assert matched / total >= 0.7, (matched, total)


def test_text_free_designs_and_natural_images_hold_no_readable_text(composer, ocr):
    textless = DesignComposer(fonts=composer.fonts, text=composer.text, config=RenderConfig(),
                              design=DesignConfig(text_free_fraction=1.0, single_line_fraction=0.0))
    natural = NaturalImages()
    images = [textless.render(seed, "t").image for seed in range(3)]
    images += [natural.image(random.Random(seed))[0] for seed in range(4)]
    for image in images:
        # Letters, digits or ideographs: a form field's outline read as "__" is not text.
        read = [(text, score) for _, text, score in ocr.detect_and_recognize(image)
                if score >= 0.5 and sum(ch.isalnum() for ch in text) >= 1]
        assert not read, read


def edit_cases(renderer, composer):
    makers = {"synthetic": (renderer, EditMaker(renderer)), "design": (composer, EditMaker(composer))}
    for name, (r, maker) in makers.items():
        for seed in range(25):
            scene = r.compose(seed, "e")
            for edit_type in EDIT_TYPES:
                edit = maker.ops[edit_type](scene, random.Random(seed * 7 + len(edit_type)), seed % 2 == 0)
                if edit is not None:
                    yield name, r, scene, edit


def test_every_edit_changes_pixels_only_inside_its_region(renderer, composer):
    seen = Counter()
    for name, r, scene, edit in edit_cases(renderer, composer):
        src = np.asarray(r.draw(scene).image).astype(np.int16)
        tgt = np.asarray(r.draw(edit.target).image).astype(np.int16)
        changed = np.abs(src - tgt).max(axis=2) > 0
        x0, y0, x1, y1 = (int(np.floor(edit.region[0])), int(np.floor(edit.region[1])),
                          int(np.ceil(edit.region[2])), int(np.ceil(edit.region[3])))
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any(), (name, edit.edit_type, edit.instruction, int(outside.sum()))
        if edit.edit_type != "reconstruct":
            assert changed[y0:y1, x0:x1].any(), (name, edit.edit_type, edit.instruction)
        seen[edit.edit_type] += 1
    assert set(seen) == set(EDIT_TYPES), seen


def test_instructions_quote_the_metadata(renderer, composer):
    for name, r, scene, edit in edit_cases(renderer, composer):
        src_lines = [line.text for line in r.draw(scene).meta.lines]
        tgt_lines = [line.text for line in r.draw(edit.target).meta.lines]
        d = edit.details
        if edit.edit_type == "replace_text":
            assert f"“{d['old']}”" in edit.instruction and f"“{d['new']}”" in edit.instruction
            # Blocks span lines: compare without the spaces line breaks remove.
            flat = lambda lines: "".join(lines).replace(" ", "")  # noqa: E731
            assert d["old"].replace(" ", "") in flat(src_lines) and d["new"].replace(" ", "") in flat(tgt_lines)
            assert d["new"].replace(" ", "") not in flat(src_lines) or d["old"] in d["new"]
        elif edit.edit_type == "add_line":
            assert f"“{d['new']}”" in edit.instruction and d["new"] in tgt_lines
        elif edit.edit_type == "remove_line":
            assert f"“{d['old']}”" in edit.instruction
            assert len(tgt_lines) < len(src_lines)
        elif edit.edit_type in ("recolor", "resize", "reweight", "move"):
            assert f"“{d['text']}”" in edit.instruction
            # Same text, other look or place (a re-layout may break lines elsewhere).
            assert "".join(tgt_lines).replace(" ", "") == "".join(src_lines).replace(" ", "")
        elif edit.edit_type == "reconstruct":
            assert tgt_lines == src_lines


def test_edit_pairs_job_writes_pairs(tmp_path):
    job = EditPairsJob(out_dir=str(tmp_path), num_shards=1, samples_per_shard=10, progress=False, seed=3)
    summary = run_edit_pairs(job)
    assert summary["samples_written"] == 10
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sum(manifest["counts"]["edit_type"].values()) == 10
    samples = list(wds.WebDataset([str(p) for p in tmp_path.glob("*.tar")], shardshuffle=False, empty_check=False))
    for s in samples:
        assert {"src.jpg", "jpg", "txt", "instruction.txt", "json"} <= set(s)
        meta = SampleMeta.from_json(s["json"])
        edit = meta.extra["edit"]
        assert meta.source == "edit" and edit["type"] in EDIT_TYPES
        assert edit["instruction"] == s["instruction.txt"].decode()
        assert len(edit["region"]) == 4


def test_natural_job_is_text_free(tmp_path):
    summary = run_natural(NaturalJob(out_dir=str(tmp_path), num_shards=1, samples_per_shard=6, progress=False))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert summary["samples_written"] == 6 and manifest["counts"]["text_class"] == {"none": 6}


def test_edit_pairs_are_deterministic_and_resume(tmp_path):
    def tars(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}

    for name in ("a", "b"):
        run_edit_pairs(EditPairsJob(out_dir=str(tmp_path / name), num_shards=2, samples_per_shard=3, progress=False, seed=5))
    assert tars(tmp_path / "a") == tars(tmp_path / "b") and len(tars(tmp_path / "a")) == 2
    again = run_edit_pairs(EditPairsJob(out_dir=str(tmp_path / "a"), num_shards=2, samples_per_shard=3, progress=False, seed=5))
    assert again["shards_kept"] == 2 and again["shards_written"] == 0
