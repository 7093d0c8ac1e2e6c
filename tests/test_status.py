"""``capsnet status`` of finished, running and stopped runs, read from their folders alone;
``capsnet train --detach``; and run files that are not what they should be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from capsnet.training.run import Run
from test_cli import TIMEOUT, cli, train_args

KEYS = {"run_dir", "state", "pid", "epoch", "epochs", "step", "steps", "last_val_accuracy",
        "best_val_accuracy", "best_epoch", "train_images_per_s", "wall_seconds", "time_limit",
        "stop_at", "seconds_left", "test_accuracy", "cut_short", "resume_command", "log",
        "last_log_line", "skipped_metrics_lines"}


@pytest.fixture(scope="module")
def finished(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A 1-epoch tiny run (2 steps)."""
    run_dir = module_tmp("status") / "finished"
    code, _, err = cli(*train_args(tiny_dataset), "--run-dir", run_dir)
    assert code == 0, err
    return run_dir


def status(run_dir: Path, *flags: str) -> tuple[int, str, str]:
    return cli("status", run_dir, *flags)


def status_json(run_dir: Path) -> dict:
    code, out, err = status(run_dir, "--json")
    assert code == 0 and err == "", err
    return json.loads(out)


def unfinished_copy(finished: Path, target: Path, epochs: int = 3) -> Path:
    """The finished run's folder without its summary, as if it had stopped after epoch 1 of
    ``epochs``."""
    target.mkdir()
    shutil.copyfile(finished / "metrics.jsonl", target / "metrics.jsonl")
    config = json.loads((finished / "config.json").read_text())
    config["train"]["epochs"] = epochs
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture()
def capsnet_like() -> Iterator[int]:
    """A live process whose command line names capsnet, as a training's does."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "capsnet"])
    yield process.pid
    process.kill()
    process.wait()


def test_status_of_a_finished_run(finished: Path) -> None:
    code, out, err = status(finished)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(
        f"{finished}: finished, 1 of 1 epochs done, step 2 of 2; test accuracy ")
    assert lines[1].startswith("validation accuracy: last ") and "(epoch 1)" in lines[1]
    assert "training images/s; wall time " in lines[2] and "continue with" not in out
    summary = json.loads((finished / "summary.json").read_text())
    shown = status_json(finished)
    assert set(shown) == KEYS
    assert [shown[k] for k in ("state", "epoch", "epochs", "steps")] == ["finished", 1, 1, 2]
    assert shown["test_accuracy"] == summary["test_accuracy"]
    assert shown["wall_seconds"] == summary["wall_seconds"] and shown["seconds_left"] == 0
    assert shown["pid"] is None and shown["resume_command"] is None


def test_status_of_a_stopped_run_gives_the_command_that_continues_it(
        finished: Path, tmp_path: Path) -> None:
    run_dir = unfinished_copy(finished, tmp_path / "stopped")
    Run(run_dir).pid_file.write_text("999999999\n")  # a process that is gone: stale
    code, out, _ = status(run_dir)
    assert code == 0 and out.startswith(f"{run_dir}: stopped, 1 of 3 epochs done, step 2 of 6\n")
    assert f"continue with: capsnet train --resume {run_dir}\n" in out
    assert "to go when resumed" in out
    shown = status_json(run_dir)
    assert shown["state"] == "stopped" and shown["seconds_left"] > 0
    assert shown["resume_command"] == f"capsnet train --resume {run_dir}"


def test_status_of_a_run_in_progress(finished: Path, tmp_path: Path, capsnet_like: int) -> None:
    run_dir = unfinished_copy(finished, tmp_path / "running")
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["time_limit"] = 3600.0
    (run_dir / "config.json").write_text(json.dumps(config))
    Run(run_dir).pid_file.write_text(f"{capsnet_like}\n")
    code, out, _ = status(run_dir)
    assert code == 0
    assert out.startswith(f"{run_dir}: running (process {capsnet_like}), 1 of 3 epochs done")
    assert "(time limit 1 h 0 min 0 s a call)" in out and " left" in out
    assert "continue with" not in out
    shown = status_json(run_dir)
    assert (shown["state"], shown["pid"], shown["time_limit"]) == ("running", capsnet_like, 3600)
    assert 0 <= shown["seconds_left"] <= 3600 and shown["wall_seconds"] > 0
    # No second process may train in a folder a live one trains in.
    for extra in ([], ["--detach"]):
        code, _, err = cli(*train_args(tmp_path), "--run-dir", run_dir, *extra)
        assert code == 2 and err == (f"capsnet: {run_dir} is being trained by process "
                                     f"{capsnet_like} (capsnet status {run_dir}); wait for it, "
                                     f"or stop it with kill -INT {capsnet_like}\n")


def test_status_counts_the_steps_of_an_epoch_in_progress(finished: Path, tmp_path: Path,
                                                          capsnet_like: int) -> None:
    """The training curve's last point is the latest step a run has logged: past its last
    epoch's end, status gives that step, not the epoch's."""
    run_dir = unfinished_copy(finished, tmp_path / "part")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "epoch": 1.5, "lr": 1e-3, "train_loss": 0.2}) + "\n")
    Run(run_dir).pid_file.write_text(f"{capsnet_like}\n")
    code, out, _ = status(run_dir)
    assert code == 0 and out.startswith(f"{run_dir}: running (process {capsnet_like}), "
                                        "1 of 3 epochs done, step 3 of 6\n")
    shown = status_json(run_dir)
    assert (shown["epoch"], shown["step"], shown["steps"]) == (1, 3, 6)
    with (run_dir / "metrics.jsonl").open("a") as f:  # a fraction no steps an epoch give
        f.write(json.dumps({"step": 4, "epoch": 5e-324}) + "\n")
    shown = status_json(run_dir)
    assert (shown["step"], shown["steps"]) == (4, None)


def test_the_wall_time_of_a_running_call_counts_from_its_last_epoch(
        finished: Path, tmp_path: Path, capsnet_like: int) -> None:
    """The training curve's points, written through an epoch, leave the time the last epoch
    ended (its record's unix_time) where it was."""
    run_dir = unfinished_copy(finished, tmp_path / "timed")
    metrics = run_dir / "metrics.jsonl"
    epoch = json.loads(metrics.read_text().splitlines()[-1])
    epoch.update(wall_seconds=500.0, unix_time=time.time() - 600)
    metrics.write_text(json.dumps(epoch) + "\n" + json.dumps({"step": 3, "epoch": 1.5}) + "\n")
    Run(run_dir).pid_file.write_text(f"{capsnet_like}\n")
    os.utime(Run(run_dir).pid_file, (time.time() - 1000,) * 2)  # the call began before
    assert 1099 <= status_json(run_dir)["wall_seconds"] <= 1130


def test_a_first_epoch_is_timed_by_its_training_curve(finished: Path, tmp_path: Path,
                                                      capsnet_like: int) -> None:
    """Before any epoch has ended, the speed and the time left come from the curve points
    this call wrote: its steps a second between the first and the last, past compilation."""
    run_dir = unfinished_copy(finished, tmp_path / "first")
    batch = json.loads((run_dir / "config.json").read_text())["train"]["batch_size"]
    pid_file = Run(run_dir).pid_file
    pid_file.write_text(f"{capsnet_like}\n")
    now = time.time()
    os.utime(pid_file, (now - 100,) * 2)
    points = [{"step": 10, "epoch": 0.2, "unix_time": now - 200},  # an earlier call's
              {"step": 20, "epoch": 0.4, "unix_time": now - 60},
              {"step": 30, "epoch": 0.5, "unix_time": now - 55}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    shown = status_json(run_dir)
    assert (shown["epoch"], shown["step"], shown["steps"]) == (0, 30, 180)
    assert shown["train_images_per_s"] == pytest.approx(2 * batch, rel=1e-6)
    assert shown["seconds_left"] == pytest.approx(75, rel=1e-6)  # 150 steps at 2 a second
    code, out, _ = status(run_dir)
    assert code == 0 and f"{2 * batch:,} training images/s" in out and "1 min 15 s left" in out
    # One point of this call times nothing yet; nor do points without their time.
    (run_dir / "metrics.jsonl").write_text(json.dumps(points[-1]) + "\n")
    assert status_json(run_dir)["train_images_per_s"] is None
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in p.items() if k != "unix_time"}) + "\n" for p in points))
    shown = status_json(run_dir)
    assert shown["train_images_per_s"] is None and shown["seconds_left"] is None


