"""The configuration: where the Hydra tree lives (`config_dir`) and the typed records it
becomes (`schema.py`: `TrainConfig` and its sections, `load_run_config` for a saved run)."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> str:
    """configs/ of this checkout (the package is installed editable), or $QWENIMG_CONFIG_DIR.

    Whoever composes the training config asks here first, so this is also where the
    stage defaults are registered (`register_stage_defaults`)."""
    register_stage_defaults()
    root = os.environ.get("QWENIMG_CONFIG_DIR")
    return str(Path(root) if root else Path(__file__).resolve().parents[2] / "configs")


def register_stage_defaults() -> None:
    """`curriculum/stage/stage_defaults`: the `Stage` dataclass's defaults as a config node,
    which every stage file lists first in its defaults. A stage file then holds only what
    differs, and every field still exists in the composed config, so
    `curriculum.stages.no_text.resolution=256` overrides it (and a partial mapping such as
    `curriculum.stages.no_text.source_weights.design=0.8` merges into the defaults)."""
    from hydra.core.config_store import ConfigStore

    from data_pipelines.core.config import dataclass_defaults
    from qwenimg_train.data.curriculum import Stage

    ConfigStore.instance().store(group="curriculum/stage", name="stage_defaults", node=dataclass_defaults(Stage))


def tools_config_dir() -> str:
    """configs/tools/: the roots of the tool commands (eval, export, plan, report, sample, sweep report)."""
    return str(Path(config_dir()) / "tools")
