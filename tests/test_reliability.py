"""Nothing lost, nothing trusted blindly.

* checkpoints: a checksum over their content catches what ``torch.load`` does not (a
  flipped bit in tensor data); corrupt, truncated, foreign or code-carrying files are
  refused with one line, and nothing in them is executed;
* writes are atomic: a run SIGKILLed at random moments and resumed ends with exactly the
  weights of an uninterrupted run, and every checkpoint seen on disk in between loads;
* a failing write or a non-finite loss stops training with one line and leaves the last
  good checkpoints as they were;
* bad input of every kind (flags, data files, images, checkpoints) is one stderr line and
  exit code 2.

The IDX and image parsers are fuzzed in test_fuzz.py; the checksum of downloaded data in
test_data.py (test_bad_checksum_is_skipped_and_failure_lists_every_source).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import capsnet.training.task
from capsnet.training.checkpoint import (FORMAT, VERSION, load_checkpoint, model_from_checkpoint,
                                save_checkpoint, state_digest)
from capsnet.cli import main
from capsnet.training.config import make_config
from capsnet.training.run import Run
from capsnet.data import FILE_NAMES, read_idx, write_idx
from capsnet.errors import CapsNetError
from capsnet.nn.model import CapsNet, CapsNetConfig

from conftest import synthetic_digits, write_dataset

CAPSNET = shutil.which("capsnet", path=str(Path(sys.executable).parent)) or "capsnet"
EPOCHS = 3
KILL_SEED = 2024
KILLS = 4  # SIGKILLs planned; at least 3 must happen before the run has trained all epochs


def train_args(dataset: Path) -> list[str]:
    """3 epochs of 2 steps of 8 images, deterministic on the CPU."""
    return ["--dataset", str(dataset), "--device", "cpu", "--deterministic", "--no-progress",
            "--train-limit", "16", "--batch-size", "8", "--val-size", "10", "--epochs", str(EPOCHS)]


def cli(argv: list[Any], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one ``capsnet: ...`` line on stderr holding ``needles``."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsnet: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- small checkpoints for the format tests ------------------------------------------------

TINY = CapsNetConfig(image_size=17, conv1_channels=4, primary_maps=2, digit_dim=4,
                     decoder_hidden=(8,), num_classes=3)


def tiny_payload(seed: int = 0) -> dict[str, Any]:
    """A training payload of a 17x17 three-class CapsNet after one Adam step."""
    torch.manual_seed(seed)
    model = CapsNet(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(torch.rand(2, 1, 17, 17), torch.tensor([0, 2]))
    (out.lengths.sum() + out.reconstructions.mean()).backward()
    optimizer.step()
    return {"model_config": TINY.to_dict(), "train_config": make_config("paper").to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": {"epoch": 1, "batch": 0, "step": 1, "best": 0.5}}


@pytest.fixture(scope="module")
def tiny_checkpoint(module_tmp: Callable[[str], Path]) -> Path:
    path = module_tmp("tiny-ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_payload())
    return path


def raw_save(path: Path, payload: dict[str, Any], digest: bool = True) -> Path:
    """torch.save ``payload`` as a capsnet file, bypassing save_checkpoint's own checks."""
    full = {"format": FORMAT, "version": VERSION, **payload}
    if digest:
        full["sha256"] = state_digest(full)
    torch.save(full, path)
    return path


