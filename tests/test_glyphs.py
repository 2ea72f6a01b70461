"""The glyph world's data job: the three text classes and the edit pairs, deterministic,
on the held-in vocabulary only, readable by the loader's schema."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.core.schema import SampleMeta
from data_pipelines.jobs.glyphs import GlyphsJob, run
from data_pipelines.sources import glyphs


def _samples(folder: Path) -> list[dict]:
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(out.values())


def test_glyph_job_writes_both_folders_deterministically(tmp_path):
    job = GlyphsJob(out_dir=str(tmp_path / "a"), num_shards=2, samples_per_shard=40, progress=False)
    summary = run(job)
    assert set(summary) == {"synthetic", "edit"}
    again = GlyphsJob(out_dir=str(tmp_path / "b"), num_shards=2, samples_per_shard=40, progress=False)
    run(again)
    for folder in ("synthetic", "edit"):
        a = sorted((tmp_path / "a" / folder).glob("*.tar"))
        assert len(a) == 2
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in sorted((tmp_path / "b" / folder).glob("*.tar"))]
        manifest = json.loads((tmp_path / "a" / folder / "manifest.json").read_text())
        assert manifest["world"] == "glyphs" and manifest["num_samples"] == 80

    scenes = _samples(tmp_path / "a" / "synthetic")
    classes = {SampleMeta.from_json(s["json"]).text_class for s in scenes}
    assert classes == {"none", "simple", "complex"}
    for s in scenes:
        meta = SampleMeta.from_json(s["json"])
        meta.validate()
        caption = s["txt"].decode()
        image = Image.open(io.BytesIO(s["png"]))
        assert image.size == (glyphs.CANVAS, glyphs.CANVAS)
        text = "".join(line.text for line in meta.lines)
        assert set(text) <= set(glyphs.HELD_IN)  # never a held-out character
        if meta.text_class == "none":
            assert caption.startswith("a grey ") and not meta.lines
        else:
            assert caption == glyphs.glyph_prompt([line.text for line in meta.lines])
            assert len(meta.lines) == (1 if meta.text_class == "simple" else 2)

    pairs = _samples(tmp_path / "a" / "edit")
    types = set()
    for s in pairs:
        meta = SampleMeta.from_json(s["json"])
        edit = meta.extra["edit"]
        types.add(edit["type"])
        instruction = s["instruction.txt"].decode()
        source, target = Image.open(io.BytesIO(s["src.png"])), Image.open(io.BytesIO(s["png"]))
        if edit["type"] == "reconstruct":
            assert instruction == "" and source.tobytes() == target.tobytes()
        elif edit["type"] == "replace_text":
            old, new = edit["details"]["old"], edit["details"]["new"]
            assert instruction == glyphs.EDIT_INSTRUCTION.format(old=old, new=new) and old != new
            lines = [line.text for line in meta.lines]
            source_lines = [line["text"] for line in edit["source_lines"]]
            k = edit["details"]["line"]
            assert source_lines[k] == old and lines[k] == new
            assert source_lines[:k] + source_lines[k + 1:] == lines[:k] + lines[k + 1:]
        else:
            assert edit["type"] == "replace_shape" and meta.text_class == "none"
    assert types == {"reconstruct", "replace_text", "replace_shape"}


def test_glyph_job_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="held-out"):
        GlyphsJob(out_dir=str(tmp_path), characters=glyphs.HELD_IN + glyphs.HELD_OUT[0])
    with pytest.raises(ValueError, match="canvas"):
        GlyphsJob(out_dir=str(tmp_path), canvas=60)
    with pytest.raises(ValueError, match="text_classes"):
        GlyphsJob(out_dir=str(tmp_path), text_classes={"poster": 1.0})
    with pytest.raises(ValueError, match="reconstruct_fraction"):
        GlyphsJob(out_dir=str(tmp_path), reconstruct_fraction=1.5)
    with pytest.raises(ValueError, match="jitter"):
        GlyphsJob(out_dir=str(tmp_path), jitter=-0.1)


def test_jitter_zero_gives_each_character_one_look():
    """The default world draws every character one way (the fastest to learn); jitter varies it."""
    looks = {glyphs.draw_glyph_lines(["安"], rng=random.Random(seed), jitter=0).image.tobytes() for seed in range(4)}
    assert looks == {glyphs.draw_glyph_lines(["安"]).image.tobytes()}
    varied = {glyphs.draw_glyph_lines(["安"], rng=random.Random(seed), jitter=1).image.tobytes() for seed in range(4)}
    assert len(varied) == 4


def test_glyph_world_vocabulary_is_fitted_and_disjoint():
    fitted = glyphs.glyph_vocabulary(200)
    assert not set(glyphs.HELD_IN) & set(glyphs.HELD_OUT)
    assert set(glyphs.HELD_IN + glyphs.HELD_OUT) <= set(fitted)  # the VAE was fitted on both


def test_two_lines_share_the_canvas():
    drawn = glyphs.draw_glyph_lines(["安", "K"], rng=random.Random(0))
    (_, top0, _, bottom0), (_, top1, _, bottom1) = drawn.boxes
    assert bottom0 <= top1  # stacked, not overlapping
    assert drawn.image.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="one or two"):
        glyphs.draw_glyph_lines(["a", "b", "c"])
