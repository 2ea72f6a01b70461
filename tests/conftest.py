"""Shared fixtures: fonts, a renderer, tiny job configs. Everything offline and on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines.text.fonts import FontRegistry
from data_pipelines.jobs.synthetic import FontsConfig, OcrConfig, SyntheticJob, TextConfig, build_renderer
from data_pipelines.sources.render import RenderConfig


def make_font(path: Path, chars: str, family: str = "QwenimgTest") -> Path:
    """A tiny TrueType font whose cmap holds exactly `chars` (each glyph a filled box)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def box_glyph():
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0))
        pen.lineTo((100, 700))
        pen.lineTo((500, 700))
        pen.lineTo((500, 0))
        pen.closePath()
        return pen.glyph()

    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in chars})
    fb.setupGlyf({name: box_glyph() for name in names})
    fb.setupHorizontalMetrics({name: (600, 100) for name in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))
    return path


def small_job(out_dir: Path, **overrides) -> SyntheticJob:
    """A job small enough for a unit test (2 shards x 6 samples)."""
    kwargs = dict(out_dir=str(out_dir), seed=7, num_shards=2, samples_per_shard=6, workers=1, progress=False)
    kwargs.update(overrides)
    return SyntheticJob(**kwargs)


@pytest.fixture(scope="session")
def fonts() -> FontRegistry:
    return FontRegistry.discover()


@pytest.fixture(scope="session")
def renderer():
    return build_renderer(SyntheticJob(out_dir="unused", fonts=FontsConfig(), text=TextConfig(), render=RenderConfig(), ocr=OcrConfig()))


@pytest.fixture(scope="session")
def samples(renderer):
    """A fixed set of renders covering every format (seeded)."""
    return [renderer.render(seed, f"s_{seed:04d}") for seed in range(120)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen-Image-Edit folder (qwenimg_train.models.qwen_image.tiny), built once per
    session. QwenImagePipeline.from_pretrained loads it too (it ignores the processor);
    QwenImageEditPipeline needs `processor=qwenimg_train.models.qwen_image.tiny.load_processor(folder)`
    where torchvision is missing."""
    from qwenimg_train.models.qwen_image.tiny import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny") / "qwen-image-edit"
    return build_tiny_checkpoint(folder, pipeline_class="QwenImageEditPipeline")


@pytest.fixture(scope="session")
def shard_sources(tmp_path_factory) -> dict[str, str]:
    """Small synthetic, design and edit-pair shard folders (every text class, every task)."""
    from data_pipelines.jobs.edit_pairs import EditPairsJob
    from data_pipelines.jobs.edit_pairs import run as run_edit
    from data_pipelines.jobs.sources import DesignJob, run_design
    from data_pipelines.jobs.synthetic import run as run_synthetic

    root = tmp_path_factory.mktemp("shards")
    run_synthetic(SyntheticJob(out_dir=str(root / "synthetic"), num_shards=2, samples_per_shard=40, progress=False))
    run_design(DesignJob(out_dir=str(root / "design"), num_shards=2, samples_per_shard=20, progress=False))
    run_edit(EditPairsJob(out_dir=str(root / "edit"), num_shards=1, samples_per_shard=16, progress=False))
    return {name: str(root / name) for name in ("synthetic", "design", "edit")}


# --- the fault-injection record (tests/test_faults.py) -------------------------------------
# Each fault test records what it injected and what it checked; the list is printed at
# the end of the run, so a CI log shows which faults were survived and what was lost.
FAULT_RECORD: list[dict] = []


@pytest.fixture
def record_fault(request):
    def record(fault: str, checked: str, lost: int = 0) -> None:
        FAULT_RECORD.append({"test": request.node.name, "fault": fault, "checked": checked, "lost": lost})

    return record


def pytest_terminal_summary(terminalreporter):
    if not FAULT_RECORD:
        return
    terminalreporter.section("fault injection: faults injected and survived")
    for r in FAULT_RECORD:
        terminalreporter.write_line(f"{r['fault']}: {r['checked']} (lost: {r['lost']})")
    terminalreporter.write_line(f"{len(FAULT_RECORD)} faults injected and survived; "
                                f"{sum(r['lost'] for r in FAULT_RECORD)} samples or checkpoints lost")
