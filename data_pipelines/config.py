"""Turning a Hydra/OmegaConf mapping into typed, validated config dataclasses.

This is the one boundary where configuration is unpacked: below it, functions take
explicit arguments. Unknown keys are an error that names the key and the known ones
(a typo must never be silently ignored); validation lives in each dataclass's
`__post_init__`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def to_plain(cfg: Any) -> Any:
    """OmegaConf containers to plain dicts/lists (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return cfg


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside `tp` (also through `X | None`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    mapping = to_plain(mapping) or {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in mapping.items():
        sub = _dataclass_type(hints.get(name))
        if sub is not None and isinstance(value, Mapping):
            value = from_mapping(sub, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)


@contextlib.contextmanager
def user_errors_exit(log: logging.Logger):
    """For console entry points: a ValueError (a user's mistake, by this project's
    convention) becomes one logged line and exit status 2, not a traceback;
    QWENIMG_DEBUG=1 keeps the traceback."""
    try:
        yield
    except ValueError as exc:
        if os.environ.get("QWENIMG_DEBUG"):
            raise
        log.error("%s", exc)
        raise SystemExit(2) from None
