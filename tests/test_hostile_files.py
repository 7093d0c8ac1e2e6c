"""Hostile folders and files around a run: a folder holding any part of someone's run, two
processes on one folder, run files that are FIFOs, folders or links to devices, outputs
that are not regular files or are the command's own input, and a cache with no usable
home. Each ends with exit code 2 and one line on stderr (or a correct answer), and leaves
what the user made as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from capsnet.errors import CapsNetError
from capsnet.nn.pretrained import WEIGHTS
from capsnet.training.checkpoint import load_checkpoint
from capsnet.training.run import Run
from capsnet.utils import files
from capsnet.utils.files import (atomic_write_bytes, cache_root, read_regular, same_file,
                                 write_to_cache)
from test_cli import TIMEOUT, cli, train_args

CAPSNET = str(Path(sys.executable).with_name("capsnet"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = os.geteuid() == 0
SHIPPED = Path(__file__).parents[1] / "src" / "capsnet" / "pretrained" / "mnist" / WEIGHTS
HOLD = """import sys, time
from capsnet.training.run import Run
run = Run(sys.argv[1])
with run.training_here() if sys.argv[2] == "pid" else run.claimed(new=False):
    print("holding", flush=True)
    time.sleep(300)
"""


# -- helpers -------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` as what it is: a regular file by a hash of its bytes, a
    link by its target, anything else by its kind and inode (never opened)."""
    state = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                state[str(path)] = f"-> {os.readlink(path)}"
            else:
                state[str(path)] = f"{stat.filemode(info.st_mode)} {info.st_ino}"
    return state


def one_line(code: int, out: str, err: str, expected: str) -> None:
    """Exit code 2, nothing on stdout, one ``capsnet:`` line holding ``expected``."""
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("capsnet: "), err
    assert expected in err and "Traceback" not in err, err


def capsnet(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command in a process of its own: a FIFO that hangs it fails the test."""
    return subprocess.run([CAPSNET, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=ENV)


def refused_in_a_process(args: list[str | Path], expected: str) -> None:
    done = capsnet(*args)
    one_line(done.returncode, done.stdout, done.stderr, expected)


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A finished 1-epoch run of a small model."""
    run_dir = module_tmp("hostile-files") / "run"
    code, _, err = cli(*train_args(tiny_dataset), "--run-dir", run_dir)
    assert code == 0, err
    return run_dir


@pytest.fixture()
def run_copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture()
def holder() -> Iterator[Callable[[Path, str], subprocess.Popen]]:
    """Start a process that holds a run folder (``pid``: as a training does, train.pid
    included; ``lock``: its lock alone) until it is killed."""
    started = []

    def hold(run_dir: Path, how: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), how],
                                   stdout=subprocess.PIPE, text=True, env=ENV)
        started.append(process)
        assert process.stdout.readline() == "holding\n"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


# -- 1. a failed command changes nothing; one process per run folder -------------------------

SOMEONES_RUN = {  # name -> how it is made in an otherwise empty folder
    **{name: "file" for name in ("best.pt", "config.json", "metrics.jsonl", "summary.json",
                                 "train.pid", "train.log", WEIGHTS, "last.20261203-101010.pt",
                                 ".last.pt.4242.0a1b2c3d.tmp")},
    "figures": "folder",
    "capsnet/last.pt": "file",  # a model of an experiment of several
}


