"""Flags declared once, as metadata on the fields of a config dataclass.

A field written ``lr: float = flag(1e-3, "learning rate", range=Range(0, 10, lo_open=True))`` carries its
command-line spelling, help text, argparse type and choices, allowed range, and whether it fixes the
architecture. The command-line parsers (:func:`add_flags`), the range and type checks (:func:`check_fields`,
used for typed flags and for configs read back from checkpoints alike) and the resume rules
(:func:`names_where`) are derived from it, so adding a flag means adding one field.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = [
    "ConfigError",
    "Range",
    "POSITIVE",
    "NON_NEGATIVE",
    "Flag",
    "flag",
    "same_flag",
    "flag_spec",
    "flag_name",
    "option",
    "rules_of",
    "names_where",
    "check_fields",
    "check_choices",
    "parse_bool",
    "add_flags",
    "OneLineArgumentParser",
    "bool_arg",
    "optional_int",
    "optional_float",
    "int_at_least",
    "positive_int",
    "nonnegative_int",
]


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag and what to do."""


# ------------------------------------------------------------------------------------------------
# One set of rules for every number a run takes: checked the same way for the flags typed on a command
# line and for the config stored in a checkpoint (which a crafted or damaged file may fill with anything).
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: finite, between ``lo`` and ``hi`` (open or closed ends)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # appended to the message: what the bound protects

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        lo, hi = self.lo, self.hi
        if math.isinf(lo) and math.isinf(hi):
            return kind
        if math.isinf(hi):
            return f"{kind} {'>' if self.lo_open else '>='} {lo:g}"
        if math.isinf(lo):
            return f"{kind} {'<' if self.hi_open else '<='} {hi:g}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(1)  # integers >= 1
NON_NEGATIVE = Range(0)


# ------------------------------------------------------------------------------------------------
# The declaration.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """What a config field means on the command line (stored in the field's ``metadata["flag"]``)."""

    name: Optional[str] = None  # the spelling, e.g. "--batch_size"; None: flag_name(field name)
    help: Optional[str] = None
    type: Optional[Callable[[str], Any]] = None  # argparse type; None: derived from the annotation
    choices: Optional[Tuple[Any, ...]] = None  # allowed values (argparse, and check_fields(choices=True))
    range: Optional[Range] = None  # allowed numbers (every item of a tuple)
    arch: bool = False  # fixes the architecture: on --resume it comes from the checkpoint
    run: bool = False  # describes this machine or invocation: on --resume always taken from the command line
    cli: bool = True  # False: a config field with no command-line flag
    metavar: Optional[str] = None
    store_true: bool = False  # a switch without a value (argparse action="store_true")