def test_a_running_call_is_timed_by_its_current_pace(finished: Path, tmp_path: Path,
                                                      capsnet_like: int) -> None:
    """Earlier epochs that ran slower (beside other work, or on another machine) do not set
    a running call's speed and time left: its current epoch's pace does. Stopped, the run's
    estimate is its average epoch."""
    run_dir = unfinished_copy(finished, tmp_path / "paced")  # epoch 1 of 3, 2 steps each
    batch = json.loads((run_dir / "config.json").read_text())["train"]["batch_size"]
    metrics = run_dir / "metrics.jsonl"
    epoch = json.loads(metrics.read_text().splitlines()[-1])
    assert (epoch["epoch"], epoch["step"]) == (1, 2)
    now = time.time()
    epoch.update(wall_seconds=1000.0, images_per_s=0.01, unix_time=now - 60)
    points = [{"step": 3, "epoch": 1.5, "unix_time": now - 50},
              {"step": 4, "epoch": 2.0, "unix_time": now - 10}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [epoch, *points]))
    shown = status_json(run_dir)
    assert shown["state"] == "stopped" and shown["train_images_per_s"] == 0.01
    assert shown["seconds_left"] == pytest.approx(2000)  # 2 epochs of 1,000 s
    pid_file = Run(run_dir).pid_file
    pid_file.write_text(f"{capsnet_like}\n")
    os.utime(pid_file, (now - 100,) * 2)
    shown = status_json(run_dir)
    assert shown["state"] == "running" and shown["step"] == 4
    assert shown["train_images_per_s"] == pytest.approx(batch / 40, rel=1e-6)
    assert shown["seconds_left"] == pytest.approx(80, rel=1e-6)  # 2 steps, 40 s each
    # No point yet past the epoch's end, or points whose steps fall, or written after now,
    # time nothing: the last epoch's speed is shown, and the time left is at that speed.
    for later in ([], [points[0], {"step": 1, "epoch": 1.5, "unix_time": now - 10}],
                  [points[0], {"step": 5, "epoch": 2.5, "unix_time": now + 1e6}]):
        metrics.write_text("".join(json.dumps(r) + "\n" for r in [epoch, *later]))
        shown = status_json(run_dir)
        assert shown["train_images_per_s"] == 0.01
        assert shown["seconds_left"] == pytest.approx((6 - shown["step"]) * batch / 0.01)


