import random

import pytest

from data_pipelines.text.fonts import FontRegistry, MissingGlyphsError
from data_pipelines.text.linebreak import NO_LINE_END, NO_LINE_START, break_lines, units
from data_pipelines.text.corpus import Corpus, TextSampler

from conftest import make_font


def test_font_lacking_a_glyph_is_refused(tmp_path):
    make_font(tmp_path / "ab.ttf", "AB")
    registry = FontRegistry.discover(dirs=[str(tmp_path)], use_fontconfig=False)
    rng = random.Random(0)
    assert registry.choose("ABBA", "en", rng).name == "ab.ttf"
    with pytest.raises(MissingGlyphsError) as err:
        registry.choose("AB春", "zh-Hans", rng)
    assert "'春' (U+6625)" in str(err.value)
    assert err.value.missing == ["春"]


def test_choose_prefers_a_face_that_covers_everything(tmp_path):
    make_font(tmp_path / "ab.ttf", "AB", family="Only AB")
    make_font(tmp_path / "abc.ttf", "ABC", family="ABC")
    registry = FontRegistry.discover(dirs=[str(tmp_path)], use_fontconfig=False)
    for seed in range(10):
        assert registry.choose("CAB", "en", random.Random(seed)).name == "abc.ttf"


def test_no_single_face_covering_is_named(tmp_path):
    make_font(tmp_path / "a.ttf", "A")
    make_font(tmp_path / "b.ttf", "B")
    registry = FontRegistry.discover(dirs=[str(tmp_path)], use_fontconfig=False)
    with pytest.raises(MissingGlyphsError, match="closest"):
        registry.choose("AB", "en", random.Random(0))


def test_missing_font_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FontRegistry.discover(dirs=[str(tmp_path / "nope")], use_fontconfig=False)
    with pytest.raises(ValueError, match="no fonts found"):
        FontRegistry.discover(dirs=[str(tmp_path)], use_fontconfig=False)


def test_system_cjk_fonts_prefer_the_language_region(fonts):
    rng = random.Random(1)
    for lang, tag in [("zh-Hans", "SC"), ("zh-Hant", ("TC", "HK")), ("ja", "JP"), ("ko", "KR")]:
        face = fonts.choose("人", lang, rng)
        tags = (tag,) if isinstance(tag, str) else tag
        assert any(t in face.family for t in tags), (lang, face.family)


def measure_chars(text):
    return float(len(text))


@pytest.mark.parametrize("seed", range(40))
def test_cjk_line_breaking_never_starts_a_line_with_closing_punctuation(seed):
    rng = random.Random(seed)
    pool = "春节快乐新品上市，。、！？）」』】》：；"
    text = "".join(rng.choice(pool) for _ in range(rng.randint(20, 80)))
    width = rng.randint(3, 12)
    lines = break_lines(text, lambda i: width, measure_chars)
    assert "".join(lines) == text  # nothing lost, nothing added
    for i, line in enumerate(lines):
        assert len(line) <= width
        if i > 0:
            assert line[0] not in NO_LINE_START or len(lines[i - 1]) <= 1, lines
        if i < len(lines) - 1:
            assert line[-1] not in NO_LINE_END or len(line) <= 1, lines


def test_latin_words_are_not_split_and_spaces_vanish_at_breaks():
    text = "Grand Opening Sale this weekend only"
    lines = break_lines(text, lambda i: 14, measure_chars)
    assert lines == ["Grand Opening", "Sale this", "weekend only"]
    assert " ".join(lines) == text


def test_an_overlong_word_is_broken_between_characters():
    lines = break_lines("Supercalifragilistic", lambda i: 8, measure_chars)
    assert lines == ["Supercal", "ifragili", "stic"]


def test_variable_widths_and_max_lines():
    lines = break_lines("一二三四五六七八九十", lambda i: [2, 5, 3][i] if i < 3 else 0, measure_chars, max_lines=3)
    assert lines == ["一二", "三四五六七", "八九十"]


def test_units_keep_latin_runs_together():
    assert units("新品 NEW50% 上市") == ["新", "品", " ", "NEW50%", " ", "上", "市"]


def sampler(**kw):
    args = dict(language_weights={"zh-Hans": 1.0}, phrase_weight=0.5, random_chars_weight=0.5, level2_fraction=0.5)
    args.update(kw)
    return TextSampler(**args)


def test_text_sampler_languages_and_mixed():
    ts = sampler(language_weights={"zh-Hans": 1, "en": 1, "mixed": 1})
    rng = random.Random(0)
    tags = {ts.language(rng) for _ in range(200)}
    assert tags == {"zh-Hans", "en", "mixed"}
    text, tag = ts.mixed(rng)
    assert "en" in tag.split("+") and len(tag.split("+")) == 2


def test_user_corpus_with_weight_and_uncovered_lines(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("你好世界\n\n𠀀罕见\n早上好\n", "utf-8")
    covered = lambda s: "𠀀" not in s  # noqa: E731  (a font set lacking U+20000)
    ts = sampler(phrase_weight=0.0, random_chars_weight=0.0, corpora=[Corpus(str(corpus), "zh-Hans", 1.0)], covered=covered)
    assert ts.stats == {"corpus_items": 2, "corpus_items_dropped_uncovered": 1}
    rng = random.Random(0)
    assert {ts.item(rng, "zh-Hans") for _ in range(50)} == {"你好世界", "早上好"}


def test_text_config_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="klingon"):
        sampler(language_weights={"klingon": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        sampler(language_weights={"zh-Hans": 0.0})
    with pytest.raises(ValueError, match="does not exist"):
        sampler(corpora=[Corpus(str(tmp_path / "missing.txt"), "zh-Hans")])
    with pytest.raises(ValueError, match="no text source"):
        sampler(phrase_weight=0.0, random_chars_weight=0.0)


def test_random_characters_come_from_the_codec_sets():
    from data_pipelines.text import charsets

    ts = sampler(phrase_weight=0.0, level2_fraction=1.0)
    rng = random.Random(3)
    text = ts.item(rng, "zh-Hans", 30)
    assert all(ch in charsets.gb2312_level2() for ch in text)


@pytest.mark.parametrize("seed", range(60))
def test_lines_are_the_source_in_order_with_only_break_spaces_removed(seed):
    # Regression: a small kana after a Latin word used to drop the space before it
    # ("BEST SELLER ぁ佐儉" -> "SELLERぁ佐儉"), so a line was no longer in the source.
    rng = random.Random(seed)
    pieces = ["BEST", "SELLER", "Web", "ぁ", "っ", "佐", "儉", "，", "。", "」", "（", "新品", " ", " ", "ー"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(5, 40))).strip()
    lines = break_lines(text, lambda i: rng.randint(3, 10), measure_chars)
    pos = 0
    for line in lines:
        found = text.find(line, pos)
        assert found >= 0, (text, lines, line)
        assert text[pos:found].strip() == "", (text, lines)  # only spaces between lines
        pos = found + len(line)
    assert text[pos:].strip() == ""