def flag(default: Any, help: Optional[str] = None, **spec: Any) -> Any:
    """A dataclass field with default ``default`` whose :class:`Flag` is ``Flag(help=help, **spec)``."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help=help, **spec)})


def same_flag(cls: type, name: str) -> Any:
    """The field ``name`` of the dataclass ``cls`` again (same default and flag), for a second config
    that holds the same setting (TrainConfig holds ModelConfig's settings under the same names)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=f.default, metadata=f.metadata)


def flag_spec(f: dataclasses.Field) -> Flag:
    return f.metadata.get("flag", Flag())


def flag_name(field_name: str) -> str:
    """``n_power_series`` -> ``--n-power-series`` (a few paper flags keep underscores: ``Flag.name``)."""
    return "--" + field_name.replace("_", "-")


def option(f: dataclasses.Field) -> str:
    """The command-line spelling of the field ``f``."""
    return flag_spec(f).name or flag_name(f.name)


def rules_of(cls: type) -> Dict[str, Range]:
    """``{field name: Range}`` for the fields of ``cls`` that declare a range."""
    return {f.name: flag_spec(f).range for f in dataclasses.fields(cls) if flag_spec(f).range is not None}


def names_where(cls: type, what: str) -> Tuple[str, ...]:
    """Names of the fields of ``cls`` whose flag has ``what`` set (``"arch"`` or ``"run"``), in field order."""
    return tuple(f.name for f in dataclasses.fields(cls) if getattr(flag_spec(f), what))


# ------------------------------------------------------------------------------------------------
# Checking a config (from flags, a checkpoint or the Python API).
# ------------------------------------------------------------------------------------------------
def _check_type(value: Any, hint: Any, flag: str) -> Any:
    """``value`` as the annotated type (bool, int, float, str, Optional[...], tuples), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], flag) if len(inner) == 1 else value
    if hint is bool:
        try:
            return parse_bool(value) if isinstance(value, (bool, str)) else _fail(flag, "True or False", value)
        except ValueError:
            _fail(flag, "True or False", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(flag, "an integer", value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(flag, "a number", value)
    if hint is str:
        if isinstance(value, str):
            return value
        _fail(flag, "a string", value)
    if origin in (tuple, Tuple):
        if isinstance(value, (tuple, list, str)):
            return value  # parsed (and its items checked) by the owner's __post_init__
        _fail(flag, "a list", value)
    return value


def _fail(flag: str, what: str, value: Any):
    shown = repr(value) if not isinstance(value, (dict, list, tuple)) or len(repr(value)) < 60 else type(value).__name__
    raise ConfigError(f"{flag} must be {what}, got {shown}")


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` against its annotated type (coercing ``1`` -> ``1.0`` for
    floats, ``"true"`` -> ``True`` for bools) and every numeric field against its declared range; raises
    :class:`ConfigError` naming the flag, the allowed values and the value found."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = option(f)
        v = _check_type(getattr(obj, f.name), hints.get(f.name, Any), name)
        object.__setattr__(obj, f.name, v)
        rule = flag_spec(f).range
        if rule is None or v is None:
            continue
        values = v if isinstance(v, (tuple, list)) else [v]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not rule.contains(item):
                why = f" ({rule.why})" if rule.why else ""
                raise ConfigError(f"{name} must be {rule.describe(_is_int(hints.get(f.name)))}{why}, got {_show(v)}")


def check_choices(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` that declares choices (the command line's, for a config
    read from a checkpoint); raises :class:`ConfigError` naming the flag and the allowed values."""
    for f in dataclasses.fields(obj):
        allowed, v = flag_spec(f).choices, getattr(obj, f.name)
        if allowed is not None and v not in allowed:
            raise ConfigError(f"{option(f)} must be one of {', '.join(map(str, allowed))}; got {v!r}")


def _is_int(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "-".join(map(str, v)) if len(v) < 20 else f"{len(v)} values"
    return repr(v) if isinstance(v, str) else f"{v}"


def parse_bool(value: Any) -> bool:
    """Strict boolean: True/False/true/false/1/0 (never ``eval``)."""
    if isinstance(value, bool):
        return value
    s = str(value).strip()
    if s in ("True", "true", "1"):
        return True
    if s in ("False", "false", "0"):
        return False
    raise ValueError(f"expected True or False (or true/false/1/0), got {value!r}")


# ------------------------------------------------------------------------------------------------
# The command line.
# ------------------------------------------------------------------------------------------------
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bool_arg(s: str) -> bool:
    """An argparse type: :func:`parse_bool`."""
    try:
        return parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _optional(cast, what: str):
    def parse(s: str):
        if s in ("None", "none", ""):
            return None
        try:
            return cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or None, got {s!r}") from None

    return parse


optional_int = _optional(int, "an integer")
optional_float = _optional(float, "a number")


def int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo``, with a message saying ``what`` was expected."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "a non-negative integer")


def _arg_type(hint: Any) -> Callable[[str], Any]:
    """The argparse type of an annotation: strict booleans, ``None`` accepted for Optional numbers, and
    tuples given as strings (``16-16-16``, ``2222``) that the config's ``__post_init__`` parses."""
    if hint is bool:
        return bool_arg
    if hint == Optional[int]:
        return optional_int
    if hint == Optional[float]:
        return optional_float
    if hint in (int, float):
        return hint
    return str


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: bool = True) -> argparse.ArgumentParser:
    """Add one argument per command-line field of the dataclass ``cls``, in field order. With
    ``defaults=False`` a flag not typed is left out of the parsed namespace (``argparse.SUPPRESS``), so
    the namespace holds exactly the flags given and the dataclass supplies the other defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = flag_spec(f)
        if not spec.cli:
            continue
        kw: Dict[str, Any] = {"default": f.default if defaults else argparse.SUPPRESS, "help": spec.help}
        if spec.store_true:
            kw["action"] = "store_true"
        else:
            kw["type"] = spec.type or _arg_type(hints[f.name])
            if spec.choices is not None:
                kw["choices"] = list(spec.choices)
            if spec.metavar is not None:
                kw["metavar"] = spec.metavar
        parser.add_argument(option(f), **kw)
    return parser

