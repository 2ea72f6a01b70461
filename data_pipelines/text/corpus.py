"""Where the rendered strings come from.

Per language, a weighted pool of sources:
- `phrases`: the word/phrase lists written for this project (`wordlists/`);
- `chars`: random characters from the codec-derived sets (`data_pipelines.text.charsets`),
  which reach the rare glyphs that phrase lists never show (GB 2312 level 2 above all);
- user corpora: text files, one item a line, each with a language and a weight.

Paragraphs join items with the language's punctuation. A "mixed" string pairs a CJK
item with an English one, the way posters do ("新品上市 NEW ARRIVAL").
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Sequence

from data_pipelines.text import charsets
from data_pipelines.core.schema import LANGUAGES, join_languages

log = logging.getLogger(__name__)

MIXED = "mixed"
CJK_LANGUAGES = ("zh-Hans", "zh-Hant", "ja", "ko")
# Common characters of each language: when no font covers any of them, the job's fonts
# cannot render the language at all, and the config is refused before a sample is made.
COVERAGE_PROBES = {
    "zh-Hans": "的一是在不了有和人这中大为上个国我以要他",
    "zh-Hant": "的一是在不了有和人這中大為上個國我以要他",
    "ja": "あいうえおかきくけこアイウエオ日本語",
    "ko": "가나다라마바사아자차카타파하한국어",
    "en": "AaBbCcEeNnTt",
}
VERTICAL_LANGUAGES = ("zh-Hans", "zh-Hant", "ja")  # vertical typesetting is a CJK (mostly zh/ja) practice

_WORDLIST_FILES = {"zh-Hans": "zh_hans.txt", "zh-Hant": "zh_hant.txt", "en": "en.txt", "ja": "ja.txt", "ko": "ko.txt"}

# Punctuation by language: (between items in a sentence, sentence ends).
_PUNCT = {
    "zh-Hans": ("，", ("。", "！", "？", "；")),
    "zh-Hant": ("，", ("。", "！", "？")),
    "ja": ("、", ("。", "！", "？")),
    "ko": (", ", (". ", "! ", "? ")),
    "en": (", ", (". ", "! ", "? ")),
}
_JOIN_WORDS = {"en": " ", "ko": " "}  # languages that separate words by spaces


@functools.cache
def builtin_phrases(language: str) -> tuple[str, ...]:
    name = _WORDLIST_FILES[language]
    text = resources.files("data_pipelines.text").joinpath("wordlists", name).read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _random_chars_fn(
    language: str, level2_fraction: float, covered: Callable[[str], bool]
) -> Callable[[random.Random, int], str]:
    """A function drawing `n` random characters of the language's standard sets.

    The sets are screened once against the fonts (`covered`), so every draw is
    renderable without a per-string check.
    """

    def screened(chars: str) -> str:
        kept = "".join(ch for ch in chars if covered(ch))
        return kept or chars  # nothing covered: the renderer's font choice reports it

    if language == "zh-Hans":
        l1, l2 = screened(charsets.gb2312_level1()), screened(charsets.gb2312_level2())
        return lambda rng, n: "".join(rng.choice(l2 if rng.random() < level2_fraction else l1) for _ in range(n))
    if language == "zh-Hant":
        pool = screened(charsets.big5_level1())
        return lambda rng, n: "".join(rng.choice(pool) for _ in range(n))
    if language == "ko":
        pool = screened(charsets.ksx1001_hangul())
        return lambda rng, n: "".join(rng.choice(pool) for _ in range(n))
    if language == "ja":
        kana = screened(charsets.hiragana() + charsets.katakana())
        kanji1, kanji2 = screened(charsets.jis_level1_kanji()), screened(charsets.jis_level2_kanji())

        def ja(rng: random.Random, n: int) -> str:
            out = []
            for _ in range(n):
                r = rng.random()
                out.append(rng.choice(kana if r < 0.4 else kanji2 if r < 0.4 + 0.6 * level2_fraction else kanji1))
            return "".join(out)

        return ja
    if language == "en":
        letters = charsets.LATIN_LETTERS
        digits = charsets.DIGITS

        def en(rng: random.Random, n: int) -> str:
            # Pseudo-words and codes: what a sign shows when it is not a word (SKUs,
            # model numbers, room codes), so the model learns letters, not a lexicon.
            if rng.random() < 0.5:
                word = "".join(rng.choice(letters) for _ in range(max(2, n)))
                return word.capitalize() if rng.random() < 0.5 else word.upper()
            return "".join(rng.choice(letters.upper() + digits) for _ in range(max(2, n)))

        return en
    raise ValueError(f"no character set for language {language!r}")


@dataclass(frozen=True)
class Corpus:
    """A user corpus: a UTF-8 text file, one item a line."""

    path: str
    language: str
    weight: float = 1.0


class TextSampler:
    """Draws languages and strings; every string returned is covered by some font."""

    def __init__(
        self,
        *,
        language_weights: Mapping[str, float],
        phrase_weight: float,
        random_chars_weight: float,
        level2_fraction: float,
        corpora: Sequence[Corpus] = (),
        covered: Callable[[str], bool] | None = None,
    ):
        for lang, weight in language_weights.items():
            if lang != MIXED and lang not in LANGUAGES:
                raise ValueError(f"text.language_weights: unknown language {lang!r}; use one of {LANGUAGES} or {MIXED!r}")
            if weight < 0:
                raise ValueError(f"text.language_weights.{lang} = {weight} is negative")
        if sum(language_weights.values()) <= 0:
            raise ValueError("text.language_weights must have a positive sum")
        if phrase_weight < 0 or random_chars_weight < 0:
            raise ValueError("text.phrase_weight and text.random_chars_weight must be >= 0")
        if not 0 <= level2_fraction <= 1:
            raise ValueError(f"text.level2_fraction = {level2_fraction} must lie in [0, 1]")
        self.language_names = [lang for lang, w in language_weights.items() if w > 0]
        self.language_probs = [language_weights[lang] for lang in self.language_names]
        self.covered = covered or (lambda s: True)
        self.stats = {"corpus_items": 0, "corpus_items_dropped_uncovered": 0}

        # Per language: parallel lists of (source name, weight, draw function).
        self.sources: dict[str, list[tuple[str, float, Callable[[random.Random, int], str]]]] = {}
        for lang in LANGUAGES:
            pool: list[tuple[str, float, Callable[[random.Random, int], str]]] = []
            if phrase_weight > 0:
                phrases = [p for p in builtin_phrases(lang) if self.covered(p)]
                if phrases:
                    pool.append(("phrases", phrase_weight, lambda rng, n, items=tuple(phrases): rng.choice(items)))
            if random_chars_weight > 0:
                pool.append(("chars", random_chars_weight, _random_chars_fn(lang, level2_fraction, self.covered)))
            self.sources[lang] = pool
        for corpus in corpora:
            if corpus.language not in LANGUAGES:
                raise ValueError(f"text.corpora: {corpus.path} has unknown language {corpus.language!r}; use one of {LANGUAGES}")
            if corpus.weight <= 0:
                continue
            items = self._load_corpus(corpus)
            self.sources[corpus.language].append(
                (f"corpus:{Path(corpus.path).name}", corpus.weight, lambda rng, n, items=items: rng.choice(items))
            )
        needed = set(self.language_names) - {MIXED}
        if MIXED in self.language_names:
            needed |= {"en"}
        if covered is not None:
            for lang in sorted(needed):
                if not any(covered(ch) for ch in COVERAGE_PROBES[lang]):
                    key = lang if lang in language_weights else MIXED
                    raise ValueError(
                        f"text.language_weights.{key} = {language_weights[key]}: no font in this job's font set covers "
                        f"{lang} text (e.g. {COVERAGE_PROBES[lang][:6]!r}); install one fontconfig finds "
                        f"(fonts-noto-cjk covers zh/ja/ko), add its folder to fonts.dirs, loosen fonts.include / "
                        f"fonts.exclude, or set text.language_weights.{key}=0"
                    )
        for lang in needed:
            if not self.sources.get(lang):
                raise ValueError(
                    f"language {lang!r} has weight > 0 but no text source: set text.phrase_weight or "
                    f"text.random_chars_weight > 0, or add a corpus for it"
                )

    def _load_corpus(self, corpus: Corpus) -> tuple[str, ...]:
        path = Path(corpus.path).expanduser()
        if not path.is_file():
            raise ValueError(f"text.corpora: {str(path)!r} does not exist")
        lines = [line.strip() for line in path.read_text("utf-8", errors="replace").splitlines()]
        lines = [line for line in lines if line]
        kept = tuple(line for line in lines if self.covered(line))
        dropped = len(lines) - len(kept)
        self.stats["corpus_items"] += len(kept)
        self.stats["corpus_items_dropped_uncovered"] += dropped
        if dropped:
            log.warning("%s: %d of %d lines use characters no font covers; they are not used", path, dropped, len(lines))
        if not kept:
            raise ValueError(f"text.corpora: {str(path)!r} has no usable line (empty, or no font covers it)")
        return kept

    # --- drawing ---------------------------------------------------------------

    def language(self, rng: random.Random, allowed: Sequence[str] | None = None) -> str:
        """A language tag (or 'mixed'), optionally restricted to `allowed`."""
        names, probs = self.language_names, self.language_probs
        if allowed is not None:
            pairs = [(n, p) for n, p in zip(names, probs) if n in allowed]
            if not pairs:
                pairs = [(n, 1.0) for n in allowed if n in self.sources and self.sources[n]]
            if not pairs:
                raise ValueError(f"no configured language among {list(allowed)}")
            names, probs = [p[0] for p in pairs], [p[1] for p in pairs]
        return rng.choices(names, probs)[0]

    def item(self, rng: random.Random, language: str, n_chars: int = 4) -> str:
        """One word/phrase-sized item of `language` (a single-language tag)."""
        pool = self.sources[language]
        _, _, draw = rng.choices(pool, [w for _, w, _ in pool])[0]
        # Every source was screened against the fonts when it was built.
        for _ in range(8):
            text = draw(rng, n_chars).strip()
            if text:
                return text
        raise ValueError(f"{language!r}: the text sources give only empty strings; check corpora")

    def short(self, rng: random.Random, language: str, max_chars: int = 12) -> tuple[str, str]:
        """A title/label-sized string and its language tag."""
        if language == MIXED:
            return self.mixed(rng)
        for _ in range(8):
            text = self.item(rng, language, rng.randint(2, min(8, max_chars)))
            if len(text) <= max_chars:
                return text, language
        return text[:max_chars].strip(), language

    def mixed(self, rng: random.Random, cjk_language: str | None = None) -> tuple[str, str]:
        """A CJK item and an English one on one line."""
        cjk = [lang for lang in CJK_LANGUAGES if self.sources.get(lang)]
        if not cjk:
            raise ValueError("mixed lines need a CJK language with a text source")
        other = cjk_language or rng.choice(cjk)
        a = self.item(rng, other, rng.randint(2, 5))
        b = self.item(rng, "en", rng.randint(2, 6))
        if rng.random() < 0.3:
            b = b.upper()
        text = f"{a} {b}" if rng.random() < 0.6 else f"{b} {a}"
        return text, join_languages([other, "en"])

    def paragraph(self, rng: random.Random, language: str, target_chars: int) -> tuple[str, str]:
        """Sentence-like text of about `target_chars` characters."""
        if language == MIXED:
            parts, langs = [], set()
            cjk = rng.choice([lang for lang in CJK_LANGUAGES if self.sources.get(lang)])
            while sum(len(p) for p in parts) < target_chars:
                text, tag = self.mixed(rng, cjk)
                parts.append(text)
                langs.update(tag.split("+"))
            return " ".join(parts), join_languages(langs)
        between, enders = _PUNCT[language]
        word_sep = _JOIN_WORDS.get(language, "")
        out: list[str] = []
        length = 0
        clause = 0
        while length < target_chars:
            piece = self.item(rng, language, rng.randint(2, 6))
            out.append(piece)
            length += len(piece)
            clause += 1
            if length >= target_chars:
                break
            if clause >= rng.randint(2, 4):
                out.append(rng.choice(enders))
                clause = 0
            elif rng.random() < 0.5:
                out.append(between)
            else:
                out.append(word_sep)
        out.append(enders[0])
        text = "".join(out).strip()
        if language in _JOIN_WORDS:
            # "word, word. Word": collapse doubled spaces and capitalise sentence starts.
            text = " ".join(text.split())
        return text, language
