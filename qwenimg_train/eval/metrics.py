"""Scoring generated images for text rendering: OCR read-back against the quoted text.

A generated image has no layout metadata, so it is read with rapidocr in `full` mode
(detection + recognition over the whole image, `data_pipelines.core.ocr.OcrEngine`; an
image smaller than `MIN_READ_SIDE` upscaled first), the
detections put in reading order (`reading_order`), and the result compared to the
record's expected text (`qwenimg_train.eval.suites.Record`). All comparisons are on
`data_pipelines.core.ocr.normalize`d strings (NFKC, case folded, whitespace and
punctuation removed), the rule data verification uses.

Per image (`score_text`, `score_image`):

    char_accuracy  1 - Lev(read, truth) / len(truth), floored at 0: order-aware; missing,
                   wrong and extra characters all cost (extra text the OCR finds too)
    ned_score      1 - Lev(read, truth) / max(len(read), len(truth)): 1 - NED (CVTG-2K)
    word_accuracy  matched words over the truth's words (multiset; CVTG-2K's word
                   accuracy, LongText-Bench's matched-words-over-reference). English: words
                   split at spaces and punctuation, a truth word unmatched as a token may
                   still match inside a read token (the recogniser sometimes drops a
                   space). Chinese has no spaces to split at: every character is a word,
                   so this is LongText-Bench's matched characters over reference
    exact          the whole normalised read equals the truth (for one character: ChineseWord)
    old_gone       edits: the source string no longer appears in the read
    new_present    edits: the new string appears in the read
    edit_success   edits: both

Aggregates (`aggregate`): the mean and standard error of each metric per suite, per
GB 2312 level, per language, and overall (the macro mean over suites).
`write_report` writes them as JSON and a Markdown table.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from data_pipelines.core.ocr import OcrEngine, char_accuracy, ned, normalize
from qwenimg_train.eval.suites import SUITES, Record

Detection = tuple[list[list[float]], str, float]  # (4 corner points, text, confidence)

METRICS = ("char_accuracy", "ned_score", "word_accuracy", "exact")
EDIT_METRICS = ("old_gone", "new_present", "edit_success")
_SPACED_LANGUAGES = ("en",)  # languages whose words are separated by spaces
# rapidocr's detector finds nothing in a small image (a 64x64 glyph-world canvas reads
# as empty), so `read_image` first upscales an image whose shorter side is below this
# (bicubic, aspect kept) to this shorter side. Measured: each of the 24 glyph-world
# characters (data_pipelines.sources.glyphs), drawn at 64 px alone and in two lines,
# reads correctly at 256 px.
MIN_READ_SIDE = 256


# --- reading ---------------------------------------------------------------------------


def _extent(box: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in box]
    ys = [p[1] for p in box]
    return min(xs), min(ys), max(xs), max(ys)


def reading_order(detections: Sequence[Detection], direction: str = "horizontal") -> list[str]:
    """Detected texts grouped into lines (or columns) in reading order, one string each.

    Horizontal: a box joins a line when its vertical centre lies within the line's
    extent (half-height overlap); lines top to bottom, boxes left to right within a
    line, joined by a space. Vertical: the same with axes swapped; columns right to
    left, boxes top to bottom within a column.
    """
    vertical = direction == "vertical"
    items = []
    for box, text, _ in detections:
        x0, y0, x1, y1 = _extent(box)
        # (across: the coordinate lines are stacked along; along: reading direction within a line)
        if vertical:
            items.append(((x0 + x1) / 2, (x1 - x0) / 2, (y0 + y1) / 2, text))
        else:
            items.append(((y0 + y1) / 2, (y1 - y0) / 2, (x0 + x1) / 2, text))
    # Columns go right to left: sort by -x.
    items.sort(key=lambda it: -it[0] if vertical else it[0])
    groups: list[list[tuple[float, float, float, str]]] = []
    for item in items:
        if groups:
            centre = sum(i[0] for i in groups[-1]) / len(groups[-1])
            half = max(max(i[1] for i in groups[-1]), item[1])
            if abs(item[0] - centre) <= half:
                groups[-1].append(item)
                continue
        groups.append([item])
    return [" ".join(i[3] for i in sorted(group, key=lambda i: i[2])) for group in groups]


def detect(ocr: OcrEngine, image: Image.Image) -> list[Detection]:
    """Detection + recognition over the whole image, without the angle classifier.

    The classifier (which flips crops it takes for upside-down text) turns single
    characters over: measured on clean renders, it made the recogniser misread 2 of 50
    GB 2312 level-1 characters that it reads correctly without it. Generated images
    are upright, so it is off. Every flag is passed on every call because rapidocr
    keeps the last call's flags; `text_score` is its default (0.5): readings below it
    are dropped.
    """
    import numpy as np

    out = ocr.engine(np.asarray(image.convert("RGB")), use_det=True, use_cls=False, use_rec=True, text_score=0.5)
    if out.boxes is None:
        return []
    return [(box.tolist(), txt, float(score)) for box, txt, score in zip(out.boxes, out.txts, out.scores)]


def upscale_for_reading(image: Image.Image, min_side: int = MIN_READ_SIDE) -> Image.Image:
    """`image` resized (bicubic, aspect kept) so that its shorter side is `min_side`, when
    it is shorter; otherwise `image` itself."""
    w, h = image.size
    short = min(w, h)
    if short >= min_side or short == 0:
        return image
    scale = min_side / short
    size = (min_side, max(min_side, round(h * scale))) if w == short else (max(min_side, round(w * scale)), min_side)
    return image.resize(size, Image.Resampling.BICUBIC)


def read_image(ocr: OcrEngine, image: Image.Image, direction: str = "horizontal") -> list[str]:
    """The text rapidocr finds in `image` (full mode), as lines in reading order; an image
    whose shorter side is below `MIN_READ_SIDE` is upscaled to it first."""
    return reading_order(detect(ocr, upscale_for_reading(image)), direction)


# --- metrics ---------------------------------------------------------------------------


def words(text: str, language: str) -> list[str]:
    """The units word accuracy counts: normalised words (spaced languages) or characters."""
    if language in _SPACED_LANGUAGES:
        return [w for w in (normalize(t) for t in re.split(r"\s+", text)) if w]
    return list(normalize(text))


def word_accuracy(read: str, truth: str, language: str) -> float:
    """Matched words over the truth's words (multiset; module docstring)."""
    want = words(truth, language)
    if not want:
        return 1.0
    have = Counter(words(read, language))
    missing = []
    for w in want:
        if have[w] > 0:
            have[w] -= 1
        else:
            missing.append(w)
    if missing and language in _SPACED_LANGUAGES:
        # A dropped space merges words ("HELLOWORLD"): look for each one inside the
        # unmatched read tokens, consuming what it matches.
        rest = [w for w, n in have.items() for _ in range(n)]
        for w in list(missing):
            for k, token in enumerate(rest):
                if w in token:
                    rest[k] = token.replace(w, "\x00", 1)
                    missing.remove(w)
                    break
    return 1.0 - len(missing) / len(want)


