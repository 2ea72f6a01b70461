"""The console of a `qwenimg-*` script: each line once, third-party chatter kept off it
(data_pipelines.core.console)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from data_pipelines.core import console

# Messages as the libraries word them (their source files are named in console.py).
CHATTER = [
    ("lightning.pytorch.utilities.rank_zero", logging.INFO,
     "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/project/litmodels/)"
     " to enable LitModelCheckpoint, which syncs automatically with the Lightning model registry."),
    ("lightning.pytorch.utilities.rank_zero", logging.INFO,
     "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
     "(https://pypi.org/project/litlogger/) to enable LitLogger"),
    ("lightning.pytorch.utilities.rank_zero", logging.INFO, "TPU available: False, using: 0 TPU cores"),
    ("RapidOCR", logging.WARNING, "The text detection result is empty"),
    ("RapidOCR", logging.WARNING, "The text recognize result is empty"),
    ("DeepSpeed", logging.WARNING,
     "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
]
CHATTER_PATTERNS = ("💡 Tip", "litmodels", "litlogger", "TPU available", "result is empty", "Setting accelerator to CPU",
                    "LeafSpec", "torch_dtype", "anonymous setting")


@pytest.fixture
def restore_logging():
    """setup_console_logging changes process-wide logging state: put it back afterwards."""
    names = list(console.DEMOTED) + list(console.ONE_HANDLER_LOGGERS)
    saved = {n: (list(logging.getLogger(n).filters), logging.getLogger(n).propagate) for n in names}
    with warnings.catch_warnings():
        yield
    for name, (filters, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.filters[:] = filters
        logger.propagate = propagate


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("name,level,message", CHATTER)
def test_known_chatter_is_lowered_to_debug(restore_logging, name, level, message):
    console.setup_console_logging()
    console.setup_console_logging()  # a second call adds nothing
    logger = logging.getLogger(name)
    assert sum(isinstance(f, console.DemoteFilter) for f in logger.filters) == 1
    handler = _Records()
    logger.addHandler(handler)
    old_level = logger.level
    try:
        logger.setLevel(logging.INFO)
        logger.log(level, message)
        assert handler.records == []
        logger.log(level, "a line of our own")  # anything else passes unchanged
        assert [(r.levelno, r.getMessage()) for r in handler.records] == [(level, "a line of our own")]
        logger.setLevel(logging.DEBUG)  # asked for: shown, as DEBUG
        logger.log(level, message)
        assert handler.records[-1].levelno == logging.DEBUG
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_lightning_deprecation_is_ignored_for_its_module_only(restore_logging):
    console.setup_console_logging()
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree",
                               registry={})
        warnings.warn_explicit(message, FutureWarning, "ours.py", 1, module="qwenimg_train.something", registry={})
    assert [str(w.message) for w in caught] == [message]  # only the one from elsewhere


def test_lightning_lines_reach_one_handler(restore_logging):
    """Lightning keeps a handler on `lightning` and also propagates to the root logger
    (Hydra's handler): after setup, a Lightning record meets one of the two, not both."""
    console.setup_console_logging()
    lightning_handler, root_handler = _Records(), _Records()
    logging.getLogger("lightning").addHandler(lightning_handler)
    logging.getLogger().addHandler(root_handler)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    try:
        logger.warning("GPU available: False, used: False")
    finally:
        logging.getLogger("lightning").removeHandler(lightning_handler)
        logging.getLogger().removeHandler(root_handler)
    assert len(lightning_handler.records) + len(root_handler.records) == 1


# A console script made by the project's helper (Hydra job logging on), whose job does what
# a training run does to the console: Lightning logs (imported after Hydra set up its
# logging, as train() does), the libraries' chatter, our own log line.
SCRIPT = """
import logging, sys, warnings
from data_pipelines.core.app import console_script

def run(cfg):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    rank_zero_info("GPU available: False, used: False")
    rank_zero_info("TPU available: False, using: 0 TPU cores")
    rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")
    logging.getLogger("RapidOCR").warning("The text detection result is empty")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, "
                                           "we were unable to detect it.")
    warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "_pytree.py", 21,
                           module="lightning.pytorch.utilities._pytree")
    logging.getLogger("qwenimg-test").info("our line")
    return dict(done=True)

main = console_script(run, config_dir=lambda: {config_dir!r}, config_name="job", show=print)
sys.argv = ["qwenimg-test", "hydra.run.dir={run_dir}"]
main()
"""


@pytest.mark.slow
def test_console_script_prints_each_line_once_and_no_chatter(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "job.yaml").write_text("value: 1\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT).format(config_dir=str(tmp_path / "conf"), run_dir=str(tmp_path / "run")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    messages = [line.rsplit(" - ", 1)[-1].removeprefix("INFO: ") for line in lines]  # Hydra's or Lightning's format
    repeated = sorted({m for m in messages if messages.count(m) > 1})
    assert not repeated, f"printed more than once: {repeated}\n{out.stderr}"
    assert messages.count("GPU available: False, used: False") == 1, out.stderr
    assert messages.count("our line") == 1, out.stderr
    chatter = [line for line in lines if any(p in line for p in CHATTER_PATTERNS)]
    assert not chatter, chatter
