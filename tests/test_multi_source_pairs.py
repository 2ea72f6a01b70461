"""Multi-image edit pairs (issue: multi-image editing for Qwen-Image-Edit-2509/2511).

A small shard of only the multi-image edit types, read back as the loader reads it:
members per `num_sources`, one pixel size for every image, instructions naming the
pictures by number in both languages, the change inside the recorded region, and
the same bytes for the same seed.
"""

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.core.schema import (
    EXTRA_SOURCE_PREFIXES,
    MAX_SOURCES,
    SOURCE_IMAGE_PREFIX,
    SampleMeta,
)
from data_pipelines.jobs.edit_pairs import EditPairsJob
from data_pipelines.jobs.edit_pairs import run as run_edit_pairs
from data_pipelines.pairs.edit import EDIT_TYPES, MULTI_SOURCE_EDIT_TYPES, SINGLE_SOURCE_EDIT_TYPES

MULTI_ONLY = {"title_from_picture": 1.0, "logo_onto_poster": 1.0, "style_from_picture": 2.0}
# JPEG (4:2:0) codes 16x16 blocks, and chroma upsampling reads the neighbours: pixels
# more than one block away from the region are coded from identical input.
JPEG_MARGIN = 16
JPEG_TOLERANCE = 2


def multi_job(out_dir, **overrides) -> EditPairsJob:
    kwargs = dict(out_dir=str(out_dir), num_shards=2, samples_per_shard=12, progress=False, seed=11,
                  edit_types=MULTI_ONLY)
    kwargs.update(overrides)
    return EditPairsJob(**kwargs)


def read_samples(folder) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False, empty_check=False))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    summary = run_edit_pairs(multi_job(out))
    samples = read_samples(out)
    assert summary["samples_written"] == len(samples) == 24
    return out, samples


def test_schema_names_the_extra_sources():
    assert SOURCE_IMAGE_PREFIX == "src"
    assert EXTRA_SOURCE_PREFIXES == ("src2", "src3")
    assert MAX_SOURCES == 3
    assert set(MULTI_SOURCE_EDIT_TYPES) == {"title_from_picture", "logo_onto_poster", "style_from_picture"}
    assert EDIT_TYPES == SINGLE_SOURCE_EDIT_TYPES + MULTI_SOURCE_EDIT_TYPES


def test_members_follow_num_sources(shard):
    out, samples = shard
    counts = Counter()
    for s in samples:
        meta = SampleMeta.from_json(s["json"])
        meta.validate()
        edit = meta.extra["edit"]
        n = edit["num_sources"]
        assert edit["type"] in MULTI_SOURCE_EDIT_TYPES and 2 <= n <= MAX_SOURCES
        if edit["type"] in ("title_from_picture", "logo_onto_poster"):
            assert n == 2
        sources = [f"{SOURCE_IMAGE_PREFIX}.jpg"] + [f"{p}.jpg" for p in EXTRA_SOURCE_PREFIXES]
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {*sources[:n], "jpg", "txt", "instruction.txt", "json"}
        assert edit["instruction"] == s["instruction.txt"].decode()
        assert len(edit["extra_source_lines"]) == n - 1
        counts[(edit["type"], n)] += 1
    assert {t for t, _ in counts} == set(MULTI_SOURCE_EDIT_TYPES), counts
    assert counts[("style_from_picture", 3)] >= 1 and counts[("style_from_picture", 2)] >= 1, counts
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["counts"]["num_sources"].values()) == len(samples)
    assert set(manifest["counts"]["num_sources"]) <= {"2", "3"}


def test_every_image_of_a_sample_has_one_size(shard):
    _, samples = shard
    for s in samples:
        meta = json.loads(s["json"])
        images = [Image.open(io.BytesIO(s[m])) for m in s if m == "jpg" or m.endswith(".jpg")]
        assert len(images) == meta["extra"]["edit"]["num_sources"] + 1
        assert {im.size for im in images} == {(meta["width"], meta["height"])}


def test_instructions_name_the_pictures_in_both_languages(shard):
    _, samples = shard
    languages = Counter()
    for s in samples:
        edit = json.loads(s["json"])["extra"]["edit"]
        n, text, zh = edit["num_sources"], edit["instruction"], edit["instruction_language"] == "zh"
        words = re.sub(r"“[^”]*”", "", text)  # without the quoted text of Picture 1, in any language
        names = [f"图{k}" if zh else f"Picture {k}" for k in range(1, 4)]
        assert all(name in words for name in names[:n]), text
        assert not any(name in words for name in names[n:]), text
        if zh:
            assert re.search(r"[\u4e00-\u9fff]", words) and "Picture" not in words, text
        else:
            assert words.isascii(), text
        languages[edit["instruction_language"]] += 1
    assert languages["zh"] >= 3 and languages["en"] >= 3, languages


def test_the_target_changes_inside_the_region_only(shard):
    _, samples = shard
    for s in samples:
        edit = json.loads(s["json"])["extra"]["edit"]
        source, target = pixels(s["src.jpg"]), pixels(s["jpg"])
        h, w = target.shape[:2]
        (x0, y0), (x1, y1) = edit["region"][0], edit["region"][2]
        x0, y0, x1, y1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, edit["region"]
        diff = np.abs(source - target).max(axis=2)
        assert diff[y0:y1, x0:x1].max() > 60, (edit["type"], edit["instruction"])
        m = JPEG_MARGIN
        outside = np.ones_like(diff, dtype=bool)
        outside[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m] = False
        if outside.any():  # the title and logo kinds as asked; style_from_picture keeps it too
            assert diff[outside].max() <= JPEG_TOLERANCE, (edit["type"], edit["instruction"], int(diff[outside].max()))


