"""The one way a `qwenimg-*` console script is made: a Hydra app over a root config
whose composed values become a job (usually a validated dataclass) and one call.

    main = console_script(run, config_dir=..., config_name="export", show=print)

`run` receives the composed config as plain containers (Hydra's own node dropped, a
`???` left unset reported as `<key> is required`), or the DictConfig itself with
`plain=False` (qwenimg-train, whose multirun needs Hydra's runtime and turns a user's
mistake into an exit itself, since one failed sweep job must not end the sweep). What
every script gets from here, once: the console set up (`console.setup_console_logging`),
a user's mistake (ValueError) as one logged line and exit status 2
(`config.user_errors_exit`), and the result shown by `show`. `job(cls, mapping, section)` is the dataclass step.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

from data_pipelines.core.config import from_mapping, to_plain, user_errors_exit
from data_pipelines.core.console import setup_console_logging

T = TypeVar("T")


def plain_config(cfg: Any) -> dict[str, Any]:
    """The composed config as plain containers, without Hydra's node; mandatory values
    left unset (`???`) are a ValueError naming them."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        missing = sorted(k for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k))
        if missing:
            raise ValueError(f"missing required key(s) {missing}: {missing[0]} is required, pass {missing[0]}=...")
    plain = to_plain(cfg)
    return {k: v for k, v in dict(plain).items() if k != "hydra"}


def job(cls: type[T], mapping: Any, section: str = "") -> T:
    """The job dataclass `cls` from a plain mapping (unknown keys and wrong types named)."""
    return from_mapping(cls, mapping, section)


def console_script(run: Callable[[Any], Any], *, config_dir: Callable[[], str], config_name: str,
                   show: Callable[[Any], None] | None = None, plain: bool = True, positional: str | None = None,
                   logger: str = "qwenimg", job_name: str | None = None,
                   check: Callable[[], None] | None = None) -> Callable[[], None]:
    """A console-script `main()` running `run` on the config composed from
    `config_dir()/<config_name>.yaml` plus the command line's overrides. With
    `positional`, a first argument that is no override (`cmd PATH`) means `positional=PATH`.
    `job_name` (default: `config_name`) is Hydra's job name, which names its log file;
    `check` runs first (the trainer's check of its libraries' versions)."""
    log = logging.getLogger(logger)

    def main() -> None:
        import sys

        import hydra

        setup_console_logging()
        if check is not None:
            check()
        if positional and len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
            # Quoted: a path may hold characters Hydra's override grammar reads, such as commas.
            escaped = sys.argv[1].replace("\\", "\\\\").replace("'", "\\'")
            sys.argv[1] = f"{positional}='{escaped}'"

        @hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)
        def app(cfg) -> None:
            if plain:
                with user_errors_exit(log):
                    result = run(plain_config(cfg))
            else:
                result = run(cfg)
            if show is not None:
                show(result)

        # Hydra names the job (and its <job>.log) after the task function's module.
        app.__wrapped__.__module__ = f"qwenimg.{job_name or config_name}"
        app()

    main.__doc__ = f"The `{config_name}` console script (Hydra root {config_name}.yaml)."
    return main