def tensor_record_offset(data: bytes) -> int:
    """Offset of the first byte of the largest tensor's bytes in a torch.save zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


# -- checkpoint integrity -----------------------------------------------------------------


def test_torch_load_alone_misses_a_flipped_bit_in_tensor_data(tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    """Why the checksum exists: torch.load does not check the zip CRC of tensor records."""
    data = bytearray(tiny_checkpoint.read_bytes())
    data[tensor_record_offset(bytes(data)) + 101] ^= 0x10
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    original = torch.load(tiny_checkpoint, weights_only=True)
    silently = torch.load(bad, weights_only=True)  # no error from PyTorch ...
    assert any(not torch.equal(original["model"][k], silently["model"][k]) for k in original["model"])
    with pytest.raises(CapsNetError, match=r"checksum mismatch .*the file is corrupt"):
        load_checkpoint(bad)  # ... but capsnet notices


def test_checkpoint_is_a_plain_weights_only_torch_file(tiny_checkpoint: Path) -> None:
    payload = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == VERSION
    assert payload["sha256"] == state_digest(payload) and len(payload["sha256"]) == 64
    loaded = load_checkpoint(tiny_checkpoint, resumable=True)
    model = model_from_checkpoint(loaded)
    for name, tensor in tiny_payload()["model"].items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_the_checksum_covers_every_value() -> None:
    payload = {"format": FORMAT, "version": VERSION, **tiny_payload()}
    digest = state_digest(payload)
    assert state_digest(payload) == digest  # stable
    changed = [
        lambda p: p["model"]["conv1.weight"].view(-1)[0].add_(1e-6),
        lambda p: p["optimizer"]["state"][0]["exp_avg"].view(-1)[3].fill_(7.0),
        lambda p: p["progress"].__setitem__("step", 2),
        lambda p: p["train_config"].__setitem__("lr", 0.002),
        lambda p: p["model_config"].__setitem__("decoder_hidden", [9]),
        lambda p: p.__setitem__("model", {**p["model"], "extra": torch.zeros(1)}),
        lambda p: p["model"].__setitem__("digits.weight", p["model"]["digits.weight"].double()),
        lambda p: p["model"].__setitem__("digits.weight", p["model"]["digits.weight"].reshape(-1)),
    ]
    for change in changed:
        copy = {"format": FORMAT, "version": VERSION, **tiny_payload()}
        change(copy)
        assert state_digest(copy) != digest


CORRUPTIONS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("overwrite"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero"), st.floats(0, 1, exclude_max=True), st.integers(1, 4096)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruption=CORRUPTIONS)
def test_any_corruption_is_refused_or_harmless(tiny_checkpoint: Path, corruption: tuple) -> None:
    """Random damage anywhere in the file: one-line CapsNetError, or (damage in bytes that
    carry no content, like a zip CRC field) exactly the original content."""
    original = tiny_checkpoint.read_bytes()
    kind, where, *args = corruption
    at = int(where * len(original))
    data = bytearray(original)
    if kind == "flip":
        data[at] ^= 1 << args[0]
    elif kind == "truncate":
        data = data[:at]
    elif kind == "overwrite":
        data[at:at + len(args[0])] = args[0]
    else:
        data[at:at + args[0]] = bytes(len(data[at:at + args[0]]))
    damaged = tiny_checkpoint.with_name("damaged.pt")
    damaged.write_bytes(bytes(data))
    try:
        payload = load_checkpoint(damaged)
    except CapsNetError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(damaged))
        return
    assert payload["sha256"] == torch.load(tiny_checkpoint, weights_only=True)["sha256"]
    assert state_digest(payload) == payload["sha256"]


def test_every_truncation_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "short.pt"
    for length in sorted({0, 1, 21, 22, len(data) - 1, *range(0, len(data), len(data) // 97)}):
        path.write_bytes(data[:length])
        with pytest.raises(CapsNetError, match="corrupt or truncated|not a capsnet"):
            load_checkpoint(path)


def broken_payloads() -> dict[str, tuple[dict[str, Any], bool, str]]:
    """name: (payload saved with a valid checksum, resumable?, expected message)."""
    nan_weights = tiny_payload()
    nan_weights["model"]["decoder.0.bias"][1] = float("nan")
    weights_only = tiny_payload()
    for key in ("optimizer", "progress", "train_config"):
        del weights_only[key]
    return {
        "weight-not-a-tensor": ({**tiny_payload(), "model": {"conv1.weight": [1.0, 2.0]}}, False,
                                "model entry 'conv1.weight' is not a named tensor"),
        "nan-weight": (nan_weights, False, "weight decoder.0.bias holds NaN or infinite values"),
        "no-weights": ({**tiny_payload(), "model": {}}, False, "checkpoint has no weights"),
        "progress-negative": ({**tiny_payload(), "progress": {"epoch": -1, "batch": 0, "step": 0,
                                                               "best_val_loss": 1.0}},
                              False, "checkpoint's progress: epoch must be an integer >= 0, got -1"),
        "optimizer-malformed": ({**tiny_payload(), "optimizer": {"state": []}}, False,
                                "optimizer state is malformed"),
        "weights-only-resumed": (weights_only, True, "has no train_config, so training cannot resume"),
        "model-config-missing": ({k: v for k, v in tiny_payload().items() if k != "model_config"},
                                 False, "checkpoint has no model_config"),
    }


@pytest.mark.parametrize("name", list(broken_payloads()))
def test_structure_is_checked_even_with_a_valid_checksum(name: str, tmp_path: Path) -> None:
    payload, resumable, expected = broken_payloads()[name]
    path = raw_save(tmp_path / f"{name}.pt", payload)
    with pytest.raises(CapsNetError) as info:
        load_checkpoint(path, resumable=resumable)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("progress, expected", [
    ({"epoch": -1, "batch": 0, "step": 0, "best": 1.0}, "epoch must be an integer >= 0, got -1"),
    ({"epoch": 1, "batch": 0, "step": "x", "best": 1.0}, "step must be an integer >= 0, got 'x'"),
    ({"epoch": 1, "best": 1.0}, "checkpoint's progress: missing batch, step"),
    ({"epoch": 1, "batch": 0, "step": 1, "best": float("nan")}, "best must be a number or an"),
    ({"epoch": 1, "batch": 1, "step": 1, "best": 1.0, "epoch_losses": [0.5, 0.5]},
     "epoch_losses holds 2 steps, more than the 1 of batch"),
    ({"epoch": 1, "batch": 0, "step": 1, "best": 1.0, "init_from": 3}, "init_from must be text"),
    ({"epoch": 1, "batch": 0, "step": 1, "best": 1.0, "surprise": 1}, "unknown settings 'surprise'"),
])
def test_a_hostile_progress_is_refused_in_one_line(tmp_path: Path, progress: dict[str, Any],
                                                   expected: str) -> None:
    path = raw_save(tmp_path / "hostile.pt", {**tiny_payload(), "progress": progress})
    with pytest.raises(CapsNetError) as info:
        load_checkpoint(path, resumable=True)
    message = str(info.value)
    assert message.startswith(f"{path}: checkpoint's progress") and expected in message
    assert "\n" not in message


@pytest.mark.parametrize("name, make, expected", [
    ("empty", lambda p: p.write_bytes(b""), "corrupt or truncated"),
    ("text", lambda p: p.write_text("model weights, honest\n"), "not a PyTorch checkpoint"),
    ("png", lambda p: Image.new("L", (4, 4)).save(p, "PNG"), "not a PyTorch checkpoint"),
    ("zip-of-other-things", lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "x"), "corrupt or truncated"),
    ("tensor", lambda p: torch.save(torch.zeros(3), p), "not a capsnet checkpoint"),
    ("no-checksum", lambda p: raw_save(p, tiny_payload(), digest=False), "has no checksum"),
    ("other-version", lambda p: raw_save(p, {**tiny_payload(), "version": 99}), "version 99 is not supported"),
    ("numpy-pickle", lambda p: torch.save({"a": np.zeros(3)}, p), "refused to load"),
])
def test_foreign_files_are_refused(tmp_path: Path, name: str, make, expected: str) -> None:
    path = tmp_path / f"{name}.pt"
    make(path)
    with pytest.raises(CapsNetError, match=expected):
        load_checkpoint(path)


# -- safe loading -------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs code: it writes the marker file named at pickling time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def write_exploit(path: Path, marker: Path, how: str) -> None:
    payload = {"format": FORMAT, "version": VERSION, "model_config": {}, "model": Exploit(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "torch.save-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "pickle"])
def test_code_in_a_checkpoint_is_never_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    write_exploit(evil, marker, how)
    # The file really is an exploit: plain unpickling runs it ...
    if how == "pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    # ... capsnet refuses it without running anything.
    with pytest.raises(CapsNetError, match="refused to load: not a plain-data checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.slow
def test_evaluate_refuses_an_exploit_in_a_real_process(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    write_exploit(evil, marker, "torch.save")
    result = subprocess.run([CAPSNET, "evaluate", str(evil)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"capsnet: {evil}: refused to load: not a plain-data "
                                    f"checkpoint (Unsupported global: GLOBAL exec")
    assert not marker.exists()


# -- writes -------------------------------------------------------------------------------


def disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failing_write_keeps_the_previous_checkpoint(tmp_path: Path, failing: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_payload(seed=0))
    before = file_hash(path)
    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(CapsNetError, match=r"could not write checkpoint .*last.pt: No space left "
                                           r"on device; the previous checkpoint is unchanged"):
        save_checkpoint(path, tiny_payload(seed=1))
    monkeypatch.undo()
    assert file_hash(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    load_checkpoint(path)


def test_nan_weights_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_payload())
    before = file_hash(path)
    payload = tiny_payload()
    payload["model"]["digits.weight"].view(-1)[5] = float("inf")
    with pytest.raises(CapsNetError, match="refused to write checkpoint .* weight digits.weight holds "
                                           "NaN or infinite values; the previous checkpoint is "
                                           "unchanged"):
        save_checkpoint(path, payload)
    assert file_hash(path) == before


def test_temporary_files_of_a_killed_writer_are_cleaned_up(tmp_path: Path) -> None:
    stale = [tmp_path / ".last.pt.k1ll3d.tmp", tmp_path / ".last.pt.x.tmp"]
    keep = [tmp_path / ".best.pt.abc.tmp", tmp_path / "notes.tmp"]
    for path in stale + keep:
        path.write_bytes(b"partial")
    save_checkpoint(tmp_path / "last.pt", tiny_payload())
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


# -- SIGKILL at random moments, then resume ------------------------------------------------


@dataclass
class Watched:
    returncode: int
    killed: bool
    seconds: float
    stderr: str
    last_saves: list[float] = field(default_factory=list)  # seconds after start
    snapshots: list[Path] = field(default_factory=list)


def watch_training(args: list[str], run_dir: Path, snapshots: Path, kill_after: float | None = None,
                   kill_at_save: int | None = None, timeout: float = 400) -> Watched:
    """Run ``capsnet train ARGS``; hard-link every new last.pt / best.pt that appears (a
    link keeps the exact file even after it is replaced); SIGKILL after ``kill_after`` s or,
    if sooner, as soon as the ``kill_at_save``-th new last.pt of this run is seen."""
    snapshots.mkdir(parents=True, exist_ok=True)
    seen = {}
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            st_ = os.stat(run_dir / name)
            seen[name] = (st_.st_ino, st_.st_mtime_ns)
    log = snapshots / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([CAPSNET, "train", *args], stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        start = time.monotonic()
        result = Watched(returncode=0, killed=False, seconds=0.0, stderr="")
        while True:
            finished = process.poll() is not None
            now = time.monotonic() - start
            for name in ("last.pt", "best.pt"):
                try:
                    st_ = os.stat(run_dir / name)
                    if seen.get(name) == (st_.st_ino, st_.st_mtime_ns):
                        continue
                    link = snapshots / f"{len(result.snapshots):03d}-{name}"
                    os.link(run_dir / name, link)
                except FileNotFoundError:
                    continue
                seen[name] = (st_.st_ino, st_.st_mtime_ns)
                result.snapshots.append(link)
                if name == "last.pt":
                    result.last_saves.append(now)
            if finished:
                break
            if kill_after is not None and (now >= kill_after or kill_at_save is not None
                                           and len(result.last_saves) >= kill_at_save):
                process.send_signal(signal.SIGKILL)
                process.wait()
                result.killed = True
                break
            if now > timeout:
                process.kill()
                pytest.fail(f"training did not finish in {timeout} s")
            time.sleep(0.02)
    result.returncode = process.returncode
    result.seconds = time.monotonic() - start
    result.stderr = log.read_text()
    return result


def verify_snapshots(result: Watched) -> int:
    """Each checkpoint observed on disk loads (checksum and structure); returns how many."""
    for path in result.snapshots:
        payload = load_checkpoint(path, resumable=path.name.endswith("last.pt"))
        assert 1 <= payload["progress"]["epoch"] <= EPOCHS
        path.unlink()  # hard links keep 100 MB each alive
    return len(result.snapshots)


def completed_epochs(run_dir: Path) -> int:
    last = run_dir / "last.pt"
    return load_checkpoint(last)["progress"]["epoch"] if last.exists() else 0


@pytest.fixture(scope="module")
def reference_run(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> dict[str, Any]:
    """An uninterrupted run in a real process, when it wrote each last.pt, and its first
    epoch's best.pt (``first_best``, as a kill right after writing it leaves it)."""
    root = module_tmp("reliability-reference")
    run_dir = root / "run"
    result = watch_training([*train_args(tiny_dataset), "--run-dir", str(run_dir)], run_dir,
                            root / "snapshots")
    assert result.returncode == 0, result.stderr
    first_best = next(p for p in result.snapshots if p.name.endswith("best.pt"))
    shutil.copy2(first_best, root / "first-best.pt")
    verify_snapshots(result)
    saves = result.last_saves  # all 3, unless this process was starved of CPU for a while
    assert saves and completed_epochs(run_dir) == EPOCHS
    per_epoch = ((saves[-1] - saves[0]) / (len(saves) - 1) if len(saves) > 1
                 else (result.seconds - saves[0]) / EPOCHS)
    return {"dir": run_dir, "seconds": result.seconds, "first_save": saves[0],
            "per_epoch": per_epoch, "first_best": root / "first-best.pt"}