@pytest.mark.parametrize("entry", list(SOMEONES_RUN))
def test_a_new_run_refuses_a_folder_with_any_part_of_a_run(entry: str, tiny_dataset: Path,
                                                           tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    (keep / entry).parent.mkdir(parents=True)
    if SOMEONES_RUN[entry] == "folder":
        (keep / entry).mkdir()
    else:
        (keep / entry).write_bytes(b"someone's")
    before = snapshot(tmp_path)
    one_line(*cli(*train_args(tiny_dataset), "--run-dir", keep),
             f"{keep} already holds a run ({entry} is there); ")
    assert snapshot(tmp_path) == before


def test_an_experiment_refuses_a_folder_with_a_best_pt(tiny_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "best.pt").write_bytes(b"someone's")
    before = snapshot(tmp_path)
    one_line(*cli("experiment", "affnist", "--dataset", tiny_dataset, "--run-dir",
                  tmp_path / "keep"), "already holds a run (best.pt is there)")
    assert snapshot(tmp_path) == before


def test_a_start_killed_before_its_first_checkpoint_is_started_over(tmp_path: Path) -> None:
    """What a training SIGKILLed before its first checkpoint leaves (its stale train.pid,
    config.json, metrics.jsonl, a half-written best.pt) holds nothing to resume: the same
    command starts the run over. Any checkpoint makes it a run to resume."""
    run = Run(tmp_path)
    for name in ("config.json", "metrics.jsonl", ".best.pt.4242.0a1b2c3d.tmp"):
        (tmp_path / name).write_text("{}")
    run.pid_file.write_text("999999999\n")  # a process that has ended
    run.check_unused()
    for name, way in (("best.pt", f"use --resume {tmp_path} --from-best to continue it"),
                      ("last.pt", f"use --resume {tmp_path} to continue it")):
        (tmp_path / name).write_bytes(b"a checkpoint")
        with pytest.raises(CapsNetError, match=re.escape(f"(best.pt is there); {way}, or")):
            run.check_unused()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_from_best_on_a_missing_device_changes_nothing(run_copy: Path) -> None:
    before = snapshot(run_copy)
    one_line(*cli("train", "--resume", run_copy, "--from-best", "--device", "cuda"),
             "--device cuda: no CUDA device is available")
    assert snapshot(run_copy) == before


def test_last_pt_is_set_aside_by_the_first_write_only(tmp_path: Path) -> None:
    run = Run(tmp_path)
    for n, content in enumerate((b"first", b"second")):
        run.last.write_bytes(content)
        run.set_last_aside()
        assert run.last.read_bytes() == content  # a check that fails now loses nothing
        run.write_config({"n": n})
        assert not run.last.exists()
    kept = sorted(tmp_path.glob("last.*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert [p.read_bytes() for p in kept] == [b"first", b"second"]  # none overwritten


@pytest.mark.parametrize("how, message", [("pid", "is being trained by process {pid}"),
                                          ("lock", "is being trained by another process")])
def test_a_second_process_on_a_locked_folder_is_refused(how: str, message: str, run_copy: Path,
                                                         holder) -> None:
    process = holder(run_copy, how)
    before = snapshot(run_copy)
    expected = f"{run_copy} " + message.format(pid=process.pid)
    one_line(*cli("train", "--resume", run_copy, "--epochs", "2", "--no-progress"), expected)
    with pytest.raises(CapsNetError, match="is being trained by"):
        with Run(run_copy).claimed(new=False):
            pass
    assert snapshot(run_copy) == before


def test_a_new_run_into_a_locked_empty_folder_is_refused(tmp_path: Path, holder,
                                                          tiny_dataset: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    holder(empty, "lock")
    before = snapshot(tmp_path)
    one_line(*cli(*train_args(tiny_dataset), "--run-dir", empty),
             f"{empty} is being trained by another process")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_killed_holder_does_not_block_the_next_run(run_copy: Path, holder) -> None:
    process = holder(run_copy, "pid")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_copy / "train.lock").exists() and (run_copy / "train.pid").exists()  # stale
    code, _, err = cli("train", "--resume", run_copy, "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert load_checkpoint(run_copy / "last.pt")["progress"]["epoch"] == 2
    assert not (run_copy / "train.lock").exists() and not (run_copy / "train.pid").exists()


@pytest.mark.slow
def test_two_trainings_started_together_in_one_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [CAPSNET, *train_args(tiny_dataset), "--run-dir", str(run_dir)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV) for _ in range(2)]
    results = sorted((p.wait(TIMEOUT), *p.communicate()) for p in processes)
    assert [code for code, _, _ in results] == [0, 2]
    _, out, err = results[1]  # refused by the lock, or, when it came late, by the run
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith((f"capsnet: {run_dir} is being trained by",
                           f"capsnet: {run_dir} already holds a run")), err
    assert load_checkpoint(run_dir / "last.pt")["progress"]["epoch"] == 1
    assert {p.name for p in run_dir.iterdir()} == {"best.pt", "last.pt", "config.json",
                                                    "metrics.jsonl", "summary.json"}


@pytest.mark.slow
def test_a_detached_training_that_fails_leaves_the_folder_as_it_was(tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    run_dir = tmp_path / "run"
    code, _, err = cli(*train_args(data), "--run-dir", run_dir)
    assert code == 0, err
    (run_dir / "train.log").write_text("an earlier call\n")
    images = next(data.glob("train-images*"))
    images.write_bytes(images.read_bytes()[:100])  # only the training, once started, sees it
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(tmp_path)
    refused_in_a_process(["train", "--resume", run_dir, "--epochs", "2", "--detach"],
                         images.name)
    refused_in_a_process([*train_args(data), "--run-dir", empty, "--detach"], images.name)
    assert snapshot(tmp_path) == before


# -- 2. outputs over what is not a regular file, or over the input ---------------------------

def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_link(path: Path, target: str | Path) -> Path:
    path.symlink_to(target)
    return path


NOT_REGULAR: dict[str, Callable[[Path], Path]] = {
    "fifo": lambda d: make_fifo(d / "out"),
    "folder": lambda d: (d / "out").mkdir() or d / "out",
    "link to /dev/null": lambda d: make_link(d / "out", "/dev/null"),
    "link to a fifo": lambda d: make_link(d / "out", make_fifo(d / "fifo")),
    "link to a folder": lambda d: make_link(d / "out", d),
}
KIND = {"fifo": "a named pipe (FIFO)", "folder": "a folder", "link to /dev/null":
        "a character device", "link to a fifo": "a named pipe (FIFO)", "link to a folder":
        "a folder"}


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
def test_the_atomic_writer_replaces_regular_files_only(kind: str, tmp_path: Path) -> None:
    out = NOT_REGULAR[kind](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(out, b"data")
    assert raised.value.errno == errno.EEXIST
    assert raised.value.strerror.startswith(f"it is {KIND[kind]}, not a regular file")
    assert snapshot(tmp_path) == before  # no temporary file either


@pytest.mark.skipif(ROOT, reason="as root a failure would replace the real /dev/null")
def test_the_atomic_writer_never_replaces_dev_null() -> None:
    with pytest.raises(OSError, match="it is a character device"):
        atomic_write_bytes("/dev/null", b"data")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_link_to_a_regular_file_is_replaced_and_its_target_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"kept")
    for link, points_to in ((tmp_path / "link", target), (tmp_path / "dangling", "missing")):
        link.symlink_to(points_to)
        atomic_write_bytes(link, b"new")
        assert not link.is_symlink() and link.read_bytes() == b"new"
    assert target.read_bytes() == b"kept" and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
def test_export_refuses_an_output_that_is_not_a_regular_file(kind: str, tmp_path: Path) -> None:
    out = NOT_REGULAR[kind](tmp_path)
    before = snapshot(tmp_path)
    expected = ("is a folder" if "folder" in kind
                else f"could not write {out}: it is {KIND[kind]}, not a regular file")
    one_line(*cli("export", "mnist", "--format", "safetensors", "--out", out), expected)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(ROOT, reason="as root a failure would replace the real /dev/null")
def test_export_to_dev_null_is_refused() -> None:
    code, out, err = cli("export", "mnist", "--format", "safetensors", "--out", "/dev/null")
    one_line(code, out, err, "/dev")  # refused as a device, or as a folder one cannot write in
    assert "it is a character device" in err or "cannot write in /dev" in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("how", ["the file", "a link to it", "a hard link to it", "its folder"])
def test_export_refuses_to_write_over_its_own_input(how: str, tmp_path: Path) -> None:
    model = tmp_path / "pretrained" / WEIGHTS
    model.parent.mkdir()
    shutil.copyfile(SHIPPED, model)
    out = {"the file": model, "a link to it": make_link(tmp_path / "link", model),
           "a hard link to it": tmp_path / "hard", "its folder": model}[how]
    if how == "a hard link to it":
        os.link(model, out)
    source = model.parent if how == "its folder" else model
    before = snapshot(tmp_path)
    one_line(*cli("export", source, "--format", "safetensors", "--out", out),
             f"{out} is the model being exported ({model}); name another file")
    assert snapshot(tmp_path) == before


def test_export_through_a_link_replaces_the_link_only(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"kept")
    link = make_link(tmp_path / "model.safetensors", target)
    code, out, err = cli("export", "mnist", "--format", "safetensors", "--out", link)
    assert code == 0 and out.startswith(f"wrote {link}"), err
    assert not link.is_symlink() and target.read_bytes() == b"kept"


def test_export_on_a_full_disk_is_one_line(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    before = snapshot(tmp_path)
    one_line(*cli("export", "mnist", "--format", "safetensors", "--out", out),
             f"could not write {out}: No space left on device")
    assert snapshot(tmp_path) == before


# -- 3. run folders with odd entries ----------------------------------------------------------

def replace_with(make: Callable[[Path], object]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        path.unlink(missing_ok=True)
        make(path)
    return change


TO_DEV_ZERO = replace_with(lambda p: p.symlink_to("/dev/zero"))
ODD_ENTRIES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "metrics.jsonl FIFO": ("metrics.jsonl", replace_with(os.mkfifo)),
    "metrics.jsonl folder": ("metrics.jsonl", replace_with(os.mkdir)),
    "metrics.jsonl to /dev/zero": ("metrics.jsonl", TO_DEV_ZERO),
    "config.json folder": ("config.json", replace_with(os.mkdir)),
    "summary.json FIFO": ("summary.json", replace_with(os.mkfifo)),
    "train.pid FIFO": ("train.pid", replace_with(os.mkfifo)),
    "train.log FIFO": ("train.log", replace_with(os.mkfifo)),
    "last.pt FIFO": ("last.pt", replace_with(os.mkfifo)),
    "best.pt to /dev/zero": ("best.pt", TO_DEV_ZERO),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ODD_ENTRIES))
def test_odd_entries_in_a_run_folder_are_one_line(case: str, run_copy: Path) -> None:
    name, change = ODD_ENTRIES[case]
    change(run_copy / name)
    before = snapshot(run_copy)
    for args in (["train", "--resume", run_copy, "--epochs", "2", "--no-progress"],
                 ["status", run_copy]):
        done = capsnet(*args)
        one_line(done.returncode, done.stdout, done.stderr, f"{run_copy / name}: ")
        assert "not a regular file" in done.stderr
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("name, size", [("metrics.jsonl", 300 * 2**20), ("config.json", 17 * 2**20),
                                        ("train.pid", 65)])
def test_run_files_larger_than_capsnet_writes_are_refused(name: str, size: int,
                                                          run_copy: Path) -> None:
    with open(run_copy / name, "ab") as f:
        f.truncate(size)  # sparse: nothing is written
    before = snapshot(run_copy)
    one_line(*cli("status", run_copy), f"{run_copy / name}: the ")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo, lambda p: p.symlink_to("elsewhere")])
def test_an_odd_lock_file_is_one_line(make, tmp_path: Path) -> None:
    make(tmp_path / "train.lock")
    before = snapshot(tmp_path)
    with pytest.raises(CapsNetError, match="train.lock: cannot use it as the run folder's lock"):
        with Run(tmp_path).claimed(new=False):
            pass
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a named pipe (FIFO)"), (os.mkdir, "a folder"),
                                        (TO_DEV_ZERO, "a character device")])
