"""What a console script prints: each line once, third-party chatter at DEBUG.

`setup_console_logging()` is called once at the start of every console script
(`qwenimg-data`, `qwenimg-train`, `qwenimg-eval`, ...), before Hydra sets up its job
logging and before the heavy libraries are imported. It only configures `logging` and
`warnings`: named loggers get a filter, one logger stops propagating, and a few
warnings get a targeted filter (message and module). It patches no library code, and
it can be called again (nothing is added twice).

What it changes, and why:

* Each Lightning line once. `lightning/__init__.py` always puts its own
  `StreamHandler` ("INFO: %(message)s") on the `lightning` logger, and records still
  propagate to the root logger, where Hydra's job logging prints them a second time.
  `lightning` stops propagating here: Lightning's own handler prints its lines, once,
  whichever is imported first (Lightning imports lazily, after Hydra's job logging is
  set up). The `lightning.pytorch` and `lightning.fabric` subpackages add a handler of
  their own only when the root logger has none, and then stop propagating themselves.
* Advertisements and per-item notices are lowered to DEBUG (dropped unless their
  logger is set to DEBUG, e.g. `hydra.verbose=RapidOCR`): Lightning's "💡 Tip: ... litmodels / litlogger"
  (lightning/pytorch/trainer/connectors/callback_connector.py) and its "TPU available:
  False" on every machine without one (lightning/pytorch/trainer/setup.py), rapidocr's
  "The text detection result is empty" for every image without text
  (rapidocr/main.py `run_ocr_steps`), and DeepSpeed's "Setting accelerator to CPU"
  on a machine without GPU (deepspeed/accelerator/real_accelerator.py).
* A deprecation that Lightning's own code triggers in torch (`LeafSpec`, in
  lightning/pytorch/utilities/_pytree.py) is ignored for that module and message only.

Progress bars (tqdm, Lightning's) and the project's own loggers are not touched.
"""

from __future__ import annotations

import logging
import re
import warnings

DEMOTED: dict[str, tuple[str, ...]] = {
    # logger name -> message patterns (re.search) lowered to DEBUG
    "lightning.pytorch.utilities.rank_zero": (r"^💡 Tip: ", r"^TPU available: False, using: 0 TPU cores$"),
    "lightning.fabric.utilities.rank_zero": (r"^💡 Tip: ",),
    "RapidOCR": (r"^The text (detection|recognize) result is empty$", r"^The text classifier is empty$"),
    "DeepSpeed": (r"^Setting accelerator to CPU\.",),
}

IGNORED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # (category, message regex, module regex): torch >= 2.10 deprecates LeafSpec, which
    # Lightning 2.6 still builds in its pytree helper; nothing a user can change.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)

# Lightning's top-level logger: keeps its own handler, stops propagating (see above).
ONE_HANDLER_LOGGERS = ("lightning",)


class DemoteFilter(logging.Filter):
    """Lowers records whose message matches one of `patterns` to DEBUG; they reach the
    handlers only when their logger is enabled for DEBUG."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = tuple(patterns)
        self._regex = re.compile("|".join(f"(?:{p})" for p in self.patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self._regex.search(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def setup_console_logging() -> None:
    """Configure logging and warnings for a console script (see the module docstring)."""
    for name, patterns in DEMOTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteFilter) and f.patterns == patterns for f in logger.filters):
            logger.addFilter(DemoteFilter(patterns))
    for name in ONE_HANDLER_LOGGERS:
        logging.getLogger(name).propagate = False
    for category, message, module in IGNORED_WARNINGS:
        # filterwarnings puts an identical filter only once (it removes the old copy first)
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
