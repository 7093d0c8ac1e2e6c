"""The ``capsnet`` command end to end: train, resume, evaluate, predict, figures, Ctrl-C,
and one-line errors with exit code 2 for every bad input.

Runs are tiny (a few optimiser steps) and shared between tests through module fixtures.
The exact-resume tests use 20x20 images, which train several times faster than 28x28.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet import CapsNet
from capsnet.training.checkpoint import load_checkpoint, load_model
from capsnet.cli import main
from capsnet.data import load_splits
from capsnet.utils.images import load_image
from capsnet.nn.pretrained import read_weights
from capsnet.tools.explore import ExploreServer
from capsnet.training.config import make_config
from capsnet.training.trainer import Trainer
from conftest import write_dataset, write_run

CAPSNET = (str(Path(sys.executable).with_name("capsnet"))
           if Path(sys.executable).with_name("capsnet").exists() else shutil.which("capsnet"))
THREADS = torch.get_num_threads()  # every exact-resume run uses this many, in any process
TIMEOUT = 300  # seconds for any subprocess; the machine may be busy


def cli(*args: Any) -> tuple[int, str, str]:
    """Run ``capsnet ARGS`` in this process; returns exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def strict_json(line: str) -> Any:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: Any, b: Any, where: str = "") -> None:
    """Every tensor, number and string of two checkpoint payloads is exactly equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_progress(mine: dict, theirs: dict) -> bool:
    """Equal progress but the wall time the runs took (a resumed run counts its calls')."""
    return ({**mine["progress"], "wall_seconds": None}
            == {**theirs["progress"], "wall_seconds": None})


@contextmanager
def torch_settings() -> Iterator[None]:
    """Run with THREADS threads (results may depend on it), then the thread count before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_torch_settings() -> Iterator[None]:
    with torch_settings():
        yield


# -- shared runs ------------------------------------------------------------------------


def train_args(dataset: Path) -> list[str]:
    """One epoch of 2 steps of the seed preset, with 2 primary capsule maps (not 32): a
    checkpoint of 22 MB, not 98."""
    return ["train", "--dataset", str(dataset), "--val-size", "40", "--device", "cpu",
            "--no-progress", "--preset", "seed", "--batch-size", "16", "--train-limit", "32",
            "--epochs", "1", "--primary-maps", "2"]


@pytest.fixture(scope="module")
def run28(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A 1-epoch run (2 steps) on the 28x28 tiny data set."""
    run_dir = module_tmp("cli") / "run28"
    code, out, err = cli(*train_args(tiny_dataset), "--run-dir", run_dir)
    assert code == 0, err
    assert "test accuracy" in out and f"summary: {run_dir / 'summary.json'}" in out
    return run_dir


@pytest.fixture(scope="module")
def small_dataset(module_tmp: Callable[[str], Path]) -> Path:
    """64 training (24 used, 40 validation) and 20 test images of 20x20 pixels."""
    return write_dataset(module_tmp("small") / "small20", n_train=64, n_test=20,
                         size=20)


def exact_args(dataset: Path) -> list[str]:
    """Two epochs of three steps, with shifts, learning-rate decay and deterministic kernels."""
    return ["--dataset", str(dataset), "--val-size", "40", "--device", "cpu", "--batch-size",
            "8", "--train-limit", "24", "--epochs", "2", "--deterministic", "--max-shift", "1",
            "--seed", "3", "--routing-iterations", "2"]


@pytest.fixture(scope="module")
def reference(small_dataset: Path, module_tmp: Callable[[str], Path]) -> dict[str, Any]:
    """last.pt of the uninterrupted run that interrupted-and-resumed runs must reproduce."""
    run_dir = module_tmp("reference") / "run"
    with torch_settings():
        code, _, err = cli("train", *exact_args(small_dataset), "--no-progress",
                           "--run-dir", run_dir)
    assert code == 0, err
    return load_checkpoint(run_dir / "last.pt")


@pytest.mark.slow
def test_reference_run_took_six_steps(reference: dict[str, Any]) -> None:
    assert reference["progress"]["epoch"] == 2 and reference["progress"]["step"] == 6


# -- train ------------------------------------------------------------------------------


def test_train_writes_a_complete_run(run28: Path, tiny_dataset: Path) -> None:
    config = strict_json((run28 / "config.json").read_text())
    assert config["train"]["dataset"] == str(tiny_dataset) and config["train"]["epochs"] == 1
    assert config["model"]["image_size"] == 28 and config["model"]["num_classes"] == 10
    records = read_metrics(run28)
    assert [r["epoch"] for r in records] == [1]
    assert records[0]["step"] == 2 and records[0]["improved"] is True
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert np.isfinite(records[0][key])
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(run28 / name)
        assert payload["progress"]["epoch"] == 1 and payload["progress"]["step"] == 2
    summary = strict_json((run28 / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 2
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_loss"] > 0
    assert Path(summary["checkpoint"]) == run28 / "best.pt"
    assert not [p for p in run28.iterdir() if p.name.endswith(".tmp")]


def test_train_refuses_to_overwrite_a_run(run28: Path, tiny_dataset: Path) -> None:
    code, _, err = cli(*train_args(tiny_dataset), "--run-dir", run28)
    assert code == 2 and "already holds a run" in err and f"--resume {run28}" in err


@pytest.mark.slow
def test_resume_to_more_epochs_then_resume_again_keeps_them(run28: Path,
                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "more"
    shutil.copytree(run28, run_dir)
    code, out, err = cli("train", "--resume", run_dir, "--epochs", "2", "--no-progress",
                         "--figures")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    summary = strict_json((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4
    assert load_checkpoint(run_dir / "last.pt")["train_config"]["epochs"] == 2
    assert f"figures: {run_dir / 'figures'} (19 files)" in out
    assert Image.open(run_dir / "figures" / "curves.png").size == (1000, 400)
    # Resuming a finished run without --epochs keeps its 2 epochs (not the preset's 10).
    code, _, err = cli("train", "--resume", run_dir, "--no-progress")
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert strict_json((run_dir / "summary.json").read_text())["steps"] == 4


# -- Ctrl-C and exact resume --------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_then_resume_gives_identical_weights(
        small_dataset: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}  # same kernels as the reference
    proc = subprocess.Popen([CAPSNET, "train", *exact_args(small_dataset), "--run-dir",
                             str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    stderr = bytearray()

    def read_stderr() -> None:  # progress bars end in "\r", not "\n": read raw bytes
        while chunk := os.read(proc.stderr.fileno(), 4096):
            stderr.extend(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"epoch 1/2" not in stderr:  # the progress bar shows once Ctrl-C is handled
            assert proc.poll() is None and time.monotonic() < deadline, stderr.decode()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout = proc.stdout.read()
        assert proc.wait(timeout=TIMEOUT) == 130, stderr.decode()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.decode()
    assert "Traceback" not in text and stdout == b""
    messages = [line for line in re.split(r"[\r\n]", text) if line.startswith("capsnet:")]
    assert len(messages) == 1 and messages[0].startswith("capsnet: interrupted in epoch ")
    assert messages[0].endswith(f"continue with: capsnet train --resume {run_dir}")
    saved = load_checkpoint(run_dir / "last.pt")["progress"]
    assert 1 <= saved["step"] < 6

    code, out, err = cli("train", "--resume", run_dir, "--no-progress")
    assert code == 0, err
    final = load_checkpoint(run_dir / "last.pt")
    assert_same_state(final["model"], reference["model"], "model")
    assert_same_state(final["optimizer"], reference["optimizer"], "optimizer")
    assert same_progress(final, reference)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_in_the_last_step_of_an_epoch_resumes_exactly(
        small_dataset: Path, reference: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C (in this process) during step 3, the last of epoch 1; the real-process test
    above covers Ctrl-C inside an epoch."""
    stop_after = 3
    train_step = Trainer.train_step

    def step_then_ctrl_c(self: Trainer, batch: Any) -> Any:
        result = train_step(self, batch)
        if self.progress.step == stop_after:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    run_dir = tmp_path / "run"
    assert main(["train", *exact_args(small_dataset), "--no-progress",
                 "--run-dir", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"capsnet train --resume {run_dir}" in err
    monkeypatch.undo()
    saved = load_checkpoint(run_dir / "last.pt")["progress"]
    assert saved["epoch"] == 1 and saved["batch"] == 1  # epoch 1 validated, one step more

    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    final = load_checkpoint(run_dir / "last.pt")
    assert_same_state(final["model"], reference["model"], "model")
    assert_same_state(final["optimizer"], reference["optimizer"], "optimizer")
    assert same_progress(final, reference)
    records = read_metrics(run_dir)  # strict JSON: no NaN for an epoch cut at its end
    assert [r["epoch"] for r in records] == [1, 2]
    # epoch 2 counts its step before Ctrl-C: 24 images, as epoch 1
    assert [r["images"] for r in records] == [24, 24]
    assert all(np.isfinite(r["train_loss"]) and r["train_accuracy"] >= 0 for r in records)


# -- evaluate -----------------------------------------------------------------------------


def test_evaluate_prints_accuracy_per_class_and_confusion(run28: Path, tiny_dataset: Path,
                                                          capsys) -> None:
    assert main(["evaluate", str(run28), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{re.escape(str(tiny_dataset))} test: accuracy \d+\.\d\d% "
                        r"\(\d+/60\), loss \d+\.\d{5}", lines[0])
    assert lines[1].startswith("per class: 0 ") and lines[1].count("%") == 10
    assert lines[2].startswith("confusion matrix")
    rows = [[int(v) for v in line.split()[1:]] for line in lines[3:]]
    assert len(rows) == 10 and all(len(row) == 10 for row in rows)
    assert sum(map(sum, rows)) == 60


def test_evaluate_json(run28: Path, capsys) -> None:
    assert main(["evaluate", str(run28 / "last.pt"), "--json", "--device", "cpu"]) == 0
    result = strict_json(capsys.readouterr().out)
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == result["total"] == 60
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / 60)
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    np.testing.assert_allclose(result["per_class_accuracy"], per_class)
    assert result["split"] == "test" and result["loss"] > 0
    assert main(["evaluate", str(run28), "--json", "--split", "val", "--device", "cpu"]) == 0
    assert strict_json(capsys.readouterr().out)["total"] == 40


# -- predict ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_images(tiny_dataset: Path) -> np.ndarray:
    """The first three test images, uint8 (3, 28, 28)."""
    return load_splits(str(tiny_dataset), val_size=40).test.images[:3, 0].numpy()


def model_output(run_dir: Path, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Predictions and capsule lengths of the run's best model on float images (n, 1, 28, 28)."""
    model, _ = load_model(run_dir / "best.pt")
    with torch.no_grad():
        out = model(torch.as_tensor(images, dtype=torch.float32))
    return out.predictions.tolist(), out.lengths.numpy()


def test_predict_png_and_npy_give_the_models_output(run28: Path, test_images: np.ndarray,
                                                    tmp_path: Path, capsys) -> None:
    png, npy_uint8, npy_float = tmp_path / "a.png", tmp_path / "b.npy", tmp_path / "c.npy"
    Image.fromarray(test_images[0]).save(png)
    np.save(npy_uint8, test_images[1])
    np.save(npy_float, test_images[2].astype(np.float32) / 255)
    expected, lengths = model_output(run28, test_images[:, None] / 255.0)
    assert main(["predict", str(run28 / "best.pt"), str(png), str(npy_uint8), str(npy_float),
                 "--no-preprocess", "--json"]) == 0
    results = [strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in results] == [str(png), str(npy_uint8), str(npy_float)]
    present = [i if length >= 0.5 else None for i, length in zip(expected, lengths.max(axis=1))]
    assert [r["prediction"] for r in results] == present  # none: no capsule reaches 0.5
    np.testing.assert_allclose([r["lengths"] for r in results], lengths, atol=2e-6)


def test_predict_preprocesses_a_dark_on_light_photo(run28: Path, test_images: np.ndarray,
                                                    tmp_path: Path, capsys) -> None:
    photo = 255 - np.kron(test_images[0], np.ones((4, 4), dtype=np.uint8))  # 112x112, inverted
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    assert main(["predict", str(run28), str(path)]) == 0
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(rf"{re.escape(str(path))}: (\d|none)  lengths((?: \d\.\d{{3}}){{10}})",
                         line)
    assert match, line
    expected, lengths = model_output(run28, load_image(path)[None])
    assert match[1] == (str(expected[0]) if lengths[0].max() >= 0.5 else "none")
    np.testing.assert_allclose([float(v) for v in match[2].split()], lengths[0], atol=6e-4)


@pytest.mark.slow
def test_predict_in_a_real_process(run28: Path, test_images: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    Image.fromarray(test_images[0]).save(path)
    result = subprocess.run([CAPSNET, "predict", str(run28 / "best.pt"), str(path), "--json",
                             "--no-preprocess"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    output = strict_json(result.stdout)
    assert output["image"] == str(path)
    expected, lengths = model_output(run28, test_images[:1, None] / 255.0)
    assert output["prediction"] == (expected[0] if lengths[0].max() >= 0.5 else None)
    assert len(output["lengths"]) == 10


# -- figures ------------------------------------------------------------------------------


def test_figures_are_pngs_of_the_expected_size(run28: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "figures"
    assert main(["figures", str(run28 / "best.pt"), "--out", str(out_dir), "--samples", "3"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    names = (["samples.png", "reconstructions.png"] +
             [f"tweak_dim_{d:02d}.png" for d in range(16)] + ["curves.png"])
    assert printed == [out_dir / name for name in names]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)  # no temporary files
    # samples.png: one image of each of the 10 classes; reconstructions.png: --samples 3
    sizes = {"samples.png": (1500, 200), "reconstructions.png": (450, 400),
             "curves.png": (1000, 400)}
    for path in printed:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == sizes.get(path.name, (825, 275)), path.name
            image.load()
            assert np.asarray(image.convert("L")).std() > 0  # something was drawn


def test_figures_without_metrics_skip_the_curves(run28: Path, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "alone.pt"
    shutil.copy(run28 / "best.pt", checkpoint)
    assert main(["figures", str(checkpoint), "--out", str(tmp_path / "f"), "--samples", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 18 and not any(line.endswith("curves.png") for line in printed)
    assert Image.open(tmp_path / "f" / "tweak_dim_15.png").size == (825, 125)


# -- bad input: one line on stderr, exit code 2 ----------------------------------------------


BAD_COMMANDS = {
    "no-command": ([], "required: command"),
    "missing-checkpoint": (["evaluate", "{tmp}/missing.pt"], "{tmp}/missing.pt: no such file or folder"),
    "text-as-checkpoint": (["evaluate", "{tmp}/notes.txt"], "{tmp}/notes.txt: "),
    "foreign-checkpoint": (["evaluate", "{tmp}/foreign.pt"], "not a capsnet checkpoint"),
    "truncated-checkpoint": (["predict", "{tmp}/truncated.pt", "{tmp}/digit.png"], "truncated"),
    "unreadable-image": (["predict", "{run}", "{tmp}/notes.txt"], "{tmp}/notes.txt: not an image"),
    "missing-image": (["predict", "{run}", "{tmp}/nothing.png"], "{tmp}/nothing.png: no such file"),
    "epochs-0": (["train", "--epochs", "0"], "argument --epochs: expected an integer in [1, 100,000], got '0'"),
    "batch-size-negative": (["train", "--batch-size", "-1"], "argument --batch-size"),
    "lr-not-a-number": (["train", "--lr", "abc"], "argument --lr: expected a number in (0, 1), got 'abc'"),
    "lr-too-big": (["train", "--lr", "5"], "argument --lr: expected a number in (0, 1), got '5'"),
    "resume-nothing": (["train", "--resume", "{tmp}"], "--resume {tmp}: no last.pt"),
    "unknown-dataset-folder": (["train", "--dataset", "{tmp}/nowhere", "--run-dir", "{tmp}/r"],
                               "{tmp}/nowhere: not a data set name"),
    "other-image-size": (["evaluate", "{run}", "--dataset", "{small}"],
                         "takes 1x28x28 images, 10 classes; {small} has 1x20x20 images"),
    "figures-missing-checkpoint": (["figures", "{tmp}/missing.pt", "--out", "{tmp}/f"],
                                   "no such file or folder"),
    "no-model": (["evaluate"], "evaluate: give one model, as MODEL or --model MODEL; a model is"),
    "two-models": (["figures", "{run}", "--model", "{run}", "--out", "{tmp}/f"],
                   "figures: give one model"),
    "predict-without-images": (["predict", "{run}"], "predict: give a model and at least one image"),
    "figures-samples-0": (["figures", "{run}", "--out", "{tmp}/f", "--samples", "0"],
                          "argument --samples"),
}


@pytest.mark.parametrize("name", list(BAD_COMMANDS))
def test_bad_input_is_one_line_and_exit_code_2(name: str, run28: Path, small_dataset: Path,
                                               tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("these are not the bytes you are looking for\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((run28 / "best.pt").read_bytes()[:5000])
    Image.new("L", (28, 28), 0).save(tmp_path / "digit.png")
    args, expected = BAD_COMMANDS[name]
    fill = {"tmp": tmp_path, "run": run28, "small": small_dataset}
    code = main([arg.format(**fill) for arg in args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("capsnet: ") and captured.err.count("\n") == 1
    assert expected.format(**fill) in captured.err
    assert "Traceback" not in captured.err


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([CAPSNET, "evaluate", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"capsnet: {tmp_path / 'missing.pt'}: no such file or folder")
    assert result.stderr.count("\n") == 1



def test_resume_refuses_to_change_the_runs_settings(run28: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "other-lr"
    shutil.copytree(run28, run_dir)
    before = (run_dir / "last.pt").read_bytes()
    code, _, err = cli("train", "--resume", run_dir, "--lr", "0.01", "--no-progress")
    assert code == 2
    assert err.count("\n") == 1 and "--resume keeps the run's settings: lr is 0.001" in err
    assert (run_dir / "last.pt").read_bytes() == before


# -- every command takes every kind of model, the same way -----------------------------------


def model_args(index: int, source: str) -> list[str]:
    """MODEL, or its synonym --model MODEL, in turns."""
    return [source] if index % 2 == 0 else ["--model", source]


def data_args(kind: str, dataset: Path) -> list[str]:
    """A run records its data set; the other kinds are told (the shipped one's is MNIST)."""
    return [] if kind in ("run folder", "checkpoint") else ["--dataset", str(dataset),
                                                            "--val-size", "40"]


def test_evaluate_takes_every_kind_of_model(model_kinds: dict[str, str],
                                            tiny_dataset: Path) -> None:
    results = []
    for index, (kind, source) in enumerate(model_kinds.items()):
        code, out, err = cli("evaluate", *model_args(index, source),
                             *data_args(kind, tiny_dataset), "--json", "--device", "cpu")
        assert code == 0, f"{kind}: {err}"
        result = strict_json(out)
        assert (result["dataset"], result["total"]) == (str(tiny_dataset), 60), kind
        results.append((result["accuracy"], result["confusion"]))
    assert all(result == results[0] for result in results)


@pytest.mark.slow
def test_figures_take_every_kind_of_model(model_kinds: dict[str, str], tiny_dataset: Path,
                                          tmp_path: Path) -> None:
    for index, (kind, source) in enumerate(model_kinds.items()):
        out_dir = tmp_path / str(index)
        code, out, err = cli("figures", *model_args(index, source), *data_args(kind, tiny_dataset),
                             "--out", out_dir, "--samples", "1")
        assert code == 0, f"{kind}: {err}"
        assert len(out.splitlines()) == 18 and (out_dir / "tweak_dim_15.png").is_file(), kind


@pytest.mark.slow
def test_predict_export_and_explore_take_every_kind_of_model(
        model_kinds: dict[str, str], test_images: np.ndarray, tiny_dataset: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(test_images[0]).save(tmp_path / "digit.png")

    def stop(self: ExploreServer) -> None:
        raise KeyboardInterrupt  # as Ctrl-C does

    monkeypatch.setattr(ExploreServer, "serve_forever", stop)
    predictions, exported = set(), []
    for index, (kind, source) in enumerate(model_kinds.items()):
        code, out, err = cli("predict", *model_args(index, source), tmp_path / "digit.png")
        assert code == 0, f"{kind}: {err}"
        predictions.add(out)
        out_file = tmp_path / f"{index}.safetensors"
        code, _, err = cli("export", *model_args(index, source), "--format", "safetensors",
                           "--out", out_file)
        assert code == 0, f"{kind}: {err}"
        exported.append(read_weights(out_file))
        dataset = data_args(kind, tiny_dataset)[:2]
        code, out, err = cli("explore", *model_args(index, source), *dataset, "--port", "0")
        assert code == 0 and out.startswith(f"capsnet explore: serving {source} at http://"), err
    assert len(predictions) == 1
    (config, state, labels, architecture), *others = exported
    for other_config, other_state, other_labels, other_architecture in others:
        assert (other_config, other_labels, other_architecture) == (config, labels, architecture)
        assert all(torch.equal(other_state[name], tensor) for name, tensor in state.items())


MODEL_COMMANDS = {"evaluate": [], "figures": ["--out", "{tmp}/f"], "predict": ["{tmp}/digit.png"],
                  "export": ["--format", "safetensors", "--out", "{tmp}/m.safetensors"],
                  "explore": ["--port", "0"]}
BAD_MODELS = {"missing": ("{tmp}/missing", "{tmp}/missing: no such file or folder, nor a shipped "
                                           "model; a model is a run folder"),
              "random-file": ("{tmp}/notes.txt", "{tmp}/notes.txt: neither a checkpoint nor a "
                                                 "safetensors file; a model is a run folder"),
              "folder-without-model": ("{tmp}/empty", "{tmp}/empty: a folder without a model (no "
                                                      "best.pt, last.pt or model.safetensors); "
                                                      "a model is a run folder")}


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("bad", list(BAD_MODELS))
def test_a_bad_model_is_one_line_and_exit_code_2(command: str, bad: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty").mkdir()
    Image.new("L", (28, 28), 0).save(tmp_path / "digit.png")
    before = sorted(tmp_path.iterdir())
    source, expected = (text.format(tmp=tmp_path) for text in BAD_MODELS[bad])
    code, out, err = cli(command, source, *(a.format(tmp=tmp_path) for a in MODEL_COMMANDS[command]))
    assert (code, out) == (2, "") and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"capsnet: {expected}"), err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("command", ["evaluate", "figures"])
def test_a_model_without_its_data_set_needs_dataset(command: str, model_kinds: dict[str, str],
                                                    tmp_path: Path) -> None:
    code, out, err = cli(command, model_kinds["save_pretrained folder"], "--out", tmp_path / "f") \
        if command == "figures" else cli(command, model_kinds["save_pretrained folder"])
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "does not record the data set it was trained on; give one with --dataset" in err
    assert not (tmp_path / "f").exists()


# -- runs that move ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_a_relative_folder_is_evaluated_from_anywhere(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(tiny_dataset, project / "data" / "tiny")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    code, _, err = cli(*train_args(Path("data/tiny")), "--run-dir", "runs/r")
    assert code == 0, err
    recorded = json.loads((project / "runs" / "r" / "config.json").read_text())["train"]
    assert recorded["dataset"] == str(project / "data" / "tiny")  # absolute
    shutil.move(project / "runs" / "r", elsewhere / "r")
    monkeypatch.chdir(elsewhere)
    code, out, err = cli("evaluate", elsewhere / "r", "--json", "--device", "cpu")
    assert code == 0, err
    assert strict_json(out)["dataset"] == str(project / "data" / "tiny")


def test_an_older_run_finds_its_relative_data_set_beside_it(
        model_kinds: dict[str, str], tiny_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs made before data set folders were recorded absolute hold the path as given,
    relative to where they were trained: next to --run-dir NAME, or to runs/NAME."""
    project, other = tmp_path / "project", tmp_path / "other"
    shutil.copytree(tiny_dataset, project / "data" / "tiny")
    other.mkdir()
    settings = {**make_config("seed", val_size=40).to_dict(), "dataset": "data/tiny"}
    model = CapsNet.from_pretrained(model_kinds["run folder"])
    runs = [write_run(project / "old", model, settings),
            write_run(project / "runs" / "old", model, settings)]
    monkeypatch.chdir(other)
    for run in runs:
        code, out, err = cli("evaluate", run, "--json", "--device", "cpu")
        assert code == 0, err
        assert strict_json(out)["dataset"] == str(project / "data" / "tiny")
    shutil.rmtree(project / "data")
    code, out, err = cli("evaluate", runs[1], "--device", "cpu")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert (f"{runs[1]}: the run's data set folder data/tiny was not found (tried "
            f"{other}/data/tiny, {project}/runs/data/tiny, {project}/data/tiny); give --dataset"
            in err), err


def test_a_command_starts_without_the_compiler_or_the_mat_reader() -> None:
    """torch._dynamo (about a second to import) loads only when a model is compiled and
    scipy.io only when an SVHN file is read, not at every command's start."""
    code = ("import sys, capsnet.cli, capsnet.nn.routing_kernel, capsnet.training.trainer, "
            "capsnet.data.formats; print(sorted({'torch._dynamo', 'scipy.io'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
