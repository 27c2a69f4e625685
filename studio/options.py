"""Options: each one's allowed values, declared once beside its field, and the one check every entry point runs.

A config dataclass (`TrainConfig`, a method's config, `SampleSettings`) declares a numeric field's range
with `ranged(default, ...)`; `check_options` reads those declarations, with the field's type hint, and
refuses a bad value in one line that names the option, the value and what is allowed. The CLI, a TOML
`--config` file and the web app's form all build configs through `config_from_options`, which converts
strings to the fields' types and then runs `check_options`, so they refuse the same values with the same
message before any job, folder or model exists. (Ranges that depend on the model, such as an OFT block
size against a layer's width, are checked by the method when it wraps the layers: before any step.)

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     steps: int = ranged(500, low=1)
    >>> config_from_options(Config, {"steps": "-10"})
    Traceback (most recent call last):
    studio.errors.StudioError: --steps -10: must be a whole number >= 1
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from studio.errors import StudioError

RANGE_KEY = "range"  # the dataclass field metadata key holding a `Range`
FLAG_KEY = "flag"  # metadata key of a field whose CLI flag is not its name's (SampleSettings.seeds: --seed)


@dataclass(frozen=True)
class Range:
    """The numbers an option allows: bounds (each included unless `*_open`) and an optional step."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed (> low)
    high_open: bool = False
    multiple_of: int | None = None

    def contains(self, value: float) -> bool:
        """Whether `value` is allowed.

        Example:
            >>> Range(low=0, low_open=True).contains(0), Range(low=8, multiple_of=8).contains(16)
            (False, True)
        """
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self) -> str:
        """The range in words, e.g. `from 1 to 1000` or `> 0 and <= 1`.

        Example:
            >>> Range(low=0, high=1, high_open=True).describe()
            '>= 0 and < 1'
        """
        closed = self.low is not None and self.high is not None and not (self.low_open or self.high_open)
        parts = [f"from {_number(self.low)} to {_number(self.high)}"] if closed else []
        if self.low is not None and not closed:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None and not closed:
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def ranged(default, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, multiple_of: int | None = None):
    """A dataclass field with `default` whose value must lie in the given range (None passes for optional fields).

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class Config:
        ...     rate: float = ranged(1e-4, low=0, low_open=True)
        >>> fields(Config)[0].metadata["range"].describe()
        '> 0'
    """
    return dataclasses.field(default=default, metadata={RANGE_KEY: Range(low, high, low_open, high_open, multiple_of)})


def flag(name: str) -> str:
    """The CLI flag of a config field: `max_train_steps` -> `--max-train-steps`.

    Example:
        >>> flag("max_train_steps")
        '--max-train-steps'
    """
    return "--" + name.replace("_", "-")


def unwrap_optional(hint):
    """`int | None` -> `int`; any other hint as it is.

    Example:
        >>> unwrap_optional(int | None), unwrap_optional(str)
        (<class 'int'>, <class 'str'>)
    """
    args = typing.get_args(hint)
    optional = [a for a in args if a is not type(None)]
    return optional[0] if type(None) in args and len(optional) == 1 else hint


def allowed(hint, value_range: Range | None) -> str:
    """What a field of type `hint` with `value_range` accepts, in words (the error messages' second half).

    Example:
        >>> allowed(int, Range(low=1))
        'a whole number >= 1'
    """
    hint = unwrap_optional(hint)
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if hint is bool:
        return "true or false (on the command line: --NAME or --no-NAME)"
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0] if typing.get_args(hint) else str
        items = "whole numbers" if item is int else "names"
        text = f"one or more {items}"
        return text + (f", each {value_range.describe()}" if value_range else "")
    kind = {int: "a whole number", float: "a number"}.get(hint, "text")
    return kind + (f" {value_range.describe()}" if value_range else "")


