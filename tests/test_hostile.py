"""Hostile and careless input against the real ``capsnet`` command, one case a row: each must
end with exit code 2, exactly one line on stderr, no traceback, and nothing written or changed
in the folder it ran in (where every input lives)."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from capsnet.cli import main
from capsnet.data import FILE_NAMES, read_idx, write_idx
from capsnet.training.checkpoint import FORMAT, VERSION, load_checkpoint, state_digest
from conftest import refuses_in_one_line, write_dataset

pytestmark = pytest.mark.slow  # each case starts the real command: minutes in all
TRAIN = ["--epochs", "1", "--batch-size", "60", "--val-size", "40", "--device", "cpu",
         "--no-progress"]


def resealed(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint ``source`` with ``change`` applied and a valid checksum: damage
    that only the validation of its content can catch."""
    payload = dict(load_checkpoint(source))
    payload.pop("sha256")
    change(payload)
    full = {"format": FORMAT, "version": VERSION, **payload}
    full["sha256"] = state_digest(full)
    torch.save(full, target)
    return target


def npy_with_header(header: bytes) -> bytes:
    header = header + b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def dataset_variant(source: Path, target: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    change(target)
    return target


def relabel(folder: Path, labels: Callable[[np.ndarray], np.ndarray]) -> None:
    for part in ("train_labels", "test_labels"):
        path = folder / FILE_NAMES[part]
        write_idx(path, labels(read_idx(path).copy()))


@pytest.fixture(scope="module")
def workspace(module_tmp: Callable[[str], Path]) -> Path:
    """A folder holding a trained run and every hostile input."""
    w = module_tmp("hostile")
    data = write_dataset(w / "data")
    # 2 primary capsule maps: checkpoints of 22 MB, not 98, to copy, damage and refuse
    assert main(["train", "--preset", "seed", "--dataset", str(data), *TRAIN, "--primary-maps",
                 "2", "--run-dir", str(w / "run")]) == 0
    ckpt = w / "run" / "best.pt"
    plain = io.BytesIO()
    np.save(plain, np.zeros((28, 28), np.uint8))
    header_key = bytearray(plain.getvalue())
    header_key[26] = ord("b")  # {'descr': ...} becomes {b'descr': ...}
    (w / "bytes-key.npy").write_bytes(bytes(header_key))
    (w / "huge-shape.npy").write_bytes(npy_with_header(
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999999999999, 0), }"))
    (w / "bad\nname.png").write_bytes(b"not an image")
    (w / "notes.txt").write_text("not an image either")
    (w / "afile").write_text("a file where a folder should be")
    resealed(ckpt, w / "huge-decoder.pt",
             lambda p: p["model_config"].update(decoder_hidden=[2**40, 1024]))
    resealed(ckpt, w / "lr-text.pt", lambda p: p.__setitem__(
        "train_config", {**p["train_config"], "lr": "0.001"}))
    resealed(ckpt, w / "dataset-list.pt", lambda p: p.__setitem__(
        "train_config", {**p["train_config"], "dataset": ["mnist"]}))
    resealed(ckpt, w / "routing-huge.pt",
             lambda p: p["model_config"].update(routing_iterations=10**9))
    dataset_variant(data, w / "one-class", lambda d: relabel(d, lambda y: y * 0))
    dataset_variant(data, w / "gaps", lambda d: relabel(d, lambda y: np.where(y == 1, 200, y)))
    dataset_variant(data, w / "seven", lambda d: [write_idx(
        d / FILE_NAMES[part], read_idx(d / FILE_NAMES[part])[:, :7, :7])
        for part in ("train_images", "test_images")])
    dataset_variant(data, w / "declares-100g", lambda d: (d / FILE_NAMES["train_images"])
                    .write_bytes(bytes([0, 0, 8, 3]) + (100 * 2**20).to_bytes(4, "big")
                                 + (32).to_bytes(4, "big") * 2 + b"\0" * 100))
    dataset_variant(data, w / "gz-bomb-header", lambda d: (d / FILE_NAMES["train_images"])
                    .write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big")
                                               + (2**16).to_bytes(4, "big") * 2)))
    damaged = w / "damaged-run"
    shutil.copytree(w / "run", damaged)
    last = bytearray((damaged / "last.pt").read_bytes())
    last[len(last) // 2] ^= 0xFF
    (damaged / "last.pt").write_bytes(bytes(last))
    return w


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` and a hash of its bytes; every folder."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


CASES: dict[str, tuple[list[str], str]] = {
    # The 13 holes of the hostile-user probe (issue 14).
    "npy-bytes-key": (["predict", "run", "bytes-key.npy"], "bytes-key.npy: not a valid .npy array"),
    "npy-huge-shape": (["predict", "run", "huge-shape.npy"], "is too large for an image"),
    "newline-in-name": (["predict", "run", "bad\nname.png"], "bad\\nname.png: not an image file"),
    "evaluate-huge-decoder": (["evaluate", "huge-decoder.pt", "--dataset", "data"],
                              "decoder_hidden must be a list of 1 to 16 sizes"),
    "explore-huge-decoder": (["explore", "huge-decoder.pt", "--port", "0"],
                             "decoder_hidden must be a list of 1 to 16 sizes"),
    "evaluate-lr-text": (["evaluate", "lr-text.pt"], "lr must be a number in (0, 1), got '0.001'"),
    "figures-lr-text": (["figures", "lr-text.pt", "--out", "figs"], "lr must be a number"),
    "seed-huge": (["train", "--dataset", "data", "--seed", "99999999999999999999999"],
                  "argument --seed: expected an integer in [0, 4,294,967,295]"),
    "labels-all-zero": (["train", "--dataset", "one-class", "--run-dir", "r", *TRAIN],
                        "every training label is 0; a classifier needs at least 2 classes"),
    "images-7x7": (["train", "--dataset", "seven", "--run-dir", "r", *TRAIN],
                   "image_size 7 is too small"),
    "idx-declares-100g": (["train", "--dataset", "declares-100g", "--run-dir", "r", *TRAIN],
                          "the data its header declares would need 100.0 GiB"),
    "run-dir-is-a-file": (["train", "--dataset", "data", "--run-dir", "afile", *TRAIN],
                          "run folder afile is a file"),
    "run-dir-unwritable": (["train", "--dataset", "data", "--run-dir", "/proc/capsnet/run", *TRAIN],
                           "run folder /proc/capsnet/run: cannot write in /proc"),
    # The decisions of issue 14.
    "label-gaps": (["train", "--dataset", "gaps", "--run-dir", "r", *TRAIN],
                   "the training labels use 10 classes between 0 and 200 but not 1, 10, 11, 12, "
                   "13, ...; labels must be 0 .. K-1"),
    "resume-damaged-last": (["train", "--resume", "damaged-run"],
                            "best.pt (after epoch 1) is intact: add --from-best"),
    # More of the same kind.
    "stored-dataset-not-text": (["evaluate", "dataset-list.pt"], "dataset must be text"),
    "routing-huge": (["predict", "routing-huge.pt", "notes.txt"],
                     "routing_iterations must be an integer in [1, 100]"),
    "gzip-header-too-big": (["train", "--dataset", "gz-bomb-header", "--run-dir", "r", *TRAIN],
                            "the data its header declares would need 8,589,934,592.0 GiB"),
    "run-dir-under-a-file": (["train", "--dataset", "data", "--run-dir", "afile/run", *TRAIN],
                             "cannot be made: afile is a file"),
    "figures-out-is-a-file": (["figures", "run", "--out", "afile"], "--out afile is a file"),
    "export-out-is-a-folder": (["export", "run", "--format", "safetensors", "--out", "data"],
                               "--out data is a folder"),
    "from-best-without-resume": (["train", "--dataset", "data", "--from-best"],
                                 "--from-best goes with --resume"),
    "resume-into-new": (["train", "--dataset", "data", "--run-dir", "run"], "already holds a run"),
    "experiment-bad-setting": (["experiment", "affnist", "--max-rotation", "400"],
                               "argument --max-rotation: expected a number in [0, 180]"),
    "experiment-scales-crossed": (["experiment", "affnist", "--dataset", "data", "--min-scale",
                                   "2", "--max-scale", "1"], "min_scale <= max_scale"),
    "experiment-augment": (["experiment", "multimnist", "--dataset", "data", "--augment",
                            "efficient"], "experiment multimnist places and shifts its digits "
                            "itself; --augment efficient is for capsnet train"),
    "experiment-crop-rotation": (["experiment", "affnist", "--dataset", "data", "--crop", "24",
                                  "--rotation", "10"], "experiment affnist places and shifts its "
                                 "digits itself; --crop 24 and --rotation 10.0 are for capsnet train"),
    "explore-port": (["explore", "run", "--port", "70000"], "expected an integer in [0, 65,535]"),
    "flag-the-network-ignores": (["train", "--dataset", "data", "--preset", "em",
                                  "--primary-maps", "8", *TRAIN], "--primary-maps 8 would change "
                                 "nothing: em-capsnet does not use it"),
    "lr-zero": (["train", "--lr", "0"], "argument --lr: expected a number in (0, 1), got '0'"),
    "warmup-negative": (["train", "--warmup-steps", "-1"], "argument --warmup-steps"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(name: str, workspace: Path) -> None:
    argv, expected = CASES[name]
    before = snapshot(workspace)
    refuses_in_one_line(argv, workspace, expected)
    assert snapshot(workspace) == before


def test_a_bug_is_one_line_too(tmp_path: Path, monkeypatch, capsys) -> None:
    """An exception that is not the user's fault: one line, exit 1, the traceback on request."""
    import capsnet.cli.tools as tools

    monkeypatch.setattr(tools, "load_splits", lambda *a, **k: 1 / 0)
    assert main(["data", "mnist"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error, please report it: ZeroDivisionError" in err
    monkeypatch.setenv("CAPSNET_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["data", "mnist"])


def test_resume_from_best_keeps_the_damaged_last(workspace: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(workspace / "damaged-run", run)
    damaged = (run / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run), "--from-best", "--epochs", "2",
                 "--no-progress"]) == 0
    kept = [p for p in run.glob("last.*.pt")]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert load_checkpoint(run / "last.pt")["progress"]["epoch"] == 2
