"""The README runs: every ```python block, and every `capsnet ...` line of its ```bash
blocks, in the README's order, in one scratch folder (later lines use the runs and files of
earlier ones, as a reader's would; run the whole file, not one step alone).

What differs from the README, and why:

- Data and length (`tiny`): a training reads the tiny IDX data set of conftest.py instead of
  MNIST or Fashion-MNIST, or a small class-folder data set for `my_images/`, for one epoch of
  32 images on the CPU (TINY_TRAINING below replaces the README's values of those flags). A
  training without --run-dir gets the folder it would default to on MNIST
  (runs/mnist-<preset>), which later lines name. `evaluate` and `figures` of the shipped
  model `mnist` read the tiny data set (--dataset TINY --val-size 40) instead of MNIST's
  10,000 test images. `bench` measures 1 step of batch 8 (TINY_BENCH).
- Inputs the README names (digit.png, photo.jpg, photo1.jpg, photo2.png, array.npy,
  photos/, scans/, my_images/) are written into the folder first.
- Python: the placeholder "path/to/this/checkout" is this checkout; `epochs=5` is 1.
- Lines in SKIPPED are not run, for the reason given there; `capsnet data mnist` runs only
  when MNIST is already in the cache (it would download it otherwise).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from capsnet.cli import build_parser, main
from capsnet.errors import CapsNetError
from conftest import REPO, synthetic_digits

pytestmark = pytest.mark.slow  # about a minute: a dozen tiny trainings, exports, benches

README = REPO / "README.md"

SKIPPED = {
    "capsnet explore mnist": "serves the page until Ctrl-C (tests/test_explore.py runs it)",
    "capsnet explore runs/mnist-paper": "serves the page until Ctrl-C (tests/test_explore.py)",
    "capsnet bench --device cuda --precision bf16 --compile --epoch": "needs a CUDA GPU",
    "capsnet bench --device cuda --precision bf16 --cuda-graphs": "needs a CUDA GPU",
    "capsnet experiment affnist --model both --affnist-dir ~/affnist/test_batches":
        "needs the affNIST test files, a download (tests/test_affine.py runs the experiment)",
}
NEEDS_CACHED_MNIST = {"capsnet data mnist"}

TINY_TRAINING = {"--epochs": "1", "--train-limit": "32", "--batch-size": "16",
                 "--val-size": "40", "--device": "cpu"}
FOLDER_VAL_SIZE = "6"  # my_images/: 3 classes of 12 images; 6 each cut for val and test
TINY_BENCH = {"--warmup": "1", "--repeats": "1", "--train-batch": "8", "--infer-batch": "8"}
PYTHON_SUBSTITUTIONS = {'"path/to/this/checkout"': repr(str(REPO)), "epochs=5": "epochs=1"}
REGISTERED = ("mnist", "fashion-mnist")  # the data sets the tiny one stands for


def markdown_steps(page: Path) -> list[tuple[int, str, str]]:
    """(line, "bash" | "python", text): each `capsnet` line of a bash block and each python
    block of a markdown ``page``, in its order."""
    steps, lines = [], page.read_text().splitlines()
    fence, start, body = None, 0, []
    for number, line in enumerate(lines, 1):
        if fence is None and line.startswith("```"):
            fence, start, body = line[3:].strip(), number, []
        elif fence is not None and line.startswith("```"):
            if fence == "python":
                steps.append((start, "python", "\n".join(body)))
            fence = None
        elif fence == "bash":
            command = line.split(" #")[0].strip()
            if command.startswith("capsnet "):
                steps.append((number, "bash", command))
        elif fence is not None:
            body.append(line)
    return steps


STEPS = markdown_steps(README)


def test_the_readme_has_what_this_test_names() -> None:
    commands = {text for _, kind, text in STEPS if kind == "bash"}
    assert set(SKIPPED) | NEEDS_CACHED_MNIST <= commands  # no stale entry
    assert sum(kind == "python" for _, kind, _ in STEPS) >= 4
    for text in PYTHON_SUBSTITUTIONS:
        assert any(text in body for _, kind, body in STEPS if kind == "python"), text


@pytest.mark.parametrize("page", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_capsnet_line_of_the_docs_is_a_command_of_today(page: Path) -> None:
    """The commands docs/ shows beside its records parse with today's flags (they are not
    run: they name the full data sets and take hours)."""
    parser = build_parser()
    for line, kind, text in markdown_steps(page):
        if kind == "bash":
            try:
                parser.parse_args(shlex.split(text)[1:])
            except CapsNetError as error:
                pytest.fail(f"{page.name}, line {line}: {text}: {error}")


def test_the_readme_lists_every_training_flag() -> None:
    """The paragraph that lists TrainConfig's flags names each of them (``--[no-]X`` for a
    switch), so a new field cannot be left out of it."""
    from dataclasses import fields

    from capsnet.training.config import TrainConfig

    text = README.read_text()
    paragraph = text[text.index("Every field of `TrainConfig`"):].split("\n\n")[0]
    listed = set(re.findall(r"--(?:\[no-\])?([a-z][a-z-]*)", paragraph))
    assert {f.name.replace("_", "-") for f in fields(TrainConfig)} - {"preset"} <= listed


def test_the_readme_states_the_shipped_models_own_record() -> None:
    """The paragraph on the shipped model gives what scripts/ship_pretrained.py measured with
    the weights that ship: their test accuracy and errors, their "none" answers to images of
    no class, the epoch of the run they are from, and the command, so the README cannot keep
    a replaced model's numbers."""
    import json

    shipped = json.loads((REPO / "src/capsnet/pretrained/mnist/summary.json").read_text())
    shipped = shipped["shipped"]
    text = README.read_text()
    paragraph = " ".join(text[text.index("The package ships"):].split("\n\n")[0].split())
    for fact in (f"**{shipped['test_accuracy']:.2%}**", f"{shipped['test_errors']} errors",
                 f"{shipped['test_none_rate']:.1%}",
                 f"`best.pt` of epoch {shipped['epoch']}", f"`{shipped['command']}`"):
        assert fact in paragraph, fact


