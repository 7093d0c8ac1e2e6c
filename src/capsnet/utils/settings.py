"""Settings dataclasses: each field says its help text, its bounds and whether ``--resume`` may
change it, once; validation, reading stored settings and command-line flags all follow it.

    @dataclass(frozen=True)
    class Config:
        epochs: int = setting(30, "passes over the training set", min=1, resume=True)

:func:`check_settings` (called from ``__post_init__``) checks types, bounds and choices and
raises :class:`CapsNetError` in one line, so a stored config that says ``lr = "0.001"`` is
refused exactly as the flag ``--lr 0.001x`` would be.

A field declared with ``train=`` is also a field of the class decorated
``@training_fields_of(ItsClass)``, with its own default there: the model's architecture fields
a training run chooses are declared once, in CapsNetConfig, and TrainConfig gets them.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Mapping

from ..errors import CapsNetError

SIZES = tuple[int, ...]  # a list of layer sizes; "min"/"max" bound each, "max_len" the count
FLOATS = tuple[float, ...]  # a list of finite numbers, possibly empty
TYPES = (bool, int, float, str, SIZES, FLOATS)  # each also as ``X | None``
BOUNDS = {"min": operator.ge, "max": operator.le, "gt": operator.gt, "lt": operator.lt}
MAX_IMAGE_SIDE = 4096  # the largest image side a config takes: image_size, crop, crop_from


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            gt: float | None = None, lt: float | None = None,
            choices: tuple[str, ...] | None = None, max_len: int | None = None,
            resume: bool = False, flag: bool = True, before: Any = None,
            required: bool = False, infinite: bool = False, train: Any = MISSING) -> Any:
    """A dataclass field with its help text and rules. ``min``/``max`` are inclusive bounds,
    ``gt``/``lt`` exclusive ones; ``max_len`` bounds a list's or a text's length;
    ``resume=True`` lets ``--resume`` change it; ``flag=False`` keeps it off the command line
    (set another way); ``before`` is what settings stored before the field existed meant
    (when not ``default``); ``required``: stored settings must name it; ``infinite``: a
    float may be infinite (never NaN). ``train`` makes it a training setting too, with that
    default there (see :func:`training_fields_of`)."""
    rules = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices,
             "max_len": max_len, "resume": resume, "flag": flag,
             "before": default if before is None else before, "required": required,
             "infinite": infinite, "train": train}
    return field(default=default, metadata=rules)


def training_fields(cls: type) -> list[Field]:
    """The fields of settings class ``cls`` declared with ``train=``."""
    return [f for f in fields(cls) if f.metadata.get("train", MISSING) is not MISSING]


def training_fields_of(source: type) -> Callable[[type], type]:
    """Class decorator, under ``@dataclass``: gives the class the :func:`training_fields` of
    settings class ``source``, after its own, with the same help and rules (``before``
    included) and their ``train`` defaults, so that each is declared once. The class may not
    declare them itself."""

    def add(cls: type) -> type:
        hints = typing.get_type_hints(source)
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for f in training_fields(source):
            if f.name in annotations:
                raise TypeError(f"{cls.__name__}.{f.name} is declared in {source.__name__}")
            annotations[f.name] = hints[f.name]
            setattr(cls, f.name, field(default=f.metadata["train"], metadata=f.metadata))
        cls.__annotations__ = annotations
        return cls

    return add


def setting_fields(cls: type) -> list[tuple[Field, type]]:
    """The fields of settings class ``cls`` with their types (bool, int, float or str)."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in fields(cls):
        kind = hints[f.name]
        if optional(kind)[0] not in TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: settings are bool, int, float, str, "
                            f"tuple[int, ...] or tuple[float, ...], each possibly | None")
        result.append((f, kind))
    return result


def optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for a field typed ``X | None``, else ``(kind, False)``."""
    args = typing.get_args(kind)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def requirement(kind: type, rules: Mapping[str, Any]) -> str:
    """What a value must be, in words: ``an integer >= 1``, ``a number in (0, 1]``, ..."""
    kind, nullable = optional(kind)
    if nullable:
        return f"{requirement(kind, rules)} or null"
    if kind == FLOATS:
        return "a list of finite numbers"
    if kind == SIZES:
        return (f"a list of 1 to {rules['max_len']} sizes, each "
                f"{requirement(int, {**rules, 'max_len': None})}")
    if rules.get("choices"):
        return f"one of {', '.join(rules['choices'])}"
    if kind is bool:
        return "true or false"
    if kind is str:
        return f"text of at most {rules['max_len']:,} characters" if rules.get("max_len") else "text"
    noun = "an integer" if kind is int else "a number"
    low, high = rules.get("min"), rules.get("max")
    low_open, high_open = rules.get("gt"), rules.get("lt")
    if low_open is not None:
        low = low_open
    if high_open is not None:
        high = high_open
    if low is None and high is None:
        finite = "a number or an infinity" if rules.get("infinite") else "a finite number"
        return finite if kind is float else noun
    if high is None:
        return f"{noun} {'>' if low_open is not None else '>='} {low:,}"
    if low is None:
        return f"{noun} {'<' if high_open is not None else '<='} {high:,}"
    return (f"{noun} in {'(' if low_open is not None else '['}{low:,}, {high:,}"
            f"{')' if high_open is not None else ']'}")


def valid(value: Any, kind: type, rules: Mapping[str, Any]) -> bool:
    """Whether ``value`` is a ``kind`` within ``rules``."""
    kind, nullable = optional(kind)
    if value is None:
        return nullable
    if kind == FLOATS:
        return isinstance(value, (tuple, list)) and all(valid(v, float, {}) for v in value)
    if kind == SIZES:
        return (isinstance(value, (tuple, list)) and 1 <= len(value) <= rules["max_len"]
                and all(valid(v, int, rules) for v in value))
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return (isinstance(value, str) and (not rules.get("choices") or value in rules["choices"])
                and (rules.get("max_len") is None or len(value) <= rules["max_len"]))
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    if kind is float and (math.isnan(value) or (math.isinf(value) and not rules.get("infinite"))):
        return False
    return all(compare(value, rules[key]) for key, compare in BOUNDS.items()
               if rules.get(key) is not None)


def check_value(name: str, value: Any, kind: type, rules: Mapping[str, Any]) -> None:
    """Raise :class:`CapsNetError` unless ``value`` is a ``kind`` within ``rules``."""
    if not valid(value, kind, rules):
        raise CapsNetError(f"{name} must be {requirement(kind, rules)}, got {short(value)}")


def check_settings(instance: Any) -> None:
    """Check every field of a settings dataclass instance; see :func:`check_value`."""
    for f, kind in setting_fields(type(instance)):
        check_value(f.name, getattr(instance, f.name), kind, f.metadata)


def settings_from_dict(cls: type, data: Any, what: str) -> Any:
    """Build settings class ``cls`` from stored ``data`` (untrusted): it must be a dict of
    known names, naming every ``required`` one; a missing name takes what the code meant
    before the field existed (its ``before``, else its default); values are checked as flags
    are."""
    if not isinstance(data, dict):
        raise CapsNetError(f"{what} must be a dict of settings, got {short(data)}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # from JSON
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise CapsNetError(f"{what}: unknown settings {short(', '.join(unknown))}")
    missing = [f.name for f in fields(cls) if f.metadata.get("required") and f.name not in data]
    if missing:
        raise CapsNetError(f"{what}: missing {', '.join(missing)}")
    older = {f.name: f.metadata["before"] for f in fields(cls) if f.name not in data}
    return cls(**older, **data)


def defaults(cls: type) -> dict[str, Any]:
    """Default value of every field of settings class ``cls``."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