def test_details_match_the_pictures(shard):
    _, samples = shard
    for s in samples:
        meta = SampleMeta.from_json(s["json"])
        edit = meta.extra["edit"]
        d = edit["details"]
        picture_texts = [[line["text"] for line in lines] for lines in edit["extra_source_lines"]]
        target_text = "".join(line.text for line in meta.lines).replace(" ", "")
        if edit["type"] == "title_from_picture":
            assert picture_texts == [[d["picture_text"]]]  # Picture 2 shows the new text alone, on one line
            assert d["new"].replace(" ", "") in target_text and d["picture_text"] in d["new"]
        elif edit["type"] == "logo_onto_poster":
            assert d["variant"] in ("mark", "badge", "wordmark")
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= meta.width and 0 <= y0 < y1 <= meta.height
            assert picture_texts == ([[d["text"]]] if d["text"] else [[]])
            if d["text"]:
                assert d["text"] in [line.text for line in meta.lines]  # the target's logo text is in its lines
        else:
            assert set(d["aspects"]) <= {"color", "font"} and d["aspects"]
            assert ("color" in d["aspects"]) == (d["old_color"] != d["new_color"])
            assert ("font" in d["aspects"]) == (d["old_font"] != d["new_font"])
            if edit["num_sources"] == 3:
                assert d["aspects"] == ["color", "font"]
            assert [t[0] for t in picture_texts] == d["picture_text"]
            assert all(d["text"] not in t for t in d["picture_text"])  # the references show other text


def test_same_seed_same_bytes(tmp_path):
    def tars(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}

    for name in ("a", "b"):
        run_edit_pairs(multi_job(tmp_path / name, num_shards=1, samples_per_shard=5))
    assert tars(tmp_path / "a") == tars(tmp_path / "b") and len(tars(tmp_path / "a")) == 1
    run_edit_pairs(multi_job(tmp_path / "c", num_shards=1, samples_per_shard=5, seed=12))
    assert tars(tmp_path / "c") != tars(tmp_path / "a")


def test_settings_name_the_new_types_and_refuse_bad_ones(tmp_path):
    default = EditPairsJob(out_dir=str(tmp_path))
    # Off by default: a one-source model's loader skips multi-image pairs as bad samples.
    assert set(default.edit_types) == set(EDIT_TYPES)
    assert all(default.edit_types[t] == 0.0 for t in MULTI_SOURCE_EDIT_TYPES)
    assert sum(default.edit_types[t] for t in SINGLE_SOURCE_EDIT_TYPES) == pytest.approx(1.0)
    EditPairsJob(out_dir=str(tmp_path), edit_types={**default.edit_types, **{t: 0.05 for t in MULTI_SOURCE_EDIT_TYPES}})
    with pytest.raises(ValueError, match="unknown edit type 'logo_onto_slide'"):
        EditPairsJob(out_dir=str(tmp_path), edit_types={"logo_onto_slide": 1.0})
    with pytest.raises(ValueError, match="edit_types.style_from_picture = -1"):
        EditPairsJob(out_dir=str(tmp_path), edit_types={"replace_text": 1.0, "style_from_picture": -1.0})
    with pytest.raises(ValueError, match="positive sum"):
        EditPairsJob(out_dir=str(tmp_path), edit_types={t: 0.0 for t in MULTI_SOURCE_EDIT_TYPES})


def test_the_config_file_lists_the_new_types_and_turns_them_on_by_override(tmp_path):
    from hydra import compose, initialize_config_dir

    from data_pipelines.cli import config_dir, run_job

    on = [f"edit_types.{t}=0.05" for t in MULTI_SOURCE_EDIT_TYPES]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="edit-pairs")
        cfg_on = compose(config_name="edit-pairs", overrides=[
            f"out_dir={tmp_path}", "num_shards=1", "samples_per_shard=2", "progress=false",
            *on, *[f"edit_types.{t}=0" for t in SINGLE_SOURCE_EDIT_TYPES]])
    weights = dict(cfg.edit_types)
    assert set(weights) == set(EDIT_TYPES)
    assert all(weights[t] == 0.0 for t in MULTI_SOURCE_EDIT_TYPES)
    assert weights["replace_text"] == 0.25 and weights["reconstruct"] == 0.1  # the single-image weights as they were
    run_job(cfg_on)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["counts"]["edit_type"]) <= set(MULTI_SOURCE_EDIT_TYPES)
    assert sum(manifest["counts"]["num_sources"].values()) == 2 and "1" not in manifest["counts"]["num_sources"]


def test_single_image_pairs_say_one_source(tmp_path):
    run_edit_pairs(EditPairsJob(out_dir=str(tmp_path), num_shards=1, samples_per_shard=4, progress=False, seed=2))
    samples = read_samples(tmp_path)
    assert len(samples) == 4
    for s in samples:
        edit = json.loads(s["json"])["extra"]["edit"]
        assert edit["type"] in SINGLE_SOURCE_EDIT_TYPES and edit["num_sources"] == 1
        assert "src.jpg" in s and not any(f"{p}.jpg" in s for p in EXTRA_SOURCE_PREFIXES)
        assert "extra_source_lines" not in edit
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["num_sources"] == {"1": 4}
