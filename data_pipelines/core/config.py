"""Turning a Hydra/OmegaConf mapping into typed, validated config dataclasses.

This is the one boundary where configuration is unpacked: below it, functions take
explicit arguments. Unknown keys are an error that names the key and the known ones
(a typo must never be silently ignored); so is a value of the wrong type for its
field's annotation (`num_shards: "8"`, `fraction: [0.3]`, a NaN or infinite float),
named with the key, the value and the expected type, before `__post_init__` compares
it with anything. Value ranges are checked in each dataclass's `__post_init__`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import logging
import math
import os
import re
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


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """The defaults of dataclass `cls`, by field (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


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
        key = f"{where}.{name}" if where else name
        sub = _dataclass_type(hints.get(name))
        if sub is not None and isinstance(value, Mapping):
            value = from_mapping(sub, value, key)
        elif name in hints and not _matches(value, hints[name]):
            raise ValueError(f"{key} = {value!r:.120}: expected {_describe(hints[name])}")
        kwargs[name] = value
    return cls(**kwargs)


def _matches(value: Any, tp: Any) -> bool:
    """Whether a plain config value fits annotation `tp` (scalars, None, unions, lists,
    dicts, dataclasses; anything else is not checked). Ints fit floats; bools fit only bool."""
    if tp is Any or tp is object:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, Mapping))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, typing.Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        return len(args) != 2 or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"float": "a finite number", "int": "an integer", "str": "a string", "bool": "true or false",
                "list": "a list", "dict": "a mapping"}.get(tp.__name__, tp.__name__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, typing.Mapping, collections.abc.Mapping):
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if len(args) == 2 else "a mapping"
    return str(tp)


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


# Config keys whose values are credentials: never written into a saved config, a
# manifest, a checkpoint or a logger's hyperparameters (wandb keys, hub tokens, ...).
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|key[_-]?secret|token|secret|password|passwd|credentials?)$",
                         re.IGNORECASE)
REDACTED = "<redacted>"


# Credentials inside a value: a URL's password (https://user:PASSWORD@host), a signed
# URL's query parameters (S3/GCS/Azure presigned: X-Amz-Signature, sig, token, ...) and
# an HTTP header in a `pipe:` command (-H 'Authorization: Bearer ...').
_SECRET_IN_TEXT = [
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), rf"\1{REDACTED}@"),
    (re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
                r"sig|signature|token|access_token|api[_-]?key|key)=)[^&\s'\"]+"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|private-token|cookie)(\s*:\s*)[^'\"\n]+"),
     rf"\1\2{REDACTED}"),
]


def redact_text(text: str) -> str:
    """`text` with the credentials a location may carry replaced by '<redacted>'."""
    for pattern, replacement in _SECRET_IN_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact_secrets(config: Any) -> Any:
    """A copy of a plain config with the values of credential-like keys replaced by
    '<redacted>' (the keys stay, so the config still shows they were set; a mapping under
    such a key is searched, not dropped), and the credentials inside string values (a
    URL's password or signature, a `pipe:` command's Authorization header) too."""
    if isinstance(config, Mapping):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, (str, bytes, int))
                    else redact_secrets(v)) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact_secrets(v) for v in config]
    if isinstance(config, str):
        return redact_text(config)
    return config
