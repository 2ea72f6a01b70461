import json

import pytest

from data_pipelines.text import charsets
from data_pipelines.core.schema import (
    SIMPLE_MAX_CHARS,
    LineMeta,
    SampleMeta,
    TextClass,
    classify_text,
    count_chars,
    script_languages,
)

BOX = [[10, 10], [100, 10], [100, 40], [10, 40]]


def line(text, language="zh-Hans", direction="horizontal"):
    return LineMeta(text=text, language=language, polygon=BOX, direction=direction)


def test_no_lines_is_none():
    assert classify_text([]) is TextClass.NONE
    assert classify_text([line("   ")]) is TextClass.NONE


def test_one_short_horizontal_line_is_simple():
    assert classify_text([line("春节快乐")]) is TextClass.SIMPLE
    assert classify_text([line("Grand Opening Sale", "en")]) is TextClass.SIMPLE  # 16 non-space chars
    assert classify_text([line("字" * SIMPLE_MAX_CHARS)]) is TextClass.SIMPLE


@pytest.mark.parametrize(
    "lines",
    [
        [line("春节快乐"), line("新年好")],  # two lines
        [line("字" * (SIMPLE_MAX_CHARS + 1))],  # too long
        [line("春节快乐", direction="vertical")],  # vertical
        [line("新品 NEW", "en+zh-Hans")],  # mixed languages
    ],
)
def test_complex_cases(lines):
    assert classify_text(lines) is TextClass.COMPLEX


def test_count_chars_ignores_whitespace():
    assert count_chars("a b\tc\n") == 3
    assert count_chars("春 节") == 2


def test_script_languages():
    assert script_languages("春节快乐") == ["zh-Hans"]
    assert script_languages("東京タワー") == ["ja"]
    assert script_languages("안녕 Hello") == ["en", "ko"]
    assert script_languages("2026 !") == []


def test_meta_json_round_trip_and_validation():
    meta = SampleMeta(
        key="synthetic_000001_000002", source="synthetic", width=512, height=512,
        text_class="simple", languages=["zh-Hans"], lines=[line("春节快乐")],
    )
    meta.validate()
    again = SampleMeta.from_json(meta.to_json())
    assert again == meta
    assert json.loads(meta.to_json())["lines"][0]["text"] == "春节快乐"


def test_meta_validation_names_the_problem():
    bad = SampleMeta(key="a.b", source="synthetic", width=64, height=64, text_class="none", languages=[])
    with pytest.raises(ValueError, match="key"):
        bad.validate()
    wrong_class = SampleMeta(key="k", source="synthetic", width=512, height=512, text_class="complex",
                             languages=["zh-Hans"], lines=[line("春节")])
    with pytest.raises(ValueError, match="text_class"):
        wrong_class.validate()
    outside = SampleMeta(key="k", source="synthetic", width=50, height=50, text_class="simple",
                         languages=["zh-Hans"], lines=[line("春节")])
    with pytest.raises(ValueError, match="outside"):
        outside.validate()


def test_codec_charsets_have_the_standard_sizes():
    assert len(charsets.gb2312_level1()) == 3755
    assert len(charsets.gb2312_level2()) == 3008
    assert len(charsets.big5_level1()) == 5401
    assert len(charsets.hiragana()) == 83
    assert len(charsets.katakana()) == 86
    assert len(charsets.jis_level1_kanji()) == 2965
    assert len(charsets.jis_level2_kanji()) == 3390
    assert len(charsets.ksx1001_hangul()) == 2350
    assert charsets.gb2312_level("的") == 1 and charsets.gb2312_level("亍") == 2 and charsets.gb2312_level("A") is None
