"""`qwenimg-data`: the data jobs, one Hydra app.

    qwenimg-data --config-name synthetic out_dir=... num_shards=... workers=...
    qwenimg-data --config-name design out_dir=...        [input.format=folder input.path=...]
    qwenimg-data --config-name natural out_dir=...       [input.format=... input.path=...]
    qwenimg-data --config-name edit-pairs out_dir=...
    qwenimg-data --config-name verify in_dir=... out_dir=...
    qwenimg-data --config-name preview shards=... out=...
    qwenimg-data --config-name precompute in_dir=... out_dir=... pretrained_path=...

Root configs live in configs/data_gen/ (one per job); each names its `job`. This
module is the configuration boundary: the config becomes a validated dataclass and
the job function gets only that.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from data_pipelines.core.app import console_script, plain_config
from data_pipelines.core.config import from_mapping

log = logging.getLogger("qwenimg-data")


def config_dir() -> str:
    """configs/data_gen of this checkout (the package is installed editable), or $QWENIMG_CONFIG_DIR."""
    root = os.environ.get("QWENIMG_CONFIG_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[1] / "configs"
    return str(base / "data_gen")


def _synthetic(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.synthetic import SyntheticJob, run

    return run(from_mapping(SyntheticJob, cfg), resolved_config=cfg)


def _preview(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.preview import PreviewJob, make_sheet

    out, skipped = make_sheet(from_mapping(PreviewJob, cfg))
    return {"preview": str(out), "skipped": skipped}


def _verify(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.verify import VerifyJob, run

    return run(from_mapping(VerifyJob, cfg))


def _design(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.design import DesignJob, run_design

    return run_design(from_mapping(DesignJob, cfg), resolved_config=cfg)


def _natural(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.natural import NaturalJob, run_natural

    return run_natural(from_mapping(NaturalJob, cfg), resolved_config=cfg)


def _edit_pairs(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.edit_pairs import EditPairsJob, run

    return run(from_mapping(EditPairsJob, cfg), resolved_config=cfg)


def _glyphs(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.glyphs import GlyphsJob, run

    return run(from_mapping(GlyphsJob, cfg), resolved_config=cfg)


def _precompute(cfg: dict[str, Any]) -> dict[str, Any]:
    from data_pipelines.jobs.precompute import PrecomputeJob, run

    return run(from_mapping(PrecomputeJob, cfg))


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "synthetic": _synthetic,
    "design": _design,
    "natural": _natural,
    "edit-pairs": _edit_pairs,
    "glyphs": _glyphs,
    "verify": _verify,
    "preview": _preview,
    "precompute": _precompute,
}


def run_job(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Dispatch a composed config to its job; the function tests call."""
    plain = plain_config(cfg)  # a `???` key left unset is named
    name = plain.pop("job", None)
    if name not in JOBS:
        raise ValueError(f"job = {name!r}; known jobs: {sorted(JOBS)} (pick one with --config-name)")
    return JOBS[name](plain)


def _show(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, ensure_ascii=False, indent=1))


# `--config-name <job>` picks the job; Hydra's job (and log file) name stays `cli`.
main = console_script(run_job, config_dir=config_dir, config_name="synthetic", show=_show, logger="qwenimg-data",
                      job_name="cli")


if __name__ == "__main__":
    main()
