"""Command-line helpers: the parser that reports errors in one line, argument types, and
flags generated from the fields of a settings dataclass (help, bounds, choices)."""

from __future__ import annotations

import argparse
from dataclasses import Field
from typing import Any, Callable

from ..errors import CapsNetError
from ..utils.settings import requirement, setting_fields, valid

EXIT_USAGE = 2  # bad input: the exit code of every refusal


def printable(message: str) -> str:
    """``message`` with control characters escaped (a file name may hold a newline)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors in one line, with our exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        raise CapsNetError(f"{command}: {message}" if command else message)


def bounded(kind: type, rules: dict[str, Any]) -> Callable[[str], Any]:
    """An argparse type for an int or float obeying ``rules`` (see capsnet.utils.settings)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not valid(value, kind, rules):
            raise argparse.ArgumentTypeError(f"expected {requirement(kind, rules)}, got {text!r}")
        return value

    return parse


positive_int = bounded(int, {"min": 1})
non_negative_int = bounded(int, {"min": 0})
port_number = bounded(int, {"min": 0, "max": 65535})


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_settings(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of settings class ``cls`` (``--batch-size`` for ``batch_size``),
    with its help text and rules; every default is None, so unset flags leave the preset's
    value. Booleans get ``--name`` and ``--no-name``."""
    group = parser.add_argument_group(cls.__name__)
    for f, kind in setting_fields(cls):
        rules = f.metadata
        if not rules.get("flag", True) or f.name in skip:
            continue
        help_text = rules["help"] + (" (--resume may change it)" if rules.get("resume") else "")
        if kind is bool:
            group.add_argument(flag(f), action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif rules.get("choices"):
            group.add_argument(flag(f), choices=rules["choices"], default=None, help=help_text)
        elif kind is str:
            group.add_argument(flag(f), default=None, help=help_text)
        else:
            group.add_argument(flag(f), type=bounded(kind, rules), default=None,
                               metavar=kind.__name__.upper(), help=help_text)


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f, _ in setting_fields(cls)
            if f.metadata.get("flag", True) and getattr(args, f.name, None) is not None}
