"""SIGTERM ends the run at a step boundary with a final `last.ckpt`, then a normal exit."""

from __future__ import annotations

import logging
import signal

from lightning.pytorch.callbacks import Callback

from qwenimg_train.training.callbacks.checkpoint import save_last

log = logging.getLogger(__name__)


class GracefulStop(Callback):
    """SIGTERM (what SLURM sends before pre-emption or at the time limit, what torchrun
    and Kubernetes send to stop a job) ends the run at the next step boundary with a
    final `last.ckpt`, and the process exits normally, so its launcher can requeue it
    and `ckpt_path=last` resumes exactly (launch/slurm/train.sbatch does).

    Lightning's own handler stops without a checkpoint, so this one replaces it for the
    run. The signal may reach one rank only (a Lightning-launched rank 0, say): the ranks
    agree at each step end (one small all-reduce) and stop together. Loader workers
    ignore the signal (`ignore_sigterm`, their worker_init_fn) so that a signal sent to
    the whole process group does not kill them under the step that is still running.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True  # acted on at the step end: never save from inside a handler

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its handlers (in Trainer._run); restored at teardown.
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.requested, all=False)
        if stop and not trainer.should_stop:
            log.warning("SIGTERM: saving last.ckpt at step %d and stopping (resume with ckpt_path=last)",
                        trainer.global_step)
            save_last(trainer)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: a group-wide SIGTERM is the trainer's to handle (GracefulStop);
    workers end when the loader shuts them down or their parent exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
