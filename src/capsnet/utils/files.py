"""Writing files so that a crash never leaves a half-written one: temp file, fsync, rename."""

from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CapsNetError


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/capsnet`` or ``~/.cache/capsnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsnet"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The bytes go to ``.NAME.<pid>.<random>.tmp`` in the same folder, are synced, and the
    temporary file is renamed over ``path``. The file gets the usual permissions (0666 less
    the umask). Raises :class:`OSError`; the temporary file is removed on any failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_or_fail(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write_bytes`, reporting a failure as one :class:`CapsNetError` line."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise CapsNetError(f"could not write {path}: {exc.strerror or exc}") from None


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a ``folder`` that could not be created or written in: an
    existing file in its way, a read-only place. Nothing is left behind by the check."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        blocker = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise CapsNetError(f"{what} {folder} {blocker}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".capsnet-write-check-", dir=existing))
    except OSError as exc:
        raise CapsNetError(f"{what} {folder}: cannot write in {existing} "
                           f"({exc.strerror or exc})") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON, written atomically; failures as one :class:`CapsNetError` line."""
    write_or_fail(path, (json.dumps(data, indent=2) + "\n").encode())


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render a matplotlib ``Figure`` to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_or_fail(path, buffer.getvalue())
    return Path(path)