def check_value(option: str, hint, value, value_range: Range | None = None) -> None:
    """Raise a one-line `StudioError`, naming `option`, if `value` is not of type `hint` or outside `value_range`.

    Example:
        >>> check_value("--learning-rate", float, -0.001, Range(low=0, low_open=True))
        Traceback (most recent call last):
        studio.errors.StudioError: --learning-rate -0.001: must be a number > 0
    """
    if value is None and unwrap_optional(hint) is not hint:
        return  # an optional option left out
    base = unwrap_optional(hint)
    origin = typing.get_origin(base)

    def bad() -> StudioError:
        shown = _shown(value)
        hint_text = ""
        step = value_range.multiple_of if value_range else None
        if step and _is_number(value, float):  # name the nearest allowed values
            below, above = max(step, int(value // step) * step), max(step, (int(value // step) + 1) * step)
            hint_text = f" (e.g. {below} or {above})"
        return StudioError(f"{option} {shown}: must be {allowed(hint, value_range)}{hint_text}")

    if origin is typing.Literal:
        if value not in typing.get_args(base):
            raise bad()
    elif base is bool:
        if not isinstance(value, bool):
            raise bad()
    elif base in (int, float):
        if not _is_number(value, base) or (value_range is not None and not value_range.contains(value)):
            raise bad()
    elif origin is list:
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        if not isinstance(value, list) or not value:
            raise bad()
        for entry in value:
            if item in (int, float):
                if not _is_number(entry, item) or (value_range is not None and not value_range.contains(entry)):
                    raise bad()
            elif not isinstance(entry, str) or not entry.strip():
                raise bad()
    elif base is str and not isinstance(value, str):
        raise bad()


def _shown(value) -> str:
    """A value as the error message shows it, the same whether it came from the CLI or TOML (1.0 and 1 alike)."""
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value) if value else "(empty)"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return _number(value)
    return str(value)


def _is_number(value, kind) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return kind is float or float(value).is_integer()


def check_options(config) -> None:
    """Check every field of a config dataclass instance against its type and declared range.

    Example:
        >>> from studio.trainers.base import TrainConfig
        >>> check_options(TrainConfig(max_train_steps=0))
        Traceback (most recent call last):
        studio.errors.StudioError: --max-train-steps 0: must be a whole number from 1 to 10000000
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in hints and hints[f.name] is not dict:
            option = f.metadata.get(FLAG_KEY, flag(f.name))
            check_value(option, hints[f.name], getattr(config, f.name), f.metadata.get(RANGE_KEY))


def config_from_options(config_cls, options: dict):
    """Build `config_cls` from `options` (CLI strings or TOML values), converting strings to the fields'
    types, then `check_options`; an unknown key or a bad value is a one-line `StudioError`.

    Example:
        >>> from studio.adapters.lora import LoRAConfig
        >>> config_from_options(LoRAConfig, {"rank": "8"}).rank
        8
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, raw in options.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise StudioError(f"unknown option {flag(name)} for {config_cls.__name__}; known: "
                              + ", ".join(flag(n) for n in fields))
        option = fields[name].metadata.get(FLAG_KEY, flag(name))
        values[name] = _convert(raw, hints[name], option, fields[name].metadata.get(RANGE_KEY))
    config = config_cls(**values)
    check_options(config)
    return config


def _convert(raw, hint, option: str, value_range: Range | None):
    """A CLI string as the field's type (other values pass through, `check_options` judges them)."""
    if not isinstance(raw, str):
        return raw
    hint = unwrap_optional(hint)
    if typing.get_origin(hint) is typing.Literal or hint is str:
        return raw
    try:
        if hint is bool:
            if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.strip().lower() in ("true", "1", "yes")
        if hint is int:
            number = float(raw)
            return int(number) if number.is_integer() else number  # 1.5 stays 1.5, for the range check to refuse
        if hint is float:
            return float(raw)
        if typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0] if typing.get_args(hint) else str
            parts = [part.strip() for part in raw.split(",") if part.strip()]
            return [float(p) if item is float else int(p) for p in parts] if item in (int, float) else parts
        return raw
    except ValueError:
        raise StudioError(f"{option} {raw!r}: must be {allowed(hint, value_range)}") from None
