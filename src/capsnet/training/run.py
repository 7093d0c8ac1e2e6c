"""A run folder and the one object that knows its files: :class:`Run`.

    config.json      the resolved TrainConfig, the model config and the task
    metrics.jsonl    one JSON line per epoch (TensorBoard event files too, when installed)
    last.pt          the latest state, enough to resume exactly
    best.pt          the weights with the best value of the task's validation metric
    summary.json     test results of best.pt, wall time, speed, machine and date
    train.pid        the process training in the folder, while it does (``capsnet train``
                     and ``capsnet experiment`` write it; one killed leaves it, stale)
    train.log        the output of a run started with ``capsnet train --detach``
    figures/         what ``--figures`` and the experiments draw

An experiment of several models (affnist) keeps one run per model in a subfolder
(:meth:`Run.part`) and its own config.json and summary.json above them. Only the main
process writes (rank 0 under ``torchrun``); every process reads. Every file is untrusted
when read: checkpoints are checked by :func:`~capsnet.training.checkpoint.load_checkpoint`,
JSON files must be objects, and a metrics line that is not a record is skipped and counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import CapsNetError, reading
from ..utils.checkpoint_file import RUN_CHECKPOINTS
from ..utils.files import atomic_write_bytes, write_json, write_or_fail
from .checkpoint import load_checkpoint, progress_of, save_checkpoint
from .config import TrainConfig

NUMBERS = ("val_accuracy", "images_per_s", "epoch_seconds", "wall_seconds")  # read when there


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
        self.log_file = self.folder / "train.log"
        self.figures = self.folder / "figures"

    def part(self, name: str) -> "Run":
        """The run of one model of an experiment of several, in a subfolder."""
        return Run(self.folder / name, main=self.main)

    def parts(self) -> list["Run"]:
        """The runs in subfolders (each with its config.json), by name."""
        return [Run(path.parent, main=self.main)
                for path in sorted(self.folder.glob(f"*/{self.config_file.name}"))]

    def holds_run(self) -> bool:
        """Whether a run was trained here, or in a subfolder: a new one must go elsewhere."""
        return (self.last.exists() or self.summary_file.exists()
                or any(part.last.exists() for part in self.parts()))

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, from_best: bool = False) -> Path:
        return self.best if from_best else self.last

    def resume_point(self, from_best: bool = False) -> dict[str, Any]:
        """The checkpoint a resumed run continues from: ``last.pt``, or ``best.pt`` with
        ``from_best``. A damaged last.pt is refused with a pointer to an intact best.pt."""
        path = self.checkpoint(from_best)
        if not path.is_file():
            raise CapsNetError(f"--resume {self.folder}: no {path.name} there to resume from")
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
        if self.last.exists():
            raise CapsNetError(f"{self.folder} already holds a run; resume it or start a new "
                               f"one elsewhere")

    def set_last_aside(self) -> None:
        """Rename last.pt to ``last.<date-time>.pt`` (resuming from best.pt replaces it), so
        nothing is lost."""
        path = self.last
        if self.main and path.exists():
            aside = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            try:
                path.rename(aside)
            except OSError as exc:
                raise CapsNetError(f"could not rename {path} aside: {exc.strerror or exc}") from None

    def save(self, payload: dict[str, Any], *, best: bool = False) -> Path:
        """Write last.pt (``best``: best.pt)."""
        path = self.checkpoint(best)
        if self.main:
            save_checkpoint(path, payload)
        return path

    def load_best(self) -> dict[str, Any]:
        return load_checkpoint(self.best)

    # -- records ---------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            write_json(self.config_file, config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main:
            write_json(self.summary_file, summary)

    def metrics_log(self, keep_steps: int) -> "MetricsLog | None":
        """The log training appends to, after dropping lines past step ``keep_steps`` (those
        the checkpoint resumed from does not contain); None where this process does not
        write."""
        return MetricsLog(self.folder, self.metrics_file, keep_steps) if self.main else None

    def read_config(self) -> dict[str, Any] | None:
        return read_object(self.config_file, f"run config ({self.config_file.name})")

    def read_summary(self) -> dict[str, Any] | None:
        return read_object(self.summary_file, f"run summary ({self.summary_file.name})")

    def read_metrics(self, curve: bool = False) -> tuple[list[dict[str, Any]], int]:
        """The usable per-epoch records of metrics.jsonl (``curve``: the training curve's
        points instead), and how many lines were skipped."""
        if not self.metrics_file.is_file():
            return [], 0
        return read_metrics(self.metrics_file, curve)

    # -- the training process --------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The process named in train.pid while it is alive; None without one."""
        try:
            text = self.pid_file.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        pid = int(text) if text.isdigit() and len(text) < 10 else 0
        return pid if pid > 0 and alive(pid) else None

    def check_free(self) -> None:
        """Refuse a folder another live process trains in: two would overwrite each other."""
        pid = self.running_pid()
        if pid is not None and pid != os.getpid():
            raise CapsNetError(f"{self.folder} is being trained by process {pid} (capsnet "
                               f"status {self.folder}); wait for it, or stop it with kill -INT "
                               f"{pid}")

    def record_pid(self, pid: int) -> None:
        write_or_fail(self.pid_file, f"{pid}\n".encode())

    def forget_pid(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    @contextmanager
    def training_here(self) -> Iterator[None]:
        """Record this process in train.pid while it trains here, then remove it (and the
        folder, if this call made it and left it empty). Under torchrun, rank 0 speaks for
        every rank."""
        if not self.main:
            yield
            return
        self.check_free()
        made = not self.folder.exists()
        self.record_pid(os.getpid())
        try:
            yield
        finally:
            try:
                if self.pid_file.read_text().strip() == str(os.getpid()):
                    self.pid_file.unlink()
                if made:
                    self.folder.rmdir()  # only when empty: training failed before writing anything
            except OSError:
                pass


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
        # After a resume, drop the lines of steps the checkpoint does not contain.
        if self.path.exists():
            lines = [line for line in self.path.read_text(errors="replace").splitlines()
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
                if key not in ("epoch", "step") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{key}", value, record["step"])
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
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not usable(record):
            skipped += 1
        elif is_curve_point(record) == curve:
            records.append(record)
    return records, skipped


def read_object(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is no such file."""
    if not path.is_file():
        return None
    with reading(path, what):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise CapsNetError(f"{path}: not a valid {what} (not a JSON object)")
    return data
