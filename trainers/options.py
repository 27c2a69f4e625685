"""Turning CLI/TOML options into a method's config dataclass.

Example:
    >>> from studio.adapters.lora import LoRAConfig
    >>> config_from_options(LoRAConfig, {"rank": "8"}).rank
    8
"""

from __future__ import annotations

import dataclasses
import typing

from studio.errors import StudioError


def config_from_options(config_cls, options: dict):
    """Build `config_cls` from `options`, converting strings to the fields' types; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, raw in options.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise StudioError(f"unknown option {key!r} for {config_cls.__name__}; known: {', '.join(fields)}")
        values[name] = _convert(raw, hints[name], key)
    return config_cls(**values)


def unwrap_optional(hint):
    """`int | None` -> `int`; any other hint as it is.

    Example:
        >>> unwrap_optional(int | None), unwrap_optional(str)
        (<class 'int'>, <class 'str'>)
    """
    args = typing.get_args(hint)
    optional = [a for a in args if a is not type(None)]
    return optional[0] if type(None) in args and len(optional) == 1 else hint


def _convert(raw, hint, key: str):
    if not isinstance(raw, str):
        return raw
    hint = unwrap_optional(hint)  # "int | None" converts like int
    if typing.get_origin(hint) is typing.Literal:
        if raw not in typing.get_args(hint):
            raise StudioError(f"option {key!r} must be one of {', '.join(map(str, typing.get_args(hint)))} (got {raw!r})")
        return raw
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float):
            return hint(raw)
        if typing.get_origin(hint) is list:
            return [part.strip() for part in raw.split(",") if part.strip()]
        return raw
    except ValueError:
        raise StudioError(f"option {key!r} needs a {getattr(hint, '__name__', hint)}, got {raw!r}") from None
