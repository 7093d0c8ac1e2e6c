"""``capsnet status RUN_DIR``: how a training run is doing, read from its folder (see
:mod:`capsnet.training.status`); it never changes the folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..training.status import duration, run_status


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="how a training run is doing: running, finished or "
                       "stopped, how far, how fast, the time left",
                       description="Say how the run in RUN_DIR is doing, from its files alone: "
                       "whether it is running, finished or stopped, the epochs done and the "
                       "step reached, the validation accuracy, the speed, the wall time and an "
                       "estimate of the time left, and how to continue it when it stopped "
                       "unfinished.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")
    p.set_defaults(run=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    status = run_status(args.run_dir)
    print(json.dumps(status) if args.json else "\n".join(status_lines(status)))
    return 0


def percent(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.2%}"


def of(done: int, total: int | None) -> str:
    return f"{done:,} of {total:,}" if total is not None else f"{done:,}"


def status_lines(s: dict[str, Any]) -> list[str]:
    """The status in a few lines for a person."""
    state = f"running (process {s['pid']})" if s["state"] == "running" else s["state"]
    # epochs done, not the epoch in progress: a running run is one epoch further on
    head = f"{s['run_dir']}: {state}, {of(s['epoch'], s['epochs'])} epochs done"
    head += f", step {of(s['step'], s['steps'])}" if s["step"] else ""
    if s["test_accuracy"] is not None:
        head += f"; test accuracy {percent(s['test_accuracy'])}"
    lines = [head]
    if s["cut_short"]:
        lines.append(f"cut short: {s['cut_short']}")
    if s["last_val_accuracy"] is not None:
        lines.append(f"validation accuracy: last {percent(s['last_val_accuracy'])}, best "
                     f"{percent(s['best_val_accuracy'])} (epoch {s['best_epoch']})"
                     + (f"; stops at {percent(s['stop_at'])}" if s["stop_at"] else ""))
    lines.append(timing_line(s))
    if s["resume_command"]:
        lines.append(f"continue with: {s['resume_command']}")
    if s["skipped_metrics_lines"]:
        lines.append(f"note: skipped {s['skipped_metrics_lines']} unreadable line(s) of "
                     f"metrics.jsonl (a crash can tear the last one)")
    if s["log"]:
        words = f"; its last line: {s['last_log_line']}" if s["last_log_line"] else ""
        lines.append(f"log: {s['log']}{words}")
    return lines


def timing_line(s: dict[str, Any]) -> str:
    speed = s["train_images_per_s"]
    parts = [f"{speed:,.0f} training images/s" if speed is not None else "speed not measured yet"]
    if s["wall_seconds"] is not None:
        limit = f" (time limit {duration(s['time_limit'])} a call)" if s["time_limit"] else ""
        parts.append(f"wall time {duration(s['wall_seconds'])}{limit}")
    left = s["seconds_left"]
    if left is not None and s["state"] != "finished":
        parts.append(f"about {duration(left)} " + ("left" if s["state"] == "running"
                                                   else "to go when resumed"))
    return "; ".join(parts)
