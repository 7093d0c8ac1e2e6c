"""A run folder and the one object that knows its files: :class:`Run`.

    config.json      the resolved TrainConfig, the model config and the task
    metrics.jsonl    one JSON line per epoch (TensorBoard event files too, when installed)
    last.pt          the latest state, enough to resume exactly
    best.pt          the weights with the best value of the task's validation metric
    summary.json     test results of best.pt, wall time, speed, machine and date
    train.pid        the process training in the folder, while it does (``capsnet train``
                     and ``capsnet experiment`` write it; one killed leaves it, stale)
    train.lock       locked by that process for its whole life: one process per folder
                     (removed when it ends; one killed leaves it, unlocked)
    train.log        the output of a run started with ``capsnet train --detach``
    figures/         what ``--figures`` and the experiments draw

An experiment of several models (affnist) keeps one run per model in a subfolder
(:meth:`Run.part`) and its own config.json and summary.json above them. Only the main
process writes (rank 0 under ``torchrun``); every process reads. A folder holding any of
these (but the lock) is someone's run: a new run refuses it. Every file is untrusted when
read: it must be a regular file (a FIFO, a folder or a link to a device is refused in one
line, never read), no larger than such a file can be; checkpoints are checked by
:func:`~capsnet.training.checkpoint.load_checkpoint`, JSON files must be objects, and a
metrics line that is not a record is skipped and counted.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import stat
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from ..errors import CapsNetError, reading
from ..nn.pretrained import WEIGHTS
from ..utils.checkpoint_file import RUN_CHECKPOINTS
from ..utils.device import check_fits_in_memory
from ..utils.files import (atomic_write_bytes, file_kind, read_regular, write_json,
                           write_or_fail)
from .checkpoint import load_checkpoint, progress_of, save_checkpoint
from .config import TrainConfig

NUMBERS = ("val_accuracy", "images_per_s", "epoch_seconds", "wall_seconds")  # read when there
# What capsnet writes in a run folder (model.safetensors: a run shipped with save_pretrained)
RUN_FILES = ("config.json", "metrics.jsonl", *RUN_CHECKPOINTS, "summary.json", "train.pid",
             "train.log", WEIGHTS)
RUN_FOLDERS = ("figures", "tensorboard")
# What a training writes before its first checkpoint
BEFORE_CHECKPOINTS = ("config.json", "metrics.jsonl", "train.log", "train.pid", "tensorboard")
LOCK_FILE = "train.lock"
LOCK_FD_VARIABLE = "CAPSNET_RUN_LOCK"  # how capsnet train --detach hands its lock to the training
JSON_LIMIT = 16 * 2**20      # config.json and summary.json are a few kB
METRICS_LIMIT = 256 * 2**20  # a line per epoch and per curve point: well under 1 MB a run
PID_LIMIT = 64


class Run:
    """The run in ``folder``. ``main``: whether this process writes (default: it is not a
    ``torchrun`` rank other than 0)."""

    def __init__(self, folder: str | Path, *, main: bool | None = None) -> None:
        self.folder = Path(folder)
        self.main = os.environ.get("RANK", "0") == "0" if main is None else main
        self.config_file = self.folder / "config.json"
        self.metrics_file = self.folder / "metrics.jsonl"
        # named in the checkpoint layer, which reads a run folder as its best.pt, else last.pt
        self.best, self.last = (self.folder / name for name in RUN_CHECKPOINTS)
        self.summary_file = self.folder / "summary.json"
        self.pid_file = self.folder / "train.pid"
        self.lock_file = self.folder / LOCK_FILE
        self.log_file = self.folder / "train.log"
        self.figures = self.folder / "figures"
        self.aside_pending = False  # last.pt is to be renamed aside before the first write

    def part(self, name: str) -> "Run":
        """The run of one model of an experiment of several, in a subfolder."""
        return Run(self.folder / name, main=self.main)

    def parts(self) -> list["Run"]:
        """The runs in subfolders (each with its config.json), by name."""
        return [Run(path.parent, main=self.main)
                for path in sorted(self.folder.glob(f"*/{self.config_file.name}"))]

    def own_entries(self) -> list[str]:
        """The names of what capsnet writes that are in this folder (but the lock, which
        holds nothing)."""
        return sorted(name for name in listing(self.folder) if is_run_entry(name))

    def run_entries(self) -> list[str]:
        """What capsnet writes that is here or in a subfolder (an experiment's runs), as
        paths relative to this folder."""
        return [*self.own_entries(), *(f"{sub.name}/{name}" for sub in subfolders(self.folder)
                                       for name in Run(sub).own_entries())]

    def killed_before_saving(self, entries: list[str]) -> bool:
        """Whether ``entries`` are what a training killed before its first checkpoint
        leaves: its train.pid, naming a process that has ended, and besides it only
        :data:`BEFORE_CHECKPOINTS` and half-written checkpoints. Nothing of that can be
        resumed: the same command starts the run over."""
        record = (read_regular(self.pid_file, "process record", PID_LIMIT) or b"").strip()
        return (record.isdigit() and self.running_pid() is None
                and all(name in BEFORE_CHECKPOINTS or is_temporary(name) for name in entries))

    def check_unused(self) -> None:
        """Refuse a folder that holds someone's run: a new run must go elsewhere."""
        entries = self.run_entries()
        if not entries or self.killed_before_saving(entries):
            return
        names = [Path(entry).name for entry in entries]
        shown = next((e for e, n in zip(entries, names) if n in RUN_CHECKPOINTS), entries[0])
        way = (f"use --resume {self.folder} to continue it" if self.last.name in names
               else f"use --resume {self.folder} --from-best to continue it"
               if self.best.name in names else "it has nothing to resume")
        raise CapsNetError(f"{self.folder} already holds a run ({shown} is there); {way}, or "
                           f"--run-dir to start a new one elsewhere")

    def check_entries(self) -> None:
        """Refuse run files, here and in subfolders, that are not regular files (a FIFO, a
        folder, a link to a device): reading one would hang or fail, and writing one would
        replace it."""
        for folder in (self.folder, *subfolders(self.folder)):
            for name in RUN_FILES:
                regular_size(folder / name)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, from_best: bool = False) -> Path:
        return self.best if from_best else self.last

    def resume_point(self, from_best: bool = False) -> dict[str, Any]:
        """The checkpoint a resumed run continues from: ``last.pt``, or ``best.pt`` with
        ``from_best``. A damaged last.pt is refused with a pointer to an intact best.pt."""
        path = self.checkpoint(from_best)
        size = regular_size(path)
        if size is None:
            raise CapsNetError(f"--resume {self.folder}: no {path.name} there to resume from")
        check_fits_in_memory(size, f"{path}: reading it")
        try:
            return load_checkpoint(path, resumable=True)
        except CapsNetError as exc:
            if from_best or not self.best.is_file():
                raise
            try:
                epoch = progress_of(load_checkpoint(self.best, resumable=True), self.best).epoch
            except CapsNetError:
                raise exc from None
            raise CapsNetError(f"{exc}; {self.best.name} (after epoch {epoch}) is intact: add "
                               f"--from-best to continue from it ({self.last.name} is kept, "
                               f"renamed)") from None

    def saved_config(self, from_best: bool = False) -> TrainConfig:
        """The training settings of the run."""
        return TrainConfig.from_dict(self.resume_point(from_best)["train_config"])

    def check_new(self) -> None:
        """Refuse to start a run over one that has checkpoints."""
        found = next((p.name for p in (self.last, self.best) if os.path.lexists(p)), None)
        if found is not None:
            raise CapsNetError(f"{self.folder} already holds a run ({found} is there); resume "
                               f"it or start a new one elsewhere")

    def set_last_aside(self) -> None:
        """Have last.pt renamed ``last.<date-time>.pt`` (resuming from best.pt replaces it) at
        this run's first write: nothing is lost, and a command that stops before writing
        leaves it where it was."""
        self.aside_pending = self.main and os.path.lexists(self.last)

    def before_writing(self) -> None:
        """What must happen before this run writes anything: last.pt set aside, if asked."""
        if not self.aside_pending:
            return
        self.aside_pending = False
        stamp = time.strftime("%Y%m%d-%H%M%S")
        names = (f"last.{stamp}{'' if n == 1 else f'-{n}'}.pt" for n in itertools.count(1))
        aside = next(self.folder / name for name in names
                     if not os.path.lexists(self.folder / name))
        try:
            self.last.rename(aside)
        except OSError as exc:
            raise CapsNetError(f"could not rename {self.last} aside: {exc.strerror or exc}") from None

    def save(self, payload: dict[str, Any], *, best: bool = False) -> Path:
        """Write last.pt (``best``: best.pt)."""
        path = self.checkpoint(best)
        if self.main:
            self.before_writing()
            save_checkpoint(path, payload)
        return path

    def load_best(self) -> dict[str, Any]:
        return load_checkpoint(self.best)

    # -- records ---------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            self.before_writing()
            write_json(self.config_file, config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main:
            self.before_writing()
            write_json(self.summary_file, summary)

    def metrics_log(self, keep_steps: int) -> "MetricsLog | None":
        """The log training appends to, after dropping lines past step ``keep_steps`` (those
        the checkpoint resumed from does not contain); None where this process does not
        write."""
        if not self.main:
            return None
        self.before_writing()
        return MetricsLog(self.folder, self.metrics_file, keep_steps)

    def read_config(self) -> dict[str, Any] | None:
        return read_object(self.config_file, f"run config ({self.config_file.name})")

    def read_summary(self) -> dict[str, Any] | None:
        return read_object(self.summary_file, f"run summary ({self.summary_file.name})")

    def read_metrics(self, curve: bool = False) -> tuple[list[dict[str, Any]], int]:
        """The usable per-epoch records of metrics.jsonl (``curve``: the training curve's
        points instead), and how many lines were skipped."""
        return read_metrics(self.metrics_file, curve)

    def split_metrics(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """metrics.jsonl's per-epoch records, curve points and skipped lines, read once."""
        return split_metrics(self.metrics_file)

    # -- the training process --------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The process named in train.pid while it is alive; None without one."""
        data = read_regular(self.pid_file, "process record", PID_LIMIT)
        text = (data or b"").decode(errors="replace").strip()
        pid = int(text) if text.isdigit() and len(text) < 10 else 0
        return pid if pid > 0 and alive(pid) else None

    def busy(self, pid: int | None) -> CapsNetError:
        """The refusal of a folder process ``pid`` (None: an unnamed one) trains in."""
        if pid is None:
            return CapsNetError(f"{self.folder} is being trained by another process (capsnet "
                                f"status {self.folder}); wait for it to end")
        return CapsNetError(f"{self.folder} is being trained by process {pid} (capsnet status "
                            f"{self.folder}); wait for it, or stop it with kill -INT {pid}")

    def check_free(self) -> None:
        """Refuse a folder another live process trains in, as its train.pid says (a process
        of an older capsnet holds no lock): two would overwrite each other."""
        pid = self.running_pid()
        if pid is not None and pid != os.getpid():
            raise self.busy(pid)

    def record_pid(self, pid: int) -> None:
        write_or_fail(self.pid_file, f"{pid}\n".encode())

    def forget_pid(self, pid: int) -> None:
        """Remove train.pid when it names process ``pid``."""
        with suppress(OSError, CapsNetError):
            data = read_regular(self.pid_file, "process record", PID_LIMIT)
            if data is not None and data.strip() == str(pid).encode():
                self.pid_file.unlink()

    def lock_passed_down(self) -> bool:
        """Whether this process was started holding the folder's lock: the training that
        ``capsnet train --detach`` starts, after checking the folder under that lock."""
        return passed_down(self.lock_file) is not None

    @contextmanager
    def claimed(self, *, new: bool) -> Iterator["FolderLock"]:
        """Hold this folder for the block, before anything is written in it: made when
        missing (and removed again if left empty), locked (one process per folder), and
        checked under the lock: no other process trains here, every run file is a regular
        file, and for a ``new`` run nothing of someone's run is here."""
        made = missing_folders(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CapsNetError(f"could not make the run folder {self.folder}: "
                               f"{exc.strerror or exc}") from None
        lock = FolderLock(self.lock_file)
        try:
            if not lock.acquire():
                raise self.busy(self.running_pid())
            self.check_free()
            self.check_entries()
            if new and not lock.passed_down:
                self.check_unused()
            yield lock
        finally:
            lock.release()
            for folder in made:  # deepest first; only empty ones go
                with suppress(OSError):
                    folder.rmdir()

    @contextmanager
    def training_here(self, *, new: bool = False) -> Iterator[None]:
        """Hold the folder (:meth:`claimed`) and record this process in train.pid while it
        trains here. Under torchrun, rank 0 speaks for every rank."""
        if not self.main:
            yield
            return
        with self.claimed(new=new):
            self.record_pid(os.getpid())
            try:
                yield
            finally:
                self.forget_pid(os.getpid())


class FolderLock:
    """The lock of a run folder: an exclusive ``flock`` on its train.lock, held for the life
    of the process (the kernel drops it however the process ends, so a killed run never
    blocks the next one, which takes the file over). Released normally, the file is removed
    while still locked, and a process that opened it meanwhile finds it gone and tries
    again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = passed_down(path)
        self.passed_down = self.fd is not None
        self.handed_over = False

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        if self.passed_down:
            os.environ.pop(LOCK_FD_VARIABLE, None)  # not for this process's own children
            os.set_inheritable(self.fd, False)
            return True
        for _ in range(3):  # each try may meet a file its holder has just removed
            fd = open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:
                os.close(fd)
                raise CapsNetError(f"{self.path}: cannot lock the run folder "
                                   f"({exc.strerror or exc})") from None
            if same_inode(fd, self.path):
                self.fd = fd
                return True
            os.close(fd)
        return False

    def hand_over(self) -> None:
        """Leave the lock file to the process this one passed the lock to."""
        self.handed_over = True

    def release(self) -> None:
        if self.fd is None:
            return
        if not self.handed_over and same_inode(self.fd, self.path):
            with suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file ``path``, made when missing; never a link or a FIFO."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        reason = "it is a symbolic link" if os.path.islink(path) else exc.strerror or exc
        raise CapsNetError(f"{path}: cannot use it as the run folder's lock ({reason})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CapsNetError(f"{path}: cannot use it as the run folder's lock (it is "
                           f"{file_kind(mode)})")
    return fd


def same_inode(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed) is the file open as ``fd``."""
    try:
        opened, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def passed_down(path: Path) -> int | None:
    """The descriptor of lock file ``path`` this process was started with (see
    :data:`LOCK_FD_VARIABLE`); None when it has none."""
    value = os.environ.get(LOCK_FD_VARIABLE, "")
    usable = value.isdigit() and len(value) < 10 and same_inode(int(value), path)
    return int(value) if usable else None


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file an atomic write of a run file left when it was killed."""
    prefixes = tuple(f".{run_file}." for run_file in RUN_FILES)
    return name.startswith(prefixes) and name.endswith(".tmp")


def is_run_entry(name: str) -> bool:
    """Whether ``name`` is something capsnet writes in a run folder."""
    set_aside = name.startswith("last.") and name.endswith(".pt")  # last.<date-time>.pt
    return name in RUN_FILES or name in RUN_FOLDERS or set_aside or is_temporary(name)


def listing(folder: Path) -> list[str]:
    """The names in ``folder``; none when it does not exist."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CapsNetError(f"{folder}: cannot list it ({exc.strerror or exc})") from None


def subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder`` (not links to folders elsewhere), by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CapsNetError(f"{folder}: cannot list it ({exc.strerror or exc})") from None


def regular_size(path: Path) -> int | None:
    """The size of run file ``path`` (a symbolic link is followed); None when there is none;
    one line when it is anything but a regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CapsNetError(f"{path}: it is {file_kind(info.st_mode)}, not a regular file; a run "
                           f"folder holds only files capsnet writes there")
    return info.st_size


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs and is a capsnet command: not a zombie, nor a pid the
    system gave to another program since."""
    if Path("/proc/self").is_dir():  # Linux says what the process is, not only that it exists
        proc = Path("/proc") / str(pid)
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            command = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and b"capsnet" in command
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's: the pid was reused
        return False
    return True


# -- metrics.jsonl and the JSON files -------------------------------------------------------

@contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError (disk full, read-only folder) while writing ``path`` into one line."""
    try:
        yield
    except OSError as exc:
        raise CapsNetError(f"could not write {path}: {exc.strerror or exc}; the checkpoints in "
                           f"{path.parent} were left as they were") from None


def step_of(line: str) -> float:
    """Global step of a metrics.jsonl line; infinity for a line torn by a crash (so it is
    dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Appends JSON lines to ``path``: one per epoch (a whole ``epoch``, with validation)
    and the training curve's points between (``epoch`` a fraction); mirrors them to
    TensorBoard (in ``folder``) when it is installed, at the global step."""

    def __init__(self, folder: Path, path: Path, keep_steps: int) -> None:
        self.path = path
        # After a resume, drop the lines of steps the checkpoint does not contain. The file
        # is written anew even when nothing is dropped: appends then go to a regular file
        # of this folder, never through a link.
        if os.path.lexists(self.path):
            text = (read_regular(self.path, "metrics log", METRICS_LIMIT) or b"").decode(
                errors="replace")
            lines = [line for line in text.splitlines()
                     if line.strip() and step_of(line) <= keep_steps]
            with reporting_write_errors(self.path):
                atomic_write_bytes(self.path, "".join(line + "\n" for line in lines).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with reporting_write_errors(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            group = "epoch" if isinstance(record["epoch"], int) else "steps"
            for key, value in record.items():
                if key not in ("epoch", "step", "unix_time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{key}", value, record["step"],
                                           walltime=record.get("unix_time"))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def usable(record: Any) -> bool:
    """A metrics record with a step and an epoch (whole for an epoch's record, a fraction
    for a point of the training curve), and finite numbers where status and the figures
    read them."""
    if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
        return False
    epoch = record.get("epoch")
    whole = isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1
    part = isinstance(epoch, float) and math.isfinite(epoch) and epoch >= 0
    return (whole or part) and all(finite(record[key]) for key in NUMBERS if key in record)


def is_curve_point(record: dict[str, Any]) -> bool:
    return not isinstance(record["epoch"], int)


def read_metrics(path: Path, curve: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The per-epoch records of a metrics.jsonl (``curve``: the training curve's points),
    and how many lines were skipped as unreadable."""
    epochs, points, skipped = split_metrics(path)
    return points if curve else epochs, skipped


def split_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """A metrics.jsonl read once: its per-epoch records, the training curve's points, and
    how many lines were skipped as unreadable."""
    epochs, points, skipped = [], [], 0
    data = read_regular(path, "metrics log", METRICS_LIMIT) or b""
    for line in data.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not usable(record):
            skipped += 1
        else:
            (points if is_curve_point(record) else epochs).append(record)
    return epochs, points, skipped


def read_object(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is no such file."""
    text = read_regular(path, what, JSON_LIMIT)
    if text is None:
        return None
    with reading(path, what):
        data = json.loads(text)
    if not isinstance(data, dict):
        raise CapsNetError(f"{path}: not a valid {what} (not a JSON object)")
    return data
