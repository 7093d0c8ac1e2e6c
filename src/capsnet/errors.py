"""The one exception type that the command line turns into a one-line message, and the
boundary that turns whatever a library raises on bad input into it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class CapsNetError(Exception):
    """A problem the user can fix: bad input, missing data, a foreign checkpoint."""


def error_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as one line of a message, at most ``limit`` characters: its first line (the
    next one when the first is a heading ending in ":", as torch's load_state_dict writes),
    after its type unless the text says enough alone (ours, RuntimeError, any OSError)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if isinstance(exc, (CapsNetError, OSError)) or type(exc) is RuntimeError:
        return line[:limit]
    return f"{type(exc).__name__}: {line}"[:limit]


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
        raise CapsNetError(f"{source}: not a valid {what} ({error_line(exc, 150)})") from None
