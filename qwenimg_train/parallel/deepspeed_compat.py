"""The DeepSpeed half of qwenimg_train.compat: private API of DeepSpeed and of
Lightning's DeepSpeedStrategy that the CPU strategy (strategies.py) relies on.

It lives in qwenimg_train/parallel/ because that package is the one place that imports
DeepSpeed. The versions it is written against are in `qwenimg_train.compat.PINS`
(DeepSpeed 0.19, Lightning 2.6), checked on first use.
"""

from __future__ import annotations

import contextlib

import torch

from qwenimg_train.compat import require

# Checked by qwenimg_train.compat.missing_private_names (tests/test_compat.py).
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3": ("_create_fp32_partitions",),
}


def init_distributed(strategy) -> None:
    """DeepSpeedStrategy's process-group setup (`deepspeed.init_distributed` with the
    strategy's backend, timeout and ranks)."""
    require("lightning")
    strategy._init_deepspeed_distributed()


def process_group_backend(strategy) -> str | None:
    """The backend the user gave DeepSpeedStrategy (`process_group_backend=`), or None."""
    require("lightning")
    return strategy._process_group_backend


@contextlib.contextmanager
def fp32_master_shares_partition():
    """Let ZeRO-3's fp32 master weights be the fp32 parameter partition itself.

    DeepSpeed 0.19 means to skip the master copy when the partition already has the
    master dtype and device, but compares a torch.device with the device *string*
    (always unequal), so fp32 training keeps a second fp32 copy of every partition:
    16 instead of 12 bytes per parameter and rank (benchmarks/bench_zero.py; fixed
    upstream by deepspeedai/DeepSpeed#7651). While the optimizer is built, the
    comparison sees a torch.device.
    """
    require("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

    def create(optimizer):
        device = optimizer.device
        optimizer.device = torch.device(device)
        try:
            return original(optimizer)
        finally:
            optimizer.device = device

    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = original
