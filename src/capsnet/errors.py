"""The one exception type that the command line turns into a one-line message, and the
boundary that turns whatever a library raises on bad input into it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class CapsNetError(Exception):
    """A problem the user can fix: bad input, missing data, a foreign checkpoint."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s first line, after its type unless it is a plain RuntimeError or OSError."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if type(exc) in (RuntimeError, OSError):
        return lines[0][:limit]
    return f"{type(exc).__name__}: {lines[0]}"[:limit]


@contextmanager
def reading(source: object, what: str) -> Iterator[None]:
    """Whatever fails while reading user-supplied ``source`` (a file, a stored config) becomes
    one :class:`CapsNetError` line ``SOURCE: not a valid WHAT (reason)``: parsers of hostile
    bytes (numpy, Pillow, scipy, torch) raise any exception type."""
    try:
        yield
    except CapsNetError:
        raise
    except MemoryError:
        raise CapsNetError(f"{source}: not a valid {what} (it asks for more memory than there "
                           f"is)") from None
    except Exception as exc:  # noqa: BLE001 - this is the boundary
        raise CapsNetError(f"{source}: not a valid {what} ({first_line(exc, 150)})") from None
