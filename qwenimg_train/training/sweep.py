"""One job of a Hydra multirun (`qwenimg-train -m`, `sweep=...`; docs/sweeps.md)."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from qwenimg_train.training.train import end_process_group, train

log = logging.getLogger("qwenimg-train")


def sweep_job(cfg: DictConfig) -> dict[str, Any]:
    """One job of a Hydra multirun (`-m`, `sweep=...`; docs/sweeps.md).

    - It writes to its own directory, <hydra.sweep.dir>/<hydra.sweep.subdir>: paths.output_dir
      would give every job the same one (an experiment's fixed path, or the QWENIMG_RUN_DIR
      that train() left set for the previous job of this process under the basic launcher).
    - Lightning relaunches DDP ranks with this process's command line plus `hydra.run.dir=
      <HydraConfig's run.dir>`; while the job runs, those are the job's own overrides in run
      mode and its directory, so each rank runs this job, not the sweep.
    - The basic launcher runs the jobs one after another in this process: each starts with
      the environment the sweep started with (Lightning's launcher leaves LOCAL_RANK,
      WORLD_SIZE, MASTER_PORT... set, which would tell the next job that its ranks already
      exist) and without the previous job's process group.
    - A failed job raises: Hydra records it, runs the other jobs and reports it at the end
      (user_errors_exit's SystemExit would end the whole sweep at the first failure).
    """
    import sys

    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    keys = [o.lstrip("+~").split("=", 1)[0] for o in hc.overrides.task]
    if "paths.output_dir" in keys:
        log.warning("paths.output_dir is ignored in a multirun: job %s writes to %s (hydra.sweep.dir=... chooses "
                    "where a sweep goes)", hc.job.num, job_dir)
    cfg.paths.output_dir = job_dir
    with read_write(hc.run):  # this job's HydraConfig only; run_job sets a fresh one per job
        hc.run.dir = job_dir
    argv, env = sys.argv, dict(os.environ)
    task = [o for o, key in zip(hc.overrides.task, keys) if key not in ("sweep", "paths.output_dir")]
    sys.argv = [argv[0], *task, f'paths.output_dir="{job_dir}"', "hydra.mode=RUN"]
    finished = False
    try:
        result = train(cfg)
        finished = True
        return result
    except Exception as exc:
        # Into the job's log (<job dir>/<job name>.log), where qwenimg-sweep-report finds the cause.
        log.error("job %s failed: %s: %s", hc.job.num, type(exc).__name__, exc)
        raise
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
        if finished:
            end_process_group()  # as the job's other ranks do (they run `qwenimg-train` in run mode)
        elif dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
