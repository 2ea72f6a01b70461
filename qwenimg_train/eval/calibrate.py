"""Which suite characters the OCR judge cannot read even on a clean render.

    python -m qwenimg_train.eval.calibrate   # prints the value of suites.JUDGE_UNREADABLE

Run it after changing the suites' seed, the fonts or the OCR model; the suites skip
those characters, so a generated image is never scored against a reading the judge
cannot make.
"""

from __future__ import annotations

from typing import Sequence

from data_pipelines.core.ocr import OcrEngine
from qwenimg_train.eval.metrics import score_image
from qwenimg_train.eval.suites import CHARS_PER_LEVEL, SEED, Record, candidate_characters, reference_image


def calibrate_characters(level: int, count: int = CHARS_PER_LEVEL, seed: int = SEED,
                         sizes: Sequence[int] = (256, 512)) -> tuple[list[str], int]:
    """The candidates (in suite order) that the judge misreads on a clean reference render
    at any of `sizes`, checked until `count` readable ones are found; and how many were checked.

    Their union over both levels is `JUDGE_UNREADABLE`.
    """

    ocr = OcrEngine()
    unreadable, readable, checked = [], 0, 0
    for ch in candidate_characters(level, seed):
        if readable == count:
            break
        checked += 1
        # The id the suite will give it: the reference render's face depends on it.
        suite = f"zh_char_l{level}"
        record = Record(id=f"{suite}_{readable:03d}", suite=suite, language="zh-Hans", prompt="", text=ch,
                        lines=[ch], level=level)
        if all(score_image(ocr, reference_image(record, (s, s)), record)["exact"] == 1.0 for s in sizes):
            readable += 1
        else:
            unreadable.append(ch)
    return unreadable, checked


def main() -> None:
    found = ""
    for level in (1, 2):
        unreadable, checked = calibrate_characters(level)
        print(f"level {level}: {len(unreadable)} of {checked} candidates misread: {''.join(unreadable)}")
        found += "".join(unreadable)
    print(f'JUDGE_UNREADABLE = "{found}"')


if __name__ == "__main__":
    main()