def test_one_model_of_an_experiment_is_run_and_resumed_from_the_experiment(
        finished: Path, tmp_path: Path, capsnet_like: int) -> None:
    experiment = tmp_path / "affnist"
    experiment.mkdir()
    (experiment / "config.json").write_text(json.dumps({"experiment": "affnist"}))
    run_dir = unfinished_copy(finished, experiment / "capsnet")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "task": {"name": "affnist"}}))
    assert status_json(run_dir)["resume_command"] == (f"capsnet experiment affnist --resume "
                                                      f"{experiment}")
    code, _, err = status(experiment)
    assert code == 2 and f"ask for one of them: {run_dir}\n" in err
    Run(experiment).pid_file.write_text(f"{capsnet_like}\n")  # the experiment's process
    assert status_json(run_dir)["state"] == "running"


def test_a_run_cut_short_by_its_time_limit_can_continue(tiny_dataset: Path,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "cut"
    code, _, err = cli(*train_args(tiny_dataset), "--epochs", "3", "--time-limit", "1e-9",
                       "--run-dir", run_dir)
    assert code == 0, err
    code, out, _ = status(run_dir)
    assert out.startswith(f"{run_dir}: finished, 1 of 3 epochs done")
    assert "cut short: time limit of 1e-09 s: stopped after epoch 1 of 3" in out
    assert f"continue with: capsnet train --resume {run_dir}" in out
    assert not Run(run_dir).pid_file.exists()  # the training removed its record at the end


def test_status_reads_the_folder_and_changes_nothing(finished: Path) -> None:
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.rglob("*")}
    status(finished)
    status(finished, "--json")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.rglob("*")} == before


