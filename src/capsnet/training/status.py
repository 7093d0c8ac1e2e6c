"""What a run folder says about its run, read through its
:class:`~capsnet.training.run.Run` without changing anything: running (the process in its
train.pid is alive), finished (its summary.json) or stopped; how far it got, how fast, and
how long it has left.

Every file is untrusted: a run file that is not a regular file (a FIFO, a folder, a link
to a device) or config.json or summary.json that is not a JSON object of valid settings is
refused in one line; a metrics.jsonl line that is not a record (torn by a crash, or with a
value of the wrong type) is skipped and counted, as training and the figures skip it.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from ..errors import CapsNetError
from ..utils.files import open_regular
from .config import TrainConfig
from .run import Run, finite

TAIL_BYTES = 4096  # of train.log, for its last line


# -- reading a run folder ---------------------------------------------------------------

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
    """The last line of a log (progress bars end theirs with carriage returns); None when
    there is none. A log that is not a regular file is refused in one line."""
    try:
        with open_regular(path, "training log") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - TAIL_BYTES, 0))
            tail = f.read(TAIL_BYTES).decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else None


def task_name(config: dict[str, Any] | None) -> str:
    task = (config or {}).get("task")
    name = task.get("name") if isinstance(task, dict) else None
    return name if isinstance(name, str) else "classification"


def home_run(run: Run, config: dict[str, Any] | None) -> Run:
    """The run trained and resumed as a whole: this one, or for one model of an experiment
    of several (affnist), the experiment's run above it."""
    above = Run(run.folder.parent)
    nested = task_name(config) != "classification" and above.config_file.is_file()
    return above if nested else run


def resume_command(home: Path, config: dict[str, Any] | None) -> str:
    """``capsnet train --resume HOME``, or the experiment's command."""
    name = task_name(config)
    command = ("capsnet train" if name == "classification"
               else f"capsnet experiment {shlex.quote(name)}")  # the name is untrusted too
    return f"{command} --resume {shlex.quote(str(home))}"


def training_settings(run: Run, config: dict[str, Any] | None) -> TrainConfig | None:
    """The settings in config.json; a folder of an experiment's runs is refused with them
    named."""
    if config is None:
        return None
    if "task" not in config and "experiment" in config:
        runs = [str(part.folder) for part in run.parts()]
        raise CapsNetError(f"{run.folder}: holds an experiment of several runs; ask for one of "
                           f"them: {', '.join(runs) or 'none has started yet'}")
    try:
        return TrainConfig.from_dict(config.get("train"))
    except CapsNetError as exc:
        raise CapsNetError(f"{run.config_file}: {exc}") from None


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``capsnet status`` says about the run in ``run_dir``, as one JSON-able dict."""
    if not run_dir.is_dir():
        raise CapsNetError(f"{run_dir}: no such run folder")
    now = time.time() if now is None else now
    run = Run(run_dir)
    run.check_entries()
    config = run.read_config()
    settings = training_settings(run, config)
    summary = run.read_summary()
    records, points, skipped = run.split_metrics()
    home = home_run(run, config)
    if home is not run:
        home.check_entries()
    pid = home.running_pid()
    if settings is None and pid is None:
        raise CapsNetError(f"{run_dir}: no run there (no config.json, and no training process)")
    last = records[-1] if records else {}
    epoch = last.get("epoch", 0)
    finished = pid is None and summary is not None and number(summary, "epochs") == epoch
    state = "running" if pid is not None else "finished" if finished else "stopped"
    latest = latest_step(last, points)
    started = mtime(home.pid_file) if pid is not None else None  # this call's start
    # when the last epoch's record was written; older records lack the time: their file's
    written = (number(last, "unix_time") or mtime(run.metrics_file)) if records else None
    # when this call's current epoch began, and its training curve's pace since then: the
    # speed now, which earlier epochs (run beside other work, or on another machine) may
    # not tell
    began = max(started, written or started) if started is not None else None
    pace = (curve_speed(points, began, now)
            if began is not None and settings is not None else None)
    speed = (pace * settings.batch_size if pace is not None and settings is not None  # global
             else number(summary if finished else last,
                         "train_images_per_s" if finished else "images_per_s"))
    status = {"run_dir": str(run_dir), "state": state, "pid": pid, "epoch": epoch,
              "epochs": settings.epochs if settings else None, "step": latest.get("step", 0),
              **accuracies(records), "train_images_per_s": speed,
              "time_limit": (settings.time_limit or None) if settings else None,
              "stop_at": (settings.stop_at or None) if settings else None,
              "test_accuracy": number(summary, "test_accuracy") if finished else None,
              "cut_short": text(summary, "cut_short") if finished else None,
              "skipped_metrics_lines": skipped}
    status["steps"] = total_steps(latest, status["epochs"])
    # a running call's time left is its steps to go at the speed shown, so the two agree
    # (before this call's curve has two points, the speed shown is the last epoch's)
    pace_left = ((status["steps"] - status["step"]) * settings.batch_size / speed
                 if state == "running" and speed and settings is not None
                 and status["steps"] is not None else None)
    status.update(timing(records, summary if finished else None, settings, now, started,
                         began, pace_left))
    status["resume_command"] = (resume_command(home.folder, config)
                                if state != "running" and unfinished(status) else None)
    log = home.log_file
    status["log"] = str(log) if log.is_file() else None
    status["last_log_line"] = last_line(log) if state == "stopped" and log.is_file() else None
    return status


def latest_step(last: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of the run's latest step: the training curve's last point where it is past
    the last epoch's end (an epoch in progress, or stopped part way), else that epoch's
    record. A point's ``epoch`` is a fraction, its step over the steps of an epoch."""
    point = points[-1] if points else {}
    return point if point.get("step", 0) > last.get("step", 0) else last


