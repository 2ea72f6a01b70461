"""Where `configs/strategy/*.yaml` pointed before the package moved into sub-packages.

Runs saved before the move name `qwenimg_train.strategies.ddp` / `.deepspeed` as their
strategy's `_target_` in config.yaml; this keeps `ckpt_path=...` resumes and exports
of those runs working. New configs name `qwenimg_train.parallel.strategies`.
"""

from qwenimg_train.parallel.strategies import ddp, deepspeed  # noqa: F401