def write_image(path: Path, array: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, array.astype(np.float32) / 255)
    else:
        Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def workspace(module_tmp: Callable[[str], Path], tiny_dataset: Path) -> Iterator[Path]:
    folder = module_tmp("readme")
    images, labels = synthetic_digits(40, seed=3)
    for i, name in enumerate(("digit.png", "photo.jpg", "photo1.jpg", "photo2.png",
                              "array.npy")):
        write_image(folder / name, 255 - images[i])  # dark on light, as a photo of a digit
    for i, name in enumerate(("photos/a.png", "photos/b.jpg", "scans/c.jpg", "scans/d.png")):
        (folder / name).parent.mkdir(exist_ok=True)
        write_image(folder / name, 255 - images[5 + i])
    for i, (image, label) in enumerate(zip(images[:36], labels[:36])):
        class_folder = folder / "my_images" / "train" / f"class{label % 3}"
        class_folder.mkdir(parents=True, exist_ok=True)
        write_image(class_folder / f"{i}.png", image)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)


def tiny_command(args: list[str], tiny: Path) -> list[str]:
    """The README's command as this test runs it (the module docstring says how)."""
    command = args[1] if len(args) > 1 else ""
    if command in ("train", "experiment") and "--resume" not in args:
        given = dict(zip(args, args[1:]))
        dataset = given.get("--dataset", "mnist")
        overrides = dict(TINY_TRAINING)
        if dataset in REGISTERED:
            overrides["--dataset"] = str(tiny)
        else:
            overrides["--val-size"] = FOLDER_VAL_SIZE
        if command == "train" and "--run-dir" not in given:
            overrides["--run-dir"] = f"runs/mnist-{given.get('--preset', 'paper')}"
        if command == "experiment":
            overrides["--test-limit"] = "32"
        kept: list[str] = []
        skip = False
        for arg in args:
            if skip:
                skip = False
            elif arg in overrides:
                skip = True
            else:
                kept.append(arg)
        return kept + [x for pair in overrides.items() for x in pair] + ["--no-progress"]
    if command == "train":  # --resume: the run's own settings
        return args + ["--no-progress"]
    if command in ("evaluate", "figures") and len(args) > 2 and args[2] == "mnist":
        return args + ["--dataset", str(tiny), "--val-size", "40"]
    if command == "bench":
        return args + [x for pair in TINY_BENCH.items() for x in pair]
    return args


def wait_for_detached_run(run_dir: Path, timeout: float = 300) -> None:
    """A --detach training is a process of its own: wait until it has ended."""
    deadline = time.monotonic() + timeout
    while (run_dir / "train.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (run_dir / "train.pid").exists(), (run_dir / "train.log").read_text()


@pytest.mark.parametrize("line, kind, text", STEPS, ids=[f"line{n}" for n, _, _ in STEPS])
def test_readme_step(line: int, kind: str, text: str, workspace: Path, tiny_dataset: Path,
                     one_thread) -> None:
    if kind == "python":
        for old, new in PYTHON_SUBSTITUTIONS.items():
            text = text.replace(old, new)
        exec(compile(text, f"README.md, block at line {line}", "exec"), {})
        return
    if text in SKIPPED:
        pytest.skip(SKIPPED[text])
    if text in NEEDS_CACHED_MNIST:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capsnet"
        if not (cache / "mnist").is_dir():
            pytest.skip("MNIST is not in the cache (it would be downloaded)")
    args = tiny_command(shlex.split(text), tiny_dataset)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args[1:])
    assert code == 0, f"README line {line}: {' '.join(args)}\n{out.getvalue()}{err.getvalue()}"
    if "--detach" in args:
        run_dir = Path(args[args.index("--run-dir") + 1] if "--run-dir" in args
                       else args[args.index("--resume") + 1])
        wait_for_detached_run(run_dir)
    if args[1] == "status":
        assert re.search(r"finished|stopped|running", out.getvalue()), out.getvalue()