# Dash-like marks the recogniser reads for 一 (U+4E00), whose glyph is the same stroke.
_DASHES = re.compile("[-\u2010-\u2015\u2212\u30fc\uff0d]")


def score_text(read_lines: Sequence[str], record: Record) -> dict[str, Any]:
    """Every metric of one record from what OCR read (lines in reading order)."""
    read = "\n".join(read_lines)
    if record.language.startswith("zh"):
        # In Chinese text a lone horizontal stroke is 一; the recogniser often returns
        # a hyphen or a dash for it (which normalisation would then drop as punctuation).
        read = _DASHES.sub("一", read)
    truth = record.text
    scores: dict[str, Any] = {
        "id": record.id,
        "suite": record.suite,
        "language": record.language,
        "level": record.level,
        "text": truth,
        "read": read,
        "char_accuracy": round(char_accuracy(read, truth), 4),
        "ned_score": round(1.0 - ned(read, truth), 4),
        "word_accuracy": round(word_accuracy(read, truth, record.language), 4),
        "exact": float(normalize(read) == normalize(truth)),
    }
    if record.is_edit:
        norm_read = normalize(read)
        old_gone = normalize(record.source_text) not in norm_read
        new_present = normalize(record.target_text) in norm_read
        scores.update(old_gone=float(old_gone), new_present=float(new_present),
                      edit_success=float(old_gone and new_present))
    return scores


def score_image(ocr: OcrEngine, image: Image.Image, record: Record) -> dict[str, Any]:
    """OCR `image` (full mode) and score it against `record` (see `score_text`)."""
    return score_text(read_image(ocr, image, record.direction), record)


# --- aggregation -----------------------------------------------------------------------