@pytest.mark.parametrize("name, text, message", [
    ("config.json", "{not json", "config.json: not a valid run config (config.json) "
                                 "(JSONDecodeError: Expecting property name"),
    ("config.json", "[1, 2]", "config.json: not a valid run config (config.json) (not a JSON "
                              "object)"),
    ("config.json", '{"train": {"lr": "fast"}, "task": {}}',
     "config.json: lr must be a number in (0, 1), got 'fast'"),
    ("summary.json", "7", "summary.json: not a valid run summary (summary.json) (not a JSON "
                          "object)"),
])
def test_malformed_run_files_are_refused_in_one_line(finished: Path, tmp_path: Path, name: str,
                                                     text: str, message: str) -> None:
    run_dir = tmp_path / "bad"
    shutil.copytree(finished, run_dir)
    (run_dir / name).write_text(text)
    code, out, err = status(run_dir)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"capsnet: {run_dir / name if name == 'summary.json' else run_dir}")
    assert message in err


def test_unreadable_metrics_lines_are_skipped_with_a_note(finished: Path, tmp_path: Path) -> None:
    run_dir = unfinished_copy(finished, tmp_path / "torn")
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 2, "step": "four"}\n["no"]\n{"epoch": 3, "tr')  # torn by a crash
    code, out, _ = status(run_dir)
    assert code == 0 and "1 of 3 epochs done" in out
    assert "note: skipped 3 unreadable line(s) of metrics.jsonl" in out


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "no run there (no config.json, and no training process)"),
    (lambda d: (d / "capsnet").mkdir(parents=True) or
     (d / "config.json").write_text('{"experiment": "affnist"}'),
     "holds an experiment of several runs; ask for one of them: none has started yet"),
])
def test_a_folder_that_holds_no_run_is_refused(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "folder")
    code, _, err = status(tmp_path / "folder")
    assert code == 2 and err == f"capsnet: {tmp_path / 'folder'}: {message}\n"


def test_detach_refuses_bad_input_before_anything_starts(tmp_path: Path) -> None:
    code, out, err = cli("train", "--dataset", tmp_path / "missing", "--device", "cpu",
                         "--run-dir", tmp_path / "run", "--detach")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"capsnet: {tmp_path / 'missing'}")
    assert not (tmp_path / "run").exists()


def detached(run_dir: Path, *args: str | Path) -> dict:
    """``capsnet ARGS --detach`` in a process of its own, as a person starts it; the status
    of the run in ``run_dir`` once it has finished by itself."""
    began = time.monotonic()
    started = subprocess.run([sys.executable, "-m", "capsnet.cli", *map(str, args), "--detach"],
                             capture_output=True, text=True, timeout=TIMEOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("training in the background as process ")
    assert f"capsnet status {run_dir}" in started.stdout
    assert f"capsnet train --resume {run_dir} --detach" in started.stdout
    while status_json(run_dir)["state"] != "finished":
        assert time.monotonic() - began < TIMEOUT, (run_dir / "train.log").read_text()
        time.sleep(0.5)
    assert not Run(run_dir).pid_file.exists()  # the training removed its record at the end
    return status_json(run_dir)


@pytest.mark.slow
def test_a_detached_run_finishes_by_itself_and_resumes_detached(tiny_dataset: Path,
                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "detached"
    shown = detached(run_dir, *train_args(tiny_dataset), "--run-dir", run_dir)
    assert shown["epoch"] == 1 and shown["log"] == str(run_dir / "train.log")
    assert detached(run_dir, "train", "--resume", run_dir, "--epochs", "2")["epoch"] == 2
    assert (run_dir / "train.log").read_text().count("test accuracy") == 2  # both calls' output
