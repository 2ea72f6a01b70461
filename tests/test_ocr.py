import pytest
from PIL import Image

from data_pipelines.core.ocr import OcrEngine, char_accuracy, line_strip, ned, normalize, verify_sample
from data_pipelines.jobs import synthetic as synth
from data_pipelines.sources.render import RenderConfig, SyntheticRenderer

from conftest import small_job


@pytest.fixture(scope="module")
def ocr():
    return OcrEngine(threads=1)


def test_metric_functions():
    assert ned("春节快乐", "春节快乐") == 0.0
    assert ned("春节快", "春节快乐") == pytest.approx(0.25)
    assert normalize("Hello,  World！") == "helloworld"
    assert char_accuracy("abcx", "abcd") == pytest.approx(0.75)
    assert char_accuracy("", "") == 1.0


def renders(renderer, languages, fmt, n, seed0):
    sub = SyntheticRenderer(
        fonts=renderer.fonts,
        text=type(renderer.text)(language_weights={l: 1.0 for l in languages}, phrase_weight=0.7,
                                 random_chars_weight=0.3, level2_fraction=0.2, covered=renderer.fonts.union_covers),
        config=RenderConfig(formats={fmt: 1.0}),
    )
    return [sub.render(seed0 + i, "k") for i in range(n)]


def test_ocr_round_trip_reads_back_at_least_90_percent(renderer, ocr):
    samples = renders(renderer, ["zh-Hans"], "single_line", 4, 0) + renders(renderer, ["en"], "single_line", 3, 50)
    samples += renders(renderer, ["zh-Hans", "en"], "composition", 2, 100) + renders(renderer, ["zh-Hans"], "vertical", 2, 200)
    correct = total = 0
    for s in samples:
        for line, reading in zip(s.meta.lines, ocr.read_lines(s.image, s.meta.lines, "crops")):
            truth = normalize(line.text)
            correct += round(char_accuracy(reading.text, line.text) * len(truth))
            total += len(truth)
    assert total > 100
    assert correct / total >= 0.9, correct / total


def test_full_mode_matches_detections_to_lines(renderer, ocr):
    (s,) = renders(renderer, ["zh-Hans"], "single_line", 1, 7)
    (reading,) = ocr.read_lines(s.image, s.meta.lines, "full")
    assert reading.score is not None and reading.score >= 0.9


def test_unsupported_languages_are_not_scored(renderer, ocr):
    (s,) = renders(renderer, ["ko"], "single_line", 1, 3)
    (reading,) = ocr.read_lines(s.image, s.meta.lines, "crops")
    assert reading.text is None and reading.score is None


def test_vertical_columns_become_horizontal_strips(renderer):
    (s,) = renders(renderer, ["zh-Hans"], "vertical", 1, 11)
    line = s.meta.lines[0]
    strip = line_strip(s.image, line)
    assert strip.width > strip.height


def test_illegible_samples_are_dropped_and_counted(renderer, ocr):
    (s,) = renders(renderer, ["en"], "single_line", 1, 5)
    assert verify_sample(ocr, s.image, s.meta, "crops") <= 0.2
    blank = Image.new("RGB", s.image.size, (255, 255, 255))
    # the text is gone: OCR must not find it
    assert verify_sample(ocr, blank, s.meta, "crops") > 0.5
    assert s.meta.lines[0].ocr_score < 0.5


def test_job_with_ocr_records_readings(tmp_path):
    job = small_job(tmp_path, num_shards=1, samples_per_shard=4, ocr=synth.OcrConfig(mode="crops"))
    synth.run(job)
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    ocr_counts = manifest["counts"]["ocr"]
    assert sum(ocr_counts.get(k, 0) for k in ("passed", "unscored", "no_text")) == 4
    assert "not_checked" not in ocr_counts


def test_ocr_fraction_selects_by_seed(tmp_path):
    job = small_job(tmp_path, num_shards=1, samples_per_shard=8, ocr=synth.OcrConfig(mode="crops", fraction=0.0))
    synth.run(job)
    import json

    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["ocr"] == {"not_checked": 8}
