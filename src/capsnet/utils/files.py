"""Files as capsnet writes and reads them: written so that a crash never leaves a
half-written one (temp file, fsync, rename) and only ever over a regular file; read only
when a regular file, and no more than a bound; and where the cache is."""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CapsNetError


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/capsnet``, else ``~/.cache/capsnet``, where ``~`` is ``$HOME`` or,
    when HOME is unset or empty, this user's home in the password database (an empty HOME
    must not put the cache in ``/.cache``). A relative path in either variable is refused
    with one :class:`CapsNetError` line naming it: the cache would move with the current
    folder."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return absolute_setting("XDG_CACHE_HOME", xdg) / "capsnet"
    home = os.environ.get("HOME") or account_home()
    return absolute_setting("HOME", home) / ".cache" / "capsnet"


def account_home() -> str:
    """This user's home folder in the password database; empty when it names none."""
    try:
        import pwd  # POSIX only
        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return ""


def absolute_setting(name: str, value: str) -> Path:
    """``value`` of environment variable ``name`` as a path, refused unless absolute."""
    if not os.path.isabs(value):
        shown = (f"{value!r}, not an absolute path" if value
                 else "empty (and the password database names no home)")
        instead = " (or XDG_CACHE_HOME)" if name == "HOME" else ""
        raise CapsNetError(f"{name} is {shown}, so capsnet has no cache folder; set {name}"
                           f"{instead} to an absolute folder, or pass --data-dir FOLDER (or set "
                           f"CAPSNET_DATA_DIR)")
    return Path(value)


def write_to_cache(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write_bytes` into the cache; a cache folder that cannot be written (read
    only, full) is one :class:`CapsNetError` line naming it and the ways around it."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        folder = Path(path).parent
        raise CapsNetError(f"could not write the cache folder {folder} ({exc.strerror or exc}); "
                           f"set XDG_CACHE_HOME to a folder you can write, or put the files in a "
                           f"folder and pass --data-dir FOLDER (or set CAPSNET_DATA_DIR)") from None


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISREG, "a regular file"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise :class:`OSError` (EEXIST) unless ``path`` is free or a regular file: a folder, a
    FIFO, a device or a socket there, or a symbolic link to one, is never replaced. A link
    to a regular file (or a dangling one) is replaced by the new file, and what it pointed
    to is left as it was: a write never reaches outside ``path``'s folder."""
    try:
        mode = os.stat(path).st_mode  # follows a symbolic link: /dev/null behind a link counts
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OSError(errno.EEXIST, f"it is {file_kind(mode)}, not a regular file, and only "
                                    f"a regular file is ever replaced", str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The bytes go to ``.NAME.<pid>.<random>.tmp`` in the same folder, are synced, and the
    temporary file is renamed over ``path``, which must be free or a regular file (see
    :func:`check_replaceable`). The file gets the usual permissions (0666 less the umask).
    Raises :class:`OSError`; the temporary file is removed on any failure.
    """
    path = Path(path)
    check_replaceable(path)
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


def open_regular(path: str | os.PathLike, what: str) -> io.BufferedReader:
    """``path`` opened for reading, when it is a regular file (or a symbolic link to one).
    Anything else is one :class:`CapsNetError` line naming it and what it is, without
    waiting on a FIFO or reading a device. A missing file raises FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CapsNetError(f"{path}: the {what} is {file_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, what: str, limit: int) -> bytes | None:
    """The bytes of regular file ``path`` (see :func:`open_regular`), at most ``limit`` of
    them: a larger file is refused in one line. None when there is no such file."""
    try:
        f = open_regular(path, what)
    except FileNotFoundError:
        return None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            # at most limit + 1 bytes, whatever its size said: it may grow while it is read
            data = f.read(limit + 1) if size <= limit else b""
        except OSError as exc:
            raise CapsNetError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if size > limit or len(data) > limit:
        raise CapsNetError(f"{path}: the {what} is larger than {limit:,} bytes; that is not a "
                           f"file capsnet wrote")
    return data


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (through symbolic or hard
    links), or, where one does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON, written atomically; failures as one :class:`CapsNetError` line."""
    write_or_fail(path, (json.dumps(data, indent=2) + "\n").encode())


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render a matplotlib ``Figure`` to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_or_fail(path, buffer.getvalue())
    return Path(path)