def curve_speed(points: list[dict[str, Any]], since: float, now: float) -> float | None:
    """Steps a second between the first and the last point of the training curve written
    between ``since`` and ``now`` (the first of them is past the compilation of the first
    steps); None with fewer than two, from older points, which lack the time, or where the
    steps do not rise with the time (the file is untrusted)."""
    timed = [(p["step"], p["unix_time"]) for p in points
             if number(p, "unix_time") is not None and since <= p["unix_time"] <= now]
    if len(timed) < 2 or timed[-1][1] <= timed[0][1] or timed[-1][0] <= timed[0][0]:
        return None
    return (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])


def total_steps(latest: dict[str, Any], epochs: int | None) -> int | None:
    """The run's steps in all, from the steps an epoch of ``latest``'s record; None where
    that record does not tell them."""
    epoch = latest.get("epoch")
    steps = latest.get("step", 0) / epoch * epochs if epoch and epochs else None
    return round(steps) if finite(steps) else None


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
           began: float | None, pace_left: float | None = None) -> dict[str, Any]:
    """Wall time so far and an estimate of the time left: ``pace_left``, the running call's
    steps to go at its speed (validation not counted), where one is known; else the epochs
    to go at the average epoch so far, less the current epoch's part. While running (since
    ``started``; its current epoch ``began``), no further than this call's time limit
    allows. A stopped run's estimate is what resuming it would take."""
    if summary is not None:
        return {"wall_seconds": number(summary, "wall_seconds"), "seconds_left": 0.0}
    last = records[-1] if records else {}
    wall = number(last, "wall_seconds")  # older records lack it: their training time
    wall = wall if wall is not None else sum(r.get("epoch_seconds", 0) for r in records)
    per_epoch = wall / last["epoch"] if last else None
    left = ((settings.epochs - last["epoch"]) * per_epoch
            if per_epoch is not None and settings else None)
    if started is not None:
        current = max(now - (began or started), 0.0)
        wall += current
        if pace_left is not None:
            left = pace_left
        elif left is not None:
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