def test_reading_refuses_what_is_not_a_regular_file(make, kind: str, tmp_path: Path) -> None:
    make(tmp_path / "file")
    with pytest.raises(CapsNetError, match=re.escape(f"file: the record is {kind}, not a regular")):
        read_regular(tmp_path / "file", "record", 100)
    assert read_regular(tmp_path / "missing", "record", 100) is None


def test_same_file_sees_through_links(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "hard")
    assert same_file(a, make_link(tmp_path / "soft", a)) and same_file(a, tmp_path / "hard")
    assert same_file(tmp_path / "new", tmp_path / "." / "new")
    assert not same_file(a, tmp_path / "new")


# -- 4. the cache folder ------------------------------------------------------------------

@pytest.fixture()
def no_xdg(monkeypatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return monkeypatch


def test_an_empty_home_is_the_home_of_the_account(no_xdg) -> None:
    no_xdg.setenv("HOME", "")
    assert cache_root() == Path(files.account_home()) / ".cache" / "capsnet"
    no_xdg.setattr(files, "account_home", lambda: "")
    with pytest.raises(CapsNetError, match="^HOME is empty .*; set HOME .*--data-dir"):
        cache_root()


@pytest.mark.parametrize("variable", ["HOME", "XDG_CACHE_HOME"])
def test_a_relative_cache_variable_is_refused_naming_it(variable: str, no_xdg) -> None:
    no_xdg.setenv("HOME", "/home/someone")
    no_xdg.setenv(variable, "relative/cache")
    with pytest.raises(CapsNetError, match=f"^{variable} is 'relative/cache', not an absolute"):
        cache_root()
    no_xdg.setenv("XDG_CACHE_HOME", "")  # empty: unset, as the XDG specification says
    no_xdg.setenv("HOME", "/home/someone")
    assert cache_root() == Path("/home/someone/.cache/capsnet")


def test_a_relative_home_is_the_caches_reason_among_the_sources_tried(no_xdg) -> None:
    from dataclasses import replace

    from capsnet.data import sources

    no_xdg.setenv("HOME", "relative")
    no_xdg.delenv("CAPSNET_DATA_DIR", raising=False)
    offline = replace(sources.DATASETS["mnist"], mirrors=(), npm_package=None, system_dirs=())
    no_xdg.setitem(sources.DATASETS, "mnist", offline)  # no download to fall back on
    one_line(*cli("data", "mnist"), "HOME is 'relative', not an absolute path")


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "cache" / "mnist"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(CapsNetError) as raised:
        write_to_cache(folder / "train-images-idx3-ubyte.gz", b"data")
    assert str(raised.value).startswith(f"could not write the cache folder {folder} (Read-only "
                                        f"file system); set XDG_CACHE_HOME")
    assert "--data-dir FOLDER (or set CAPSNET_DATA_DIR)" in str(raised.value)


@pytest.mark.skipif(ROOT, reason="root writes in a read-only folder")
def test_a_read_only_cache_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir(mode=0o555)
    with pytest.raises(CapsNetError, match=f"could not write the cache folder {folder} "
                                           f"\\(Permission denied\\)"):
        write_to_cache(folder / "file", b"data")
    assert list(folder.iterdir()) == []
