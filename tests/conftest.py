"""Shared fixtures: fonts, a renderer, tiny job configs, the composed training config of a
debug run (`compose_debug`). Everything offline and on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data_pipelines.text.fonts import FontRegistry
from data_pipelines.jobs.synthetic import FontsConfig, OcrConfig, SyntheticJob, TextConfig, build_renderer
from data_pipelines.sources.render import RenderConfig
from qwenimg_train.config import config_dir  # the one place the tests learn where configs/ is

TOOLS_CONFIG_DIR = Path(config_dir()) / "tools"
"""The roots of the tool commands (qwenimg-eval, -export, -plan, -report, -sample, -sweep-report):
configs/tools/<command>.yaml, composed by config name = the file's stem."""
STAGES = ("no_text", "simple_text", "complex_layout")
"""The stages of the default curriculum (configs/curriculum/three_stage.yaml), in order."""


def compose_train(overrides=(), *, hydra_cfg: bool = False):
    """configs/train.yaml composed with `overrides`, as `qwenimg-train` composes it."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def compose_tool(name: str, overrides=()):
    """configs/tools/<name>.yaml composed with `overrides`, as the tool's command composes it."""
    with initialize_config_dir(config_dir=str(TOOLS_CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def debug_overrides(sources: dict[str, str], *overrides: str, out: Path | None = None,
                    models: Path | None = None) -> list[str]:
    """The command line of a `debug=default` run (configs/debug/default.yaml) on the
    `shard_sources` shards, writing to `out` (paths.output_dir) and building the tiny model
    under `models` (paths.models_dir); `overrides` come last and win. Subprocess tests pass
    it to the console script as it is."""
    return [
        "debug=default",
        *([f"paths.output_dir={out}"] if out is not None else []),
        *([f"paths.models_dir={models}"] if models is not None else []),
        # 32 px stages; the fixture's 16 edit pairs hold no single-line reconstruction, so
        # stage 2 also admits complex layouts.
        *[f"curriculum.stages.{s}.resolution=32" for s in STAGES],
        "curriculum.stages.simple_text.text_classes=[simple,complex]",
        *[f"data.sources.{k}={v}" for k, v in sources.items()],
        *overrides,
    ]


def compose_debug(sources: dict[str, str], *overrides: str, out: Path | None = None, models: Path | None = None):
    """The composed config of `debug_overrides(...)`: what `train()` takes in-process."""
    return compose_train(debug_overrides(sources, *overrides, out=out, models=models))


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
def glyph_vae(tmp_path_factory) -> Path:
    """The fitted glyph VAE (qwenimg_train.models.qwen_image.glyph_vae), fitted once per session
    (about 3 min on 2 cores): tests/test_glyph_vae.py checks it, tests/test_learns_to_write.py
    builds the glyph world on it."""
    from qwenimg_train.models.qwen_image.glyph_vae import GlyphVaeSpec, ensure_glyph_vae

    return ensure_glyph_vae(tmp_path_factory.mktemp("glyph-vae") / "glyph-vae", GlyphVaeSpec(), seed=0)


@pytest.fixture(scope="session")
def shard_sources(tmp_path_factory) -> dict[str, str]:
    """Small synthetic, design and edit-pair shard folders (every text class, every task)."""
    from data_pipelines.jobs.edit_pairs import EditPairsJob
    from data_pipelines.jobs.edit_pairs import run as run_edit
    from data_pipelines.jobs.design import DesignJob, run_design
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


# --- the bad-input record (tests/test_bad_input.py) ------------------------------------------
# Each reader given hostile input records how many bad inputs it was handed, what it skipped
# and counted, and how many good samples came through; printed at the end of the run.
BAD_INPUT_RECORD: dict[str, dict] = {}


def pytest_terminal_summary(terminalreporter):
    if BAD_INPUT_RECORD:
        terminalreporter.section("bad input: skipped, counted, and the good samples kept")
        for reader, r in BAD_INPUT_RECORD.items():
            terminalreporter.write_line(f"{reader}: {r['bad_inputs_tried']} bad inputs, skipped {r['skipped_counted']}; "
                                        f"good samples {r['good_out']}/{r['good_in']} kept")
    if not FAULT_RECORD:
        return
    terminalreporter.section("fault injection: faults injected and survived")
    for r in FAULT_RECORD:
        terminalreporter.write_line(f"{r['fault']}: {r['checked']} (lost: {r['lost']})")
    terminalreporter.write_line(f"{len(FAULT_RECORD)} faults injected and survived; "
                                f"{sum(r['lost'] for r in FAULT_RECORD)} samples or checkpoints lost")
