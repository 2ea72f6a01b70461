"""Every `qwenimg-*` console script of the trainer, each made by the one helper
(`data_pipelines.core.app.console_script`): a Hydra root, a job, one call, the result.

    qwenimg-train          configs/train.yaml         qwenimg_train.training.train
    qwenimg-export         configs/tools/export.yaml  qwenimg_train.export.to_diffusers
    qwenimg-eval           configs/tools/eval.yaml    qwenimg_train.eval.runner
    qwenimg-sample         configs/tools/sample.yaml  qwenimg_train.tools.sample
    qwenimg-report         configs/tools/report.yaml  qwenimg_train.tools.report
    qwenimg-sweep-report   configs/tools/sweep_report.yaml  qwenimg_train.tools.sweep_report
    qwenimg-plan           configs/tools/plan.yaml    qwenimg_train.tools.plan

(`qwenimg-data` is the data package's, `data_pipelines.cli`.) The jobs are imported when
a command runs, so `--help` and a config error stay quick.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data_pipelines.core.app import console_script as _console_script
from data_pipelines.core.app import job
from data_pipelines.core.config import user_errors_exit
from qwenimg_train.config import config_dir, tools_config_dir


def console_script(run, **kwargs):
    """`data_pipelines.core.app.console_script`, checking first that diffusers, Lightning,
    DeepSpeed and transformers are versions this package was written against (compat.py)."""
    from qwenimg_train.compat import check_versions

    return _console_script(run, check=check_versions, **kwargs)


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=1, ensure_ascii=False))


def _show_train(result: Any) -> None:
    """The run summary, printed once: by global rank 0 (every rank returns it)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        _print_json(result)


def _train(cfg) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qwenimg_train.training.sweep import sweep_job
    from qwenimg_train.training.train import end_process_group, train

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)  # a failed job raises: Hydra records it and runs the others
    with user_errors_exit(logging.getLogger("qwenimg-train")):
        result = train(cfg)
    end_process_group()
    return result


def _export(mapping: dict[str, Any]):
    from qwenimg_train.export.to_diffusers import ExportJob, export

    return export(job(ExportJob, mapping, "export"))


def _eval(mapping: dict[str, Any]) -> dict[str, Any]:
    from qwenimg_train.eval.runner import EvalJob, run

    return run(job(EvalJob, mapping, "eval"))


def _show_eval(doc: dict[str, Any]) -> None:
    overall = doc["aggregates"]["overall"]
    print(f"{doc['config']['prompts']} prompts: " + ", ".join(
        f"{m} {overall[m]:.3f}" for m in ("char_accuracy", "word_accuracy", "ned_score", "edit_success") if m in overall))


def _sample(mapping: dict[str, Any]) -> dict[str, Any]:
    from qwenimg_train.tools.sample import SampleJob, sample

    return sample(job(SampleJob, mapping, "sample"))


def _report(mapping: dict[str, Any]) -> dict[str, Any]:
    from qwenimg_train.tools.report import ReportJob, report

    return report(job(ReportJob, mapping, "report"))


def _sweep_report(mapping: dict[str, Any]) -> dict[str, Any]:
    from qwenimg_train.tools.sweep_report import SweepReportJob, sweep_report

    return sweep_report(job(SweepReportJob, mapping, "sweep_report"))


def _plan(mapping: dict[str, Any]) -> str:
    from qwenimg_train.tools.plan import run

    return run(mapping)


train = console_script(_train, config_dir=config_dir, config_name="train", show=_show_train, plain=False,
                       logger="qwenimg-train")
# The tools log to the terminal only (their roots set hydra/job_logging), so their job
# names name no file.
export = console_script(_export, config_dir=tools_config_dir, config_name="export", show=print,
                        logger="qwenimg-export")
evaluate = console_script(_eval, config_dir=tools_config_dir, config_name="eval", show=_show_eval,
                          logger="qwenimg-eval")
sample = console_script(_sample, config_dir=tools_config_dir, config_name="sample",
                        show=lambda result: print(Path(result["out_dir"]) / "samples.json"), logger="qwenimg-sample")
report = console_script(_report, config_dir=tools_config_dir, config_name="report",
                        show=lambda result: print(result["summary_md"]), logger="qwenimg-report")
sweep_report = console_script(_sweep_report, config_dir=tools_config_dir, config_name="sweep_report",
                              show=lambda result: print(result["markdown"]), positional="sweep_dir",
                              logger="qwenimg-sweep-report")
plan = console_script(_plan, config_dir=tools_config_dir, config_name="plan", show=print, logger="qwenimg-plan")