def _summary(rows: Sequence[dict[str, Any]], metrics: Iterable[str]) -> dict[str, Any]:
    """n, and per metric the mean and its standard error (sample SD / sqrt(n))."""
    out: dict[str, Any] = {"n": len(rows)}
    for m in metrics:
        values = [r[m] for r in rows if r.get(m) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[m] = round(mean, 4)
        out[f"{m}_se"] = round(math.sqrt(var / len(values)), 4)
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per suite, per GB 2312 level, per language, and overall (macro mean over suites)."""
    by_suite: dict[str, list] = defaultdict(list)
    by_level: dict[str, list] = defaultdict(list)
    by_language: dict[str, list] = defaultdict(list)
    for r in results:
        by_suite[r["suite"]].append(r)
        by_language[r["language"]].append(r)
        if r.get("level") is not None:
            by_level[f"gb2312_level{r['level']}"].append(r)
    all_metrics = METRICS + EDIT_METRICS
    suites = {name: _summary(rows, all_metrics) for name, rows in sorted(by_suite.items(), key=lambda kv: _suite_rank(kv[0]))}
    overall: dict[str, Any] = {"n": len(results), "suites": len(suites)}
    for m in all_metrics:
        means = [s[m] for s in suites.values() if m in s]
        if means:
            overall[m] = round(sum(means) / len(means), 4)
    return {
        "overall": overall,
        "suites": suites,
        "levels": {k: _summary(v, METRICS) for k, v in sorted(by_level.items())},
        "languages": {k: _summary(v, all_metrics) for k, v in sorted(by_language.items())},
    }


def _suite_rank(name: str) -> tuple[int, str]:
    order = list(SUITES)
    return (order.index(name) if name in order else len(order), name)


def flat_metrics(aggregates: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Slash-namespaced scalars for a logger: `eval/char_accuracy` (overall),
    `eval/char_accuracy/<suite>`, `eval/char_accuracy/gb2312_level1`, `eval/char_accuracy/en`..."""
    out = {}
    for m, v in aggregates["overall"].items():
        if m in METRICS + EDIT_METRICS:
            out[f"{prefix}/{m}"] = float(v)
    for section in ("suites", "levels", "languages"):
        for name, summary in aggregates[section].items():
            for m in METRICS + EDIT_METRICS:
                if m in summary:
                    out[f"{prefix}/{m}/{name}"] = float(summary[m])
    return out


# --- report ----------------------------------------------------------------------------


def _cell(summary: dict[str, Any], metric: str) -> str:
    if metric not in summary:
        return "–"
    return f"{summary[metric]:.3f} ± {summary[metric + '_se']:.3f}"


def markdown_table(aggregates: dict[str, Any]) -> str:
    """The aggregates as Markdown: one table per section, mean ± standard error."""
    lines = []
    header = ["", "n", *METRICS, *EDIT_METRICS]
    for section, title in (("suites", "Suites"), ("levels", "GB 2312 levels"), ("languages", "Languages")):
        rows = aggregates[section]
        if not rows:
            continue
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, s in rows.items():
            lines.append("| " + " | ".join([f"`{name}`", str(s["n"]), *(_cell(s, m) for m in METRICS + EDIT_METRICS)]) + " |")
        lines.append("")
    overall = aggregates["overall"]
    cells = [f"{m} {overall[m]:.3f}" for m in METRICS + EDIT_METRICS if m in overall]
    lines.insert(0, f"**Overall** (macro mean over {overall['suites']} suites, {overall['n']} prompts): " + ", ".join(cells) + "\n")
    return "\n".join(lines)


def write_report(results: Sequence[dict[str, Any]], out_json: str | Path, out_md: str | Path, *,
                 config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the per-prompt results and their aggregates as JSON and a Markdown table.

    Returns the JSON document: {config, aggregates, results, **extra}.
    """
    aggregates = aggregate(results)
    doc = {"config": config or {}, "aggregates": aggregates, "results": list(results), **(extra or {})}
    out_json, out_md = Path(out_json), Path(out_md)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    title = "# Text-rendering evaluation (OCR)\n\n"
    if config and config.get("checkpoint"):
        title += f"Checkpoint `{config['checkpoint']}`; "
    if config:
        keys = ("resolution", "steps", "guidance", "seed", "limit")
        title += ", ".join(f"{k} {config[k]}" for k in keys if k in config) + ".\n\n"
    legend = ("Mean ± standard error over the suite's prompts. char_accuracy = 1 − Lev/len(truth); ned_score = 1 − "
              "NED; word_accuracy = matched words (Chinese: characters) over the truth's; exact = whole string; edits: "
              "old_gone, new_present, edit_success. See docs/evaluation.md.\n\n")
    out_md.write_text(title + legend + markdown_table(aggregates) + "\n", encoding="utf-8")
    return doc