def metrics(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [tuple(json.loads(line)[k] for k in ("epoch", "step", "train_loss", "val_loss",
                                                "val_accuracy", "improved")) for line in lines]


def continuing(run_dir: Path) -> list[str]:
    """What a user runs after a kill: resume from last.pt; from best.pt when the kill came
    between the first epoch's best.pt and last.pt (training refuses to start over it); else
    the same new run."""
    if (run_dir / "last.pt").exists():
        return ["--resume", str(run_dir)]
    if (run_dir / "best.pt").exists():
        return ["--resume", str(run_dir), "--from-best"]
    return ["--run-dir", str(run_dir)]


def kill_and_resume(rng: random.Random, reference_run: dict[str, Any], tiny_dataset: Path,
                    run_dir: Path, snapshots: Path) -> tuple[list[dict[str, Any]], int, Any]:
    """SIGKILL a training run at random moments, resuming it each time, until it completes;
    returns the kills, the checkpoints verified on disk and the completing process."""
    kills: list[dict[str, Any]] = []
    verified = 0
    final = None
    first_save, per_epoch = reference_run["first_save"], reference_run["per_epoch"]
    done = 0  # epochs in run_dir/last.pt
    for _ in range(KILLS):
        if done == EPOCHS:
            break
        # A random moment in this run's training, from the end of its start-up (imports,
        # data) to its last epoch-end save, as far as the latest timings tell; at the
        # latest, just after this process's first save (mid-validation, or writing best.pt).
        # One epoch at most a kill, so the planned kills all land before the run ends,
        # however fast the machine is against the timings.
        startup = max(0.5, first_save - per_epoch)
        delay = startup + rng.uniform(0.02, 1.0) * (EPOCHS - done) * per_epoch
        where = continuing(run_dir)
        temporaries = set(run_dir.glob(".*.pt.*.tmp"))
        result = watch_training([*train_args(tiny_dataset), *where], run_dir, snapshots, delay,
                                kill_at_save=1)
        verified += verify_snapshots(result)
        if not result.killed:  # it finished first
            final = result
            break
        if result.last_saves:  # the machine's speed now
            first_save = result.last_saves[0]
            if len(result.last_saves) > 1:
                per_epoch = (result.last_saves[-1] - result.last_saves[0]) / (len(result.last_saves) - 1)
        mid_write = sorted(p.name for p in set(run_dir.glob(".*.pt.*.tmp")) - temporaries)
        if (run_dir / "best.pt").exists():  # what the killed run left is whole
            load_checkpoint(run_dir / "best.pt")
        before, done = done, completed_epochs(run_dir)  # (loads last.pt)
        kills.append({"at_s": round(min(delay, result.seconds), 2), "epochs_before": before,
                      "epochs_after": done, "mid_write": mid_write,
                      "saves_seen": len(result.snapshots)})
    if final is None:
        where = continuing(run_dir)
        final = watch_training([*train_args(tiny_dataset), *where], run_dir, snapshots)
        verified += verify_snapshots(final)
    return kills, verified, final


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(
        reference_run: dict[str, Any], tiny_dataset: Path, tmp_path: Path) -> None:
    rng = random.Random(KILL_SEED)
    run_dir, snapshots = tmp_path / "run", tmp_path / "snapshots"
    kills, verified, final = kill_and_resume(rng, reference_run, tiny_dataset, run_dir, snapshots)
    assert final.returncode == 0, final.stderr
    print(f"\nSIGKILLs: {len(kills)} {kills}; checkpoints seen on disk and verified: {verified}")
    assert len(kills) >= 3

    # Exactly the uninterrupted run: model, optimizer state and progress (the digest
    # covers every value, so equal digests mean equal content), metrics and test results;
    # only the wall time the runs took differs.
    reference = reference_run["dir"]
    for name in ("last.pt", "best.pt"):
        mine, theirs = load_checkpoint(run_dir / name), load_checkpoint(reference / name)
        for payload in (mine, theirs):
            payload["progress"].pop("wall_seconds")
        differences = {k: float((mine["model"][k].double() - theirs["model"][k].double()).abs().max())
                       for k in theirs["model"] if not torch.equal(mine["model"][k], theirs["model"][k])}
        assert not differences, f"{name}: weights differ: {differences}"
        assert mine["progress"] == theirs["progress"]
        assert state_digest(mine) == state_digest(theirs)
    assert metrics(run_dir) == metrics(reference)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert (summary["test_loss"], summary["test_accuracy"]) == (expected["test_loss"],
                                                                expected["test_accuracy"])
    assert not list(run_dir.glob(".*.pt.*.tmp"))  # killed writers' temporaries were removed


def test_a_run_killed_between_its_first_best_and_last_resumes_from_best_exactly(
        reference_run: dict[str, Any], tiny_dataset: Path, tmp_path: Path) -> None:
    """Only the first epoch's best.pt on disk: a new run is refused over it, and --resume
    --from-best ends as the uninterrupted run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy2(reference_run["first_best"], run_dir / "best.pt")
    again = watch_training([*train_args(tiny_dataset), "--run-dir", str(run_dir)], run_dir,
                           tmp_path / "snapshots")
    assert again.returncode == 2 and "--from-best" in again.stderr
    final = watch_training([*train_args(tiny_dataset), *continuing(run_dir)], run_dir,
                           tmp_path / "snapshots")
    assert final.returncode == 0, final.stderr
    for name in ("last.pt", "best.pt"):
        mine, theirs = load_checkpoint(run_dir / name), load_checkpoint(reference_run["dir"] / name)
        for payload in (mine, theirs):
            payload["progress"].pop("wall_seconds")  # all else is the same
        assert state_digest(mine) == state_digest(theirs), name


# -- training stops cleanly ---------------------------------------------------------------


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        shutil.copy2(source / name, target / name)
    return target


def poison_batch(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    """Put a NaN pixel into training batch ``index`` of every epoch."""
    real = capsnet.training.task.batches

    def batches(*args: Any, **kwargs: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (images, labels) in enumerate(real(*args, **kwargs), start=kwargs.get("start", 0)):
            if i == index:
                images = images.clone()
                images[0, 0, 14, 14] = float("nan")
            yield images, labels

    monkeypatch.setattr(capsnet.training.task, "batches", batches)


@pytest.mark.slow
def test_nan_loss_stops_training_naming_the_step(reference_run: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_dir = copy_run(reference_run["dir"], tmp_path / "run")  # 3 epochs, 6 steps done
    before = {name: file_hash(run_dir / name) for name in ("last.pt", "best.pt")}
    poison_batch(monkeypatch, index=1)  # epoch 4 runs steps 7 and 8
    code, out, err = cli(["train", "--resume", run_dir, "--epochs", "4", "--no-progress"], capsys)
    assert_one_line(code, err, "loss became nan at step 8; training stopped",
                    f"the checkpoints in {run_dir} were left as they were")
    assert {name: file_hash(run_dir / name) for name in before} == before
    for name in before:  # the good checkpoints: finite (load_checkpoint checks) and at epoch 3
        assert load_checkpoint(run_dir / name)["progress"]["epoch"] == 3
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_full_disk_stops_training_and_keeps_the_checkpoints(
        reference_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys) -> None:
    run_dir = copy_run(reference_run["dir"], tmp_path / "run")
    before = {name: file_hash(run_dir / name) for name in ("last.pt", "best.pt")}
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst).endswith(".pt"):
            disk_full()
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)  # the epoch-4 checkpoints cannot be written
    code, out, err = cli(["train", "--resume", run_dir, "--epochs", "4", "--no-progress"], capsys)
    assert_one_line(code, err, "could not write checkpoint", "No space left on device",
                    "the previous checkpoint is unchanged")
    assert {name: file_hash(run_dir / name) for name in before} == before
    assert not list(run_dir.glob(".*.tmp"))


def test_full_disk_from_the_start_is_one_line(tiny_dataset: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(os, "fsync", disk_full)
    run_dir = tmp_path / "run"
    code, out, err = cli(["train", *train_args(tiny_dataset), "--run-dir", run_dir], capsys)
    # the first file a run writes is train.pid, the record of the process training there
    assert_one_line(code, err, f"could not write {run_dir / 'train.pid'}: No space left on device")
    assert not (run_dir / "last.pt").exists() and not list(run_dir.glob(".*.tmp"))


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path: Path) -> None:
    """A crash can leave half a line at the end of metrics.jsonl; resume drops it."""
    run_dir = tmp_path
    good = json.dumps({"epoch": 1, "step": 3, "train_loss": 0.5})
    (run_dir / "metrics.jsonl").write_text(good + "\n" + '{"epoch": 2, "step": 6, "train_lo')
    Run(run_dir).metrics_log(keep_steps=3).close()
    assert (run_dir / "metrics.jsonl").read_text() == good + "\n"


# -- bad input: one line on stderr, exit code 2 ---------------------------------------------
# (test_cli.py covers missing / text / foreign / truncated checkpoints, --epochs 0,
# --batch-size -1, --lr abc / 5, --resume of nothing and an unknown data set folder.)

BAD_FLAGS = {
    "batch-size-zero": (["--batch-size", "0"], "argument --batch-size: expected an integer in [1, 65,536], got '0'"),
    "batch-size-float": (["--batch-size", "1e3"], "argument --batch-size: expected an integer in [1, 65,536], got '1e3'"),
    "epochs-negative": (["--epochs", "-5"], "argument --epochs"),
    "lr-nan": (["--lr", "nan"], "argument --lr: expected a number in (0, 1), got 'nan'"),
    "lr-inf": (["--lr", "inf"], "argument --lr: expected a number in (0, 1), got 'inf'"),
    "lr-negative": (["--lr", "-0.001"], "argument --lr"),
    "lr-decay-above-1": (["--lr-decay", "2"], "argument --lr-decay: expected a number in (0, 1], got '2'"),
    "recon-weight-nan": (["--reconstruction-weight", "nan"], "argument --reconstruction-weight: expected a number in [0, 1], got 'nan'"),
    "recon-weight-negative": (["--reconstruction-weight", "-1"], "argument --reconstruction-weight: expected a number in [0, 1]"),
    "recon-weight-huge": (["--reconstruction-weight", "1e9"], "argument --reconstruction-weight"),
    "max-shift-absurd": (["--max-shift", "100"], "argument --max-shift: expected an integer in [0, 8], got '100'"),
    "train-limit-negative": (["--train-limit", "-1"], "argument --train-limit: expected an integer >= 0"),
    "val-size-negative": (["--val-size", "-1"], "argument --val-size"),
    "val-size-absurd": (["--val-size", "1000000"], "validation size 1000000 must be between 1 and 239"),
    "routing-zero": (["--routing-iterations", "0"], "argument --routing-iterations"),
    "seed-negative": (["--seed", "-3"], "argument --seed"),
    "device-unknown": (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "precision-unknown": (["--precision", "fp8"], "argument --precision: invalid choice"),
    "preset-unknown": (["--preset", "fast"], "argument --preset: invalid choice"),
    "unknown-flag": (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
}


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_training_flags(name: str, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    flags, expected = BAD_FLAGS[name]
    # Sane settings first: the bad flag (given last) is the only problem.
    argv = ["train", *train_args(tiny_dataset), "--epochs", "1", "--run-dir", tmp_path / "run", *flags]
    code, out, err = cli(argv, capsys)
    assert_one_line(code, err, expected)
    assert out == "" and not (tmp_path / "run" / "last.pt").exists()


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


TRAIN_IMAGES, TRAIN_LABELS = FILE_NAMES["train_images"], FILE_NAMES["train_labels"]
TEST_IMAGES, TEST_LABELS = FILE_NAMES["test_images"], FILE_NAMES["test_labels"]

BAD_DATA = {
    "missing-file": (lambda d: (d / TEST_LABELS).unlink(), f"missing {TEST_LABELS} (raw or .gz)"),
    "empty-file": (lambda d: (d / TRAIN_IMAGES).write_bytes(b""),
                   f"{TRAIN_IMAGES}: too short for an IDX header (0 bytes)"),
    "not-idx": (lambda d: (d / TRAIN_IMAGES).write_text("P5 28 28 255\n"), "bad IDX magic number"),
    "float-idx": (lambda d: (d / TRAIN_LABELS).write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4),
                  "bad IDX magic number 0x00000d01"),
    "four-dims": (lambda d: (d / TRAIN_IMAGES).write_bytes(bytes([0, 0, 8, 4]) + b"\0\0\0\1" * 4 + b"x"),
                  "IDX file has 4 dimensions, expected 1 to 3"),
    "truncated-images": (lambda d: truncate(d / TRAIN_IMAGES, 5000), "truncated: 4984 data bytes"),
    "trailing-bytes": (lambda d: (d / TEST_LABELS).write_bytes((d / TEST_LABELS).read_bytes() + b"\0"),
                       "1 bytes of trailing data"),
    "corrupt-gzip": (lambda d: ((d / TRAIN_IMAGES).unlink(), (d / (TRAIN_IMAGES + ".gz")).write_bytes(
        b"\x1f\x8b\x08\x00" + b"\xff" * 40)), "corrupt gzip stream"),
    "count-mismatch": (lambda d: write_idx(d / TRAIN_LABELS, read_idx(d / TRAIN_LABELS)[:-3]),
                       "240 images but 237 labels"),
    "labels-as-images": (lambda d: shutil.copy(d / TRAIN_LABELS, d / TRAIN_IMAGES),
                         "images must have 3 dimensions (N, H, W) or 4 (N, C, H, W), got (240,)"),
    "not-square": (lambda d: [write_idx(d / name, read_idx(d / name)[:, :, :20])
                              for name in (TRAIN_IMAGES, TEST_IMAGES)],
                   "images must be square, got (28, 20)"),
    "test-size-differs": (lambda d: write_idx(d / TEST_IMAGES, synthetic_digits(60, 20)[0]),
                          "test images (20, 20) differ from training images (28, 28)"),
    "empty-dimension": (lambda d: (d / TEST_LABELS).write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 0])),
                        "IDX file has an empty dimension (0,)"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data_files(name: str, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    damage, expected = BAD_DATA[name]
    folder = copy_dataset(tiny_dataset, tmp_path / "data")
    damage(folder)
    code, out, err = cli(["data", folder], capsys)
    assert_one_line(code, err, expected)


@pytest.fixture(scope="module")
def untrained_checkpoint(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A resumable checkpoint of a fresh 28x28 ten-class CapsNet for the tiny data set."""
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(routing_iterations=3))
    config = make_config("paper", dataset=str(tiny_dataset), val_size=10, device="cpu",
                         batch_size=8, train_limit=16, epochs=2)
    path = module_tmp("untrained") / "run" / "last.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "train_config": config.to_dict(),
                           "model": model.state_dict(),
                           "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
                           "progress": {"epoch": 1, "batch": 0, "step": 2, "best_val_loss": 1.0}})
    return path


