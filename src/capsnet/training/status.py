"""What a run folder says about its run, read without changing anything: running (the
process in ``train.pid`` is alive), finished (``summary.json``) or stopped; how far it got,
how fast, and how long it has left. Also the record of the process training in a folder.

    train.pid    the process training in the folder, while it does (``capsnet train`` and
                 ``capsnet experiment`` write it; one killed leaves it, stale)
    train.log    the output of a run started with ``capsnet train --detach``

Every file is untrusted: config.json or summary.json that is not a JSON object of valid
settings is refused in one line; a metrics.jsonl line that is not a record (torn by a
crash, or with a value of the wrong type) is skipped and counted, as training and the
figures skip it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import CapsNetError, reading
from ..utils.files import write_or_fail
from .config import TrainConfig

PID_FILE = "train.pid"
LOG_FILE = "train.log"
NUMBERS = ("val_accuracy", "images_per_s", "epoch_seconds", "wall_seconds")  # read when there
TAIL_BYTES = 4096  # of train.log, for its last line


# -- the training process ---------------------------------------------------------------

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


def running_pid(run_dir: Path) -> int | None:
    """The process named in ``run_dir/train.pid`` while it is alive; None without one."""
    try:
        text = (run_dir / PID_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    pid = int(text) if text.isdigit() and len(text) < 10 else 0
    return pid if pid > 0 and alive(pid) else None


def check_free(run_dir: Path) -> None:
    """Refuse a folder another live process trains in: two would overwrite each other."""
    pid = running_pid(run_dir)
    if pid is not None and pid != os.getpid():
        raise CapsNetError(f"{run_dir} is being trained by process {pid} (capsnet status "
                           f"{run_dir}); wait for it, or stop it with kill -INT {pid}")


def record_pid(run_dir: Path, pid: int) -> None:
    write_or_fail(run_dir / PID_FILE, f"{pid}\n".encode())


@contextmanager
def training_here(run_dir: Path) -> Iterator[None]:
    """Record this process in ``run_dir/train.pid`` while it trains there, then remove it
    (and the folder, if this call made it and left it empty). Under torchrun, rank 0
    speaks for every rank."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    check_free(run_dir)
    made = not run_dir.exists()
    record_pid(run_dir, os.getpid())
    try:
        yield
    finally:
        path = run_dir / PID_FILE
        try:
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
            if made:
                run_dir.rmdir()  # only when empty: training failed before writing anything
        except OSError:
            pass


# -- reading a run folder ---------------------------------------------------------------

def finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def usable(record: Any) -> bool:
    """A metrics record with a whole epoch and step, and finite numbers where status and
    the figures read them."""
    return (isinstance(record, dict) and isinstance(record.get("epoch"), int)
            and isinstance(record.get("step"), int) and record["epoch"] >= 1
            and all(finite(record[key]) for key in NUMBERS if key in record))


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a run's metrics.jsonl, and how many lines were skipped."""
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if usable(record):
            records.append(record)
        else:
            skipped += 1
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


def number(data: dict[str, Any] | None, key: str) -> float | None:
    """``data[key]`` when it is a finite number (files are untrusted)."""
    value = (data or {}).get(key)
    return value if finite(value) else None


def text(data: dict[str, Any] | None, key: str) -> str | None:
    """``data[key]`` on one line when it is a string."""
    value = (data or {}).get(key)
    return " ".join(value.split()) if isinstance(value, str) else None


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def last_line(path: Path) -> str | None:
    """The last line of a log (progress bars end theirs with carriage returns)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - TAIL_BYTES, 0))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else None


def task_name(config: dict[str, Any] | None) -> str:
    task = (config or {}).get("task")
    name = task.get("name") if isinstance(task, dict) else None
    return name if isinstance(name, str) else "classification"


def home_folder(run_dir: Path, config: dict[str, Any] | None) -> Path:
    """The folder the run is trained and resumed from: its own, or for one model of an
    experiment of several (affnist), the experiment's folder above it."""
    nested = task_name(config) != "classification" and (run_dir.parent / "config.json").is_file()
    return run_dir.parent if nested else run_dir


def resume_command(home: Path, config: dict[str, Any] | None) -> str:
    """``capsnet train --resume HOME``, or the experiment's command."""
    name = task_name(config)
    command = ("capsnet train" if name == "classification"
               else f"capsnet experiment {shlex.quote(name)}")  # the name is untrusted too
    return f"{command} --resume {shlex.quote(str(home))}"


