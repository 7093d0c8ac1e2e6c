"""Shared fixtures: a tiny synthetic MNIST-style data set written as IDX files, and one trained
model in each form a command takes."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import io
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, TypeVar

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Triton reads this when
# it is imported, and importing torch imports it: so here, before torch.
if not list(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase  # noqa: E402

from capsnet import CapsNet, make_config  # noqa: E402
from capsnet.data import FILE_NAMES, write_idx  # noqa: E402
from capsnet.training.checkpoint import save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Property-based tests are the same in every CI run: a fixed seed (--hypothesis-seed in
# pyproject.toml) and the stored examples that once failed, replayed first and never
# rewritten. HYPOTHESIS_PROFILE=record (with -p no:randomly --hypothesis-seed=N for other
# seeds) stores new failures there.
EXAMPLES = DirectoryBasedExampleDatabase(Path(__file__).parent / "hypothesis-examples")
settings.register_profile("ci", database=ReadOnlyDatabase(EXAMPLES))
settings.register_profile("record", database=EXAMPLES)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def synthetic_digits(n: int, size: int = 28, num_classes: int = 10, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (n, size, size): class k is a bright bar at a class-specific
    place and angle, jittered by a pixel, with faint noise. Easy to learn in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = np.zeros((n, size, size), dtype=np.float32)
    centre = size // 2
    for index, label in enumerate(labels):
        dy, dx = rng.integers(-1, 2, size=2)
        if label < num_classes // 2:  # horizontal bars at different heights
            row = 6 + 4 * label + dy
            images[index, row:row + 3, 6 + dx:size - 6 + dx] = 1.0
        else:  # vertical bars at different columns
            col = 6 + 4 * (label - num_classes // 2) + dx
            images[index, 6 + dy:size - 6 + dy, col:col + 3] = 1.0
        images[index, centre - 1:centre + 1, centre - 1:centre + 1] += 0.5
    images += rng.uniform(0, 0.1, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def write_dataset(folder: Path, n_train: int = 240, n_test: int = 60, size: int = 28,
                  gzipped: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    for part, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_digits(n, size, seed=seed)
        write_idx(folder / (FILE_NAMES[f"{part}_images"] + suffix), images)
        write_idx(folder / (FILE_NAMES[f"{part}_labels"] + suffix), labels)
    return folder


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``module_tmp(name)``: a new folder for a module's fixtures, removed with all it holds
    when the module's tests are done: a module's trainings leave gigabytes of checkpoints,
    which would otherwise stay on disk until the whole suite ends."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with 240 training and 60 test images of 10 easy classes, as raw IDX files.
    Pass it as ``--dataset FOLDER`` (with ``--val-size 40`` or so)."""
    return write_dataset(tmp_path_factory.mktemp("tiny"))


def write_run(folder: Path, model: CapsNet, train_config: dict | None = None) -> Path:
    """``folder`` holding ``best.pt``: ``model`` as a training run checkpoints it (with its
    settings ``train_config``; no optimizer state)."""
    payload = {"model_config": model.config.to_dict(), "model": model.state_dict(),
               "class_names": list(model.class_names), "prepare": model.prepare}
    save_checkpoint(folder / "best.pt", payload if train_config is None
                    else {**payload, "train_config": train_config})
    return folder


@pytest.fixture(scope="session")
def model_kinds(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, str]:
    """The shipped MNIST model in each form a model argument takes, by kind; the run and the
    checkpoint record the seed preset on the tiny data set (which has MNIST's shape)."""
    root = tmp_path_factory.mktemp("kinds")
    model = CapsNet.from_pretrained("mnist")
    settings = make_config("seed", dataset=str(tiny_dataset), val_size=40).to_dict()
    write_run(root / "run", model, settings)
    shutil.copy(root / "run" / "best.pt", root / "weights.pt")
    model.save_pretrained(root / "pretrained")
    shutil.copy(root / "pretrained" / "model.safetensors", root / "exported.safetensors")
    return {"run folder": str(root / "run"), "checkpoint": str(root / "weights.pt"),
            "save_pretrained folder": str(root / "pretrained"),
            "safetensors file": str(root / "exported.safetensors"), "shipped name": "mnist"}


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread: tiny tensors gain nothing from threads, and on a
    shared 2-core machine OpenMP spinning makes them up to 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, no user data dir, and no proxy between urllib and 127.0.0.1."""
    cache_home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.delenv("CAPSNET_DATA_DIR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache_home


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


Server = TypeVar("Server", bound=socketserver.BaseServer)


@contextlib.contextmanager
def serving(server: Server, poll_interval: float = 0.5) -> Iterator[Server]:
    """``server`` serving in a thread for the time of the block; shut down and closed after."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture()
def serve() -> Iterator[Callable[[Path], str]]:
    """``serve(folder)`` starts an HTTP server on 127.0.0.1 and returns its base URL."""
    with contextlib.ExitStack() as servers:
        def start(folder: Path) -> str:
            handler = functools.partial(QuietHandler, directory=str(folder))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            servers.enter_context(serving(server, 0.05))
            return f"http://127.0.0.1:{server.server_address[1]}/"

        yield start


def dead_url() -> str:
    """A URL on a port nothing listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def copy_docs(tmp_path: Path) -> Path:
    """docs/RESULTS.md, docs/PERFORMANCE.md and docs/runs/ copied to ``tmp_path/docs``."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for document in ("RESULTS.md", "PERFORMANCE.md"):
        shutil.copyfile(REPO / "docs" / document, docs / document)
    shutil.copytree(REPO / "docs" / "runs", docs / "runs")
    return docs


@functools.cache
def results_tables() -> ModuleType:
    """scripts/results_tables.py, imported once."""
    spec = importlib.util.spec_from_file_location("results_tables",
                                                  REPO / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables(docs: Path, *flags: str) -> subprocess.CompletedProcess:
    """scripts/results_tables.py on the documents and records in ``docs``, its exit status and
    output as a process would give them; run in this process, since a process of its own
    would spend most of its time importing torch."""
    argv = ["--docs", str(docs), *flags]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = results_tables().main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def refuses_in_one_line(argv: list[str], cwd: Path, expected: str) -> None:
    """The real ``capsnet argv`` run in ``cwd`` refuses: exit 2, nothing on stdout, and one
    line on stderr, ``capsnet: ...`` holding ``expected``, without a traceback."""
    done = subprocess.run([str(Path(sys.executable).with_name("capsnet")), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("capsnet: ") and expected in lines[0], lines[0]
    assert done.stdout == ""