def png_of(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def digit_png(path: Path) -> Path:
    return png_of(synthetic_digits(1, seed=5)[0][0], path)


BAD_IMAGES = {
    "empty": (lambda p: p.write_bytes(b""), ".png", "empty file"),
    "html-as-jpeg": (lambda p: p.write_text("<html>404</html>"), ".jpg", "not an image file"),
    "truncated-png": (lambda p: p.write_bytes(digit_png(p).read_bytes()[:60]), ".png",
                      "corrupt or truncated image"),
    "blank": (lambda p: png_of(np.zeros((28, 28), np.uint8), p), ".png", "the image is blank"),
    "nan-npy": (lambda p: np.save(p, np.full((28, 28), np.nan, np.float32)), ".npy",
                "array holds NaN or infinite values"),
    "inf-npy": (lambda p: np.save(p, np.where(np.eye(28) > 0, np.inf, 0.0)), ".npy",
                "array holds NaN or infinite values"),
    "float-out-of-range": (lambda p: np.save(p, np.full((28, 28), 2.0)), ".npy",
                           "float pixel values must lie in [0, 1]"),
    "object-npy": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                   ".npy", "not a valid .npy array"),
    "four-dims-npy": (lambda p: np.save(p, np.zeros((2, 2, 28, 28))), ".npy",
                      "array of shape (2, 2, 28, 28) is not an image"),
    "empty-npy": (lambda p: np.save(p, np.zeros((0, 28))), ".npy", "array of shape (0, 28, 1) has no pixels"),
    "directory": (lambda p: p.mkdir(), ".png", "a folder without image files"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_for_predict(name: str, untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    make, suffix, expected = BAD_IMAGES[name]
    path = tmp_path / f"input{suffix}"
    make(path)
    code, out, err = cli(["predict", untrained_checkpoint, path], capsys)
    assert_one_line(code, err, f"{path}: {expected}")
    assert out == ""


def test_predict_and_evaluate_work_with_the_fixture_checkpoint(untrained_checkpoint: Path,
                                                               tmp_path: Path, capsys) -> None:
    """The control for the bad-input tests: the same checkpoint with good input is fine."""
    code, out, err = cli(["predict", untrained_checkpoint, digit_png(tmp_path / "digit.png")], capsys)
    assert code == 0 and err == "" and out.startswith(f"{tmp_path / 'digit.png'}: ")
    code, out, err = cli(["evaluate", untrained_checkpoint, "--split", "val", "--json"], capsys)
    assert code == 0 and json.loads(out)["total"] == 10


def damaged_copy(source: Path, target: Path, how: str) -> Path:
    data = bytearray(source.read_bytes())
    if how == "flip":
        data[tensor_record_offset(bytes(data)) + 4096] ^= 0x04
    else:
        data = data[:len(data) // 2]
    target.write_bytes(bytes(data))
    return target


def tiny_variant(path: Path, **changes: Any) -> Path:
    """A tiny checkpoint with a valid checksum whose entries are changed by ``changes``."""
    payload = tiny_payload()
    for key, value in changes.items():
        payload[key] = value(payload[key]) if callable(value) else value
    save_checkpoint(path, payload)
    return path


BAD_CHECKPOINTS = {
    "flipped-bit": (lambda ckpt, d: ["evaluate", damaged_copy(ckpt, d / "flip.pt", "flip")],
                    "checksum mismatch (stored sha256"),
    "half-a-file": (lambda ckpt, d: ["predict", damaged_copy(ckpt, d / "half.pt", "half"), digit_png(d / "x.png")],
                    "corrupt or truncated checkpoint"),
    "directory-without-checkpoint": (lambda ckpt, d: ["evaluate", d], "a folder without a model"),
    "config-does-not-fit-weights": (
        lambda ckpt, d: ["evaluate", tiny_variant(d / "c.pt", model_config=lambda c: {**c, "digit_dim": 5})],
        "weights do not fit the model config"),
    "bad-model-config": (
        lambda ckpt, d: ["evaluate", tiny_variant(d / "c.pt", model_config=lambda c: {**c, "image_size": 3})],
        "bad model config (image_size 3 is too small"),
    "unknown-train-setting": (
        lambda ckpt, d: ["evaluate", tiny_variant(d / "c.pt", train_config=lambda c: {**c, "warp": 9})],
        "training settings: unknown settings 'warp'"),
    "other-image-size": (lambda ckpt, d: ["evaluate", ckpt, "--dataset", write_dataset(
        d / "d20", n_train=30, n_test=10, size=20)], "takes 1x28x28 images, 10 classes; "),
    "labels-out-of-range": (lambda ckpt, d: ["evaluate", ckpt, "--dataset", labels_up_to(ckpt, d, 12)],
                            "test: label 12 out of range 0..9"),
    "resume-onto-other-data": (lambda ckpt, d: ["train", "--resume", resumable_elsewhere(ckpt, d)],
                               "the checkpoint's model does not fit this run's data"),
    "resume-weights-only": (lambda ckpt, d: ["train", "--resume", weights_only_run(d)],
                            "has no train_config, so training cannot resume"),
}


def labels_up_to(checkpoint: Path, folder: Path, top: int) -> Path:
    data = copy_dataset(Path(load_checkpoint(checkpoint)["train_config"]["dataset"]), folder / "labels")
    labels = read_idx(data / TEST_LABELS).copy()
    labels[0] = top
    write_idx(data / TEST_LABELS, labels)
    return data


def resumable_elsewhere(checkpoint: Path, folder: Path) -> Path:
    """A run directory whose last.pt was trained on 28x28 images, now pointing at 20x20 data."""
    payload = load_checkpoint(checkpoint)
    other = write_dataset(folder / "d20", n_train=30, n_test=10, size=20)
    payload["train_config"] = {**payload["train_config"], "dataset": str(other)}
    save_checkpoint(folder / "run" / "last.pt", payload)
    return folder / "run"


def weights_only_run(folder: Path) -> Path:
    payload = tiny_payload()
    save_checkpoint(folder / "run" / "last.pt", {k: payload[k] for k in ("model_config", "model")})
    return folder / "run"


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_and_mismatches(name: str, untrained_checkpoint: Path, tmp_path: Path,
                                        capsys) -> None:
    make, expected = BAD_CHECKPOINTS[name]
    code, out, err = cli(make(untrained_checkpoint, tmp_path), capsys)
    assert_one_line(code, err, expected)