def training_settings(run_dir: Path, config: dict[str, Any] | None) -> TrainConfig | None:
    """The settings in config.json; a folder of an experiment's runs is refused with them
    named."""
    if config is None:
        return None
    if "task" not in config and "experiment" in config:
        runs = sorted(str(p.parent) for p in run_dir.glob("*/config.json"))
        raise CapsNetError(f"{run_dir}: holds an experiment of several runs; ask for one of "
                           f"them: {', '.join(runs) or 'none has started yet'}")
    try:
        return TrainConfig.from_dict(config.get("train"))
    except CapsNetError as exc:
        raise CapsNetError(f"{run_dir / 'config.json'}: {exc}") from None


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``capsnet status`` says about the run in ``run_dir``, as one JSON-able dict."""
    if not run_dir.is_dir():
        raise CapsNetError(f"{run_dir}: no such run folder")
    now = time.time() if now is None else now
    config = read_object(run_dir / "config.json", "run config (config.json)")
    settings = training_settings(run_dir, config)
    summary = read_object(run_dir / "summary.json", "run summary (summary.json)")
    metrics = run_dir / "metrics.jsonl"
    records, skipped = read_metrics(metrics) if metrics.is_file() else ([], 0)
    home = home_folder(run_dir, config)
    pid = running_pid(home)
    if settings is None and pid is None:
        raise CapsNetError(f"{run_dir}: no run there (no config.json, and no training process)")
    last = records[-1] if records else {}
    epoch = last.get("epoch", 0)
    finished = pid is None and summary is not None and number(summary, "epochs") == epoch
    state = "running" if pid is not None else "finished" if finished else "stopped"
    status = {"run_dir": str(run_dir), "state": state, "pid": pid, "epoch": epoch,
              "epochs": settings.epochs if settings else None, "step": last.get("step", 0),
              **accuracies(records),
              "train_images_per_s": number(summary if finished else last,
                                           "train_images_per_s" if finished else "images_per_s"),
              "time_limit": (settings.time_limit or None) if settings else None,
              "stop_at": (settings.stop_at or None) if settings else None,
              "test_accuracy": number(summary, "test_accuracy") if finished else None,
              "cut_short": text(summary, "cut_short") if finished else None,
              "skipped_metrics_lines": skipped}
    status["steps"] = (round(status["step"] / epoch * status["epochs"])
                       if epoch and status["epochs"] else None)
    started = mtime(home / PID_FILE) if pid is not None else None  # this call's start
    status.update(timing(records, summary if finished else None, settings, now, started,
                         mtime(metrics)))
    status["resume_command"] = (resume_command(home, config)
                                if state != "running" and unfinished(status) else None)
    log = home / LOG_FILE
    status["log"] = str(log) if log.is_file() else None
    status["last_log_line"] = last_line(log) if state == "stopped" and log.is_file() else None
    return status


def accuracies(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last and the best validation accuracy, and the epoch of the best."""
    scored = [(r["val_accuracy"], r["epoch"]) for r in records if "val_accuracy" in r]
    best = max(scored, key=lambda s: s[0], default=(None, None))
    return {"last_val_accuracy": scored[-1][0] if scored else None,
            "best_val_accuracy": best[0], "best_epoch": best[1]}


def unfinished(status: dict[str, Any]) -> bool:
    """Epochs are left, and the validation accuracy has not reached stop_at."""
    target, reached = status["stop_at"], status["last_val_accuracy"]
    return (status["epochs"] is None or status["epoch"] < status["epochs"]) and not (
        target and reached is not None and reached >= target)


def timing(records: list[dict[str, Any]], summary: dict[str, Any] | None,
           settings: TrainConfig | None, now: float, started: float | None,
           written: float | None) -> dict[str, Any]:
    """Wall time so far and an estimate of the time left: the epochs to go at the average
    epoch so far, less the current epoch's part; while running (since ``started``; the last
    epoch ``written``), no further than this call's time limit allows. A stopped run's
    estimate is what resuming it would take."""
    if summary is not None:
        return {"wall_seconds": number(summary, "wall_seconds"), "seconds_left": 0.0}
    last = records[-1] if records else {}
    wall = number(last, "wall_seconds")  # older records lack it: their training time
    wall = wall if wall is not None else sum(r.get("epoch_seconds", 0) for r in records)
    per_epoch = wall / last["epoch"] if last else None
    left = ((settings.epochs - last["epoch"]) * per_epoch
            if per_epoch is not None and settings else None)
    if started is not None:
        current = now - max(started, written or started)
        wall += current
        if left is not None:
            left = max(left - current, 0.0)
        if settings is not None and settings.time_limit:
            limit_left = max(settings.time_limit - (now - started), 0.0)
            left = limit_left if left is None else min(left, limit_left)
    return {"wall_seconds": wall, "seconds_left": left}


def duration(seconds: float) -> str:
    """``1 h 2 min 3 s``, ``4 min 5 s``, ``6 s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes or hours)
    return " ".join(parts + [f"{seconds} s"])
