"""Requests whose sizes ask for more than a machine has, and class folders a trained model could
not keep: each is refused in one line before any work, from an estimate of what it needs
(checked here against small fake memory limits, so that no test allocates much)."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import capsnet.data.folders as folders
from capsnet.cli import main
from capsnet.data import Split, load_splits, read_idx
from capsnet.data.idx import read_limited
from capsnet.errors import CapsNetError
from capsnet.nn import em_kernel
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.tools.bench import benchmark
from capsnet.tools.figures import draw_figures
from capsnet.training.config import (TrainConfig, check_training_memory, make_config,
                                     model_config_for)
from capsnet.training.evaluate import evaluate
from capsnet.utils import memory
from capsnet.utils.memory import (available_memory, capsnet_image_bytes, capsnet_state_bytes,
                                  check_memory)
from conftest import refuses_in_one_line

MiB, GiB = 2**20, 2**30


@pytest.fixture()
def memory_of(monkeypatch: pytest.MonkeyPatch):
    """Make the memory available on every device ``size`` bytes."""
    def set_to(size: int) -> None:
        monkeypatch.setattr(memory, "available_memory", lambda device="cpu": size)
    return set_to


def write_classes(root: Path, names: list[str], per_class: int = 3, side: int = 8) -> Path:
    """``root/train/<name>/*.png``: small random grayscale images."""
    rng = np.random.default_rng(0)
    for name in names:
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def shapes(tmp_path: Path) -> Path:
    return write_classes(tmp_path / "shapes", ["circle", "square", "triangle"], per_class=6)


# -- the estimates -------------------------------------------------------------------------

def test_available_memory_is_known_on_linux_and_at_most_the_machine() -> None:
    from capsnet.utils.device import physical_memory

    assert 0 < available_memory("cpu") <= physical_memory()


def test_a_request_past_the_memory_is_one_line_naming_what_to_lower(memory_of) -> None:
    memory_of(GiB)
    check_memory(GiB, "a thing", "lower --things")  # exactly what there is: fits
    with pytest.raises(CapsNetError, match=r"^a thing would need 2\.0 GiB, more than the 1\.0 "
                                           r"GiB of memory available; lower --things$"):
        check_memory(2 * GiB, "a thing", "lower --things")
    memory_of(0)  # the system does not say: nothing is refused
    check_memory(2**60, "a thing", "lower --things")


def test_the_estimates_grow_with_the_sizes_that_drive_them() -> None:
    small, large = CapsNetConfig(), CapsNetConfig(image_size=56)
    assert capsnet_image_bytes(large, True) > 4 * capsnet_image_bytes(small, True)
    assert capsnet_image_bytes(small, True) > capsnet_image_bytes(small, False)
    more_classes = CapsNetConfig(num_classes=300)
    assert capsnet_image_bytes(more_classes, True) > 10 * capsnet_image_bytes(small, True)
    # weights, gradients and Adam's two moments while training; the weights alone after
    assert capsnet_state_bytes(small, True) == 4 * capsnet_state_bytes(small, False) \
        == 16 * small.parameter_count


# -- training ------------------------------------------------------------------------------

def test_a_model_too_large_for_the_chosen_image_size_is_refused_before_any_image_is_read(
        shapes: Path, memory_of, monkeypatch: pytest.MonkeyPatch) -> None:
    memory_of(16 * GiB)
    monkeypatch.setattr(folders, "read_pixels", lambda path: pytest.fail("an image was read"))
    with pytest.raises(CapsNetError, match=r"training a CapsNet for 1x4096x4096 images and 3 "
                                           r"classes .* train on smaller images \(--image-size"):
        make_config("paper", dataset=str(shapes), image_size=4096)



def test_another_network_too_large_is_refused_by_its_name_without_capsnet_flags(
        shapes: Path, memory_of) -> None:
    memory_of(16 * GiB)
    with pytest.raises(CapsNetError, match=r"^training efficient-capsnet for 1x1024x1024 "
                                           r"images .* \(--image-size, --crop\)$"):
        make_config("efficient", dataset=str(shapes), image_size=1024)

@pytest.mark.parametrize("batch, eval_batch, flag", [
    (128, 16, "--batch-size"),
    (16, 500, "--eval-batch-size"),
])
def test_a_batch_that_cannot_fit_is_refused_naming_its_flag(memory_of, batch: int,
                                                           eval_batch: int, flag: str) -> None:
    memory_of(300 * MiB)
    config = make_config("paper", batch_size=batch, eval_batch_size=eval_batch)
    with pytest.raises(CapsNetError, match=rf"batch of {max(batch, eval_batch)} 1x28x28 images "
                                           rf"would need .*; lower {flag}$"):
        model_config_for(config, 28, 1, 10)


def test_batches_that_fit_pass_and_the_evaluation_batch_is_capped_by_validation(
        memory_of) -> None:
    memory_of(300 * MiB)
    config = make_config("paper", batch_size=16, eval_batch_size=500, val_size=20)
    assert model_config_for(config, 28, 1, 10).num_classes == 10


def test_em_routing_on_a_cpu_is_counted_without_the_votes_its_kernel_never_keeps(
        memory_of, monkeypatch: pytest.MonkeyPatch) -> None:
    """The em preset's network (the paper's) with its evaluation batch of 500 fits in 16 GiB
    where the CPU kernel routes, and is refused before training where torch routes, which
    keeps every vote."""
    if not em_kernel.available():
        pytest.skip("needs the EM kernel, which needs a C compiler")
    memory_of(16 * GiB)
    config = make_config("em")
    model = model_config_for(config, 28, 1, 10)
    assert capsnet_image_bytes(model, True, "cpu") < capsnet_image_bytes(model, True, "cuda") / 4
    assert capsnet_image_bytes(model, False, "cpu") < capsnet_image_bytes(model, False, "cuda") / 4
    monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", "off")
    with pytest.raises(CapsNetError, match=r"^an evaluation batch of 500 1x28x28 images would "
                                           r"need .*; lower --eval-batch-size$"):
        model_config_for(config, 28, 1, 10)


def test_the_weight_average_and_the_images_of_no_class_are_counted(memory_of) -> None:
    config = make_config("paper", batch_size=64, eval_batch_size=16)
    model = model_config_for(config, 28, 1, 10)
    plain = capsnet_state_bytes(model, True) + 64 * capsnet_image_bytes(model, True)
    memory_of(plain)  # exactly what the plain run needs
    model_config_for(config, 28, 1, 10)
    with pytest.raises(CapsNetError, match=r"^a training batch of 64 1x28x28 images would "
                                           r"need .*; lower --batch-size$"):
        model_config_for(make_config("paper", batch_size=64, eval_batch_size=16,
                                     ema_decay=0.999), 28, 1, 10)
    with pytest.raises(CapsNetError, match=r"^a training batch of 64 1x28x28 images and 8 of "
                                           r"no class would need .*; lower --batch-size$"):
        model_config_for(make_config("paper", batch_size=64, eval_batch_size=16,
                                     none_fraction=0.125), 28, 1, 10)
    assert capsnet_state_bytes(model, True, averaged=True) == 20 * model.parameter_count


def test_each_rank_needs_only_its_share_of_the_batch(memory_of,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    memory_of(300 * MiB)
    config = make_config("paper", batch_size=128, eval_batch_size=16)
    monkeypatch.setenv("WORLD_SIZE", "8")
    model_config_for(config, 28, 1, 10)  # 16 images a rank fit


# -- evaluation, figures, bench ------------------------------------------------------------

def split_of(n: int) -> Split:
    generator = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator),
                 torch.arange(n) % 10)


def test_an_evaluation_batch_larger_than_the_data_set_is_the_data_set(memory_of) -> None:
    memory_of(100 * MiB)  # 7 images fit; 100,000,000 would not
    model = CapsNet().eval()
    whole = evaluate(model, split_of(7), batch_size=100_000_000)
    in_threes = evaluate(model, split_of(7), batch_size=3)
    assert whole.total == in_threes.total == 7
    assert torch.equal(whole.confusion, in_threes.confusion)
    assert whole.loss == pytest.approx(in_threes.loss, rel=1e-5)


def test_an_evaluation_batch_that_cannot_fit_is_refused_naming_its_flag(memory_of) -> None:
    memory_of(10 * MiB)
    model = CapsNet().eval()
    with pytest.raises(CapsNetError, match=r"an evaluation batch of 7 images would need .*; "
                                           r"lower --eval-batch-size$"):
        evaluate(model, split_of(7), batch_size=100, batch_flag="--eval-batch-size")


def test_evaluate_command_caps_a_huge_batch_to_the_data_set(model_kinds: dict[str, str],
                                                            capsys, one_thread) -> None:
    assert main(["evaluate", model_kinds["run folder"], "--batch-size", "100000000",
                 "--json"]) == 0
    assert '"total": 60' in capsys.readouterr().out


@pytest.mark.parametrize("samples", [0, 101, 1_000_000])
def test_figures_take_a_bounded_number_of_samples_before_loading_anything(
        samples: int, tmp_path: Path) -> None:
    with pytest.raises(CapsNetError, match=rf"--samples must be an integer in \[1, 100\], "
                                           rf"got {samples}"):
        draw_figures(tmp_path / "no-such-model", tmp_path / "out", n_samples=samples)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("train_batch, infer_batch, warmup, repeats, message", [
    (1_000_000_000, 256, 3, 10, "a training batch of 1,000,000,000 images would need .*; "
                                "lower --train-batch"),
    (64, 100_000_000, 3, 10, "an inference batch of 100,000,000 images would need .*; "
                             "lower --infer-batch"),
    (64, 256, 3, 1_000_000_000, r"--repeats must be an integer in \[1, 1,000\]"),
    (64, 256, 1_000_000, 10, r"--warmup must be an integer in \[0, 100\]"),
], ids=["train-batch", "infer-batch", "repeats", "warmup"])
def test_bench_refuses_unbounded_work_before_building_anything(
        memory_of, monkeypatch: pytest.MonkeyPatch, train_batch: int, infer_batch: int,
        warmup: int, repeats: int, message: str) -> None:
    memory_of(4 * GiB)
    monkeypatch.setattr(CapsNet, "__init__", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(CapsNetError, match=message):
        benchmark(torch.device("cpu"), "fp32", False, 3, train_batch, infer_batch, warmup,
                  repeats)


# -- IDX files and data files --------------------------------------------------------------

def idx_header(*shape: int) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)


def test_an_idx_file_larger_than_its_header_says_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(idx_header(2, 3) + bytes(6))
        f.truncate(3 * GiB)  # sparse: nothing of it is written, nor read
    trailing = 3 * GiB - len(idx_header(2, 3)) - 6
    with pytest.raises(CapsNetError, match=f"{trailing} bytes of trailing data after"):
        read_idx(path)


def test_an_idx_file_shorter_than_its_header_says_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_header(1000) + bytes(10))
    with pytest.raises(CapsNetError, match=r"truncated: 10 data bytes, header \(1000,\) needs 1000"):
        read_idx(path)


def test_an_idx_header_declaring_more_than_the_memory_is_refused(tmp_path: Path,
                                                                  memory_of) -> None:
    memory_of(MiB)
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(100, 100, 200)))  # 2,000,000 bytes
    with pytest.raises(CapsNetError, match="the data its header declares would need"):
        read_idx(path)


def test_a_data_file_over_the_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "big.mat"
    with open(path, "wb") as f:
        f.truncate(3 * GiB)
    with pytest.raises(CapsNetError, match="3,221,225,472 bytes, more than the"):
        read_limited(path)
    small = tmp_path / "small.mat"
    small.write_bytes(b"12345")
    assert read_limited(small, limit=5) == b"12345"


def test_a_gzipped_data_file_is_decompressed_no_further_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(bytes(10_000)))
    with pytest.raises(CapsNetError, match="decompresses to more than the 1,000 bytes"):
        read_limited(path, limit=1000, decompress=True)
    assert read_limited(path, limit=10_000, decompress=True) == bytes(10_000)
    assert read_limited(path, limit=10_000) == path.read_bytes()  # kept compressed


def test_a_huge_file_in_the_data_folder_is_refused_without_reading_it(tmp_path: Path) -> None:
    from capsnet.data.sources import DATASETS, _from_folder

    for name in DATASETS["mnist"].md5:
        with open(tmp_path / name, "wb") as f:
            f.truncate(3 * GiB)  # sparse: reading it whole would take 3 GB
    with pytest.raises(CapsNetError, match="3,221,225,472 bytes, more than the"):
        _from_folder(tmp_path, DATASETS["mnist"])


# -- class folders -------------------------------------------------------------------------

def test_three_hundred_classes_are_read_with_their_labels(tmp_path: Path) -> None:
    root = write_classes(tmp_path / "many", [f"c{k:03d}" for k in range(300)], per_class=3)
    splits = load_splits(str(root), image_size=8)  # a validation and a test image per class
    assert splits.num_classes == 300 and len(splits.class_names) == 300
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    assert labels.dtype == torch.int64 and int(labels.max()) == 299


def test_more_classes_than_a_capsnet_takes_are_refused(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folders, "MAX_CLASSES", 2)
    root = write_classes(tmp_path / "data", ["a", "b", "c"])
    with pytest.raises(CapsNetError, match="train/ holds 3 class folders; a CapsNet takes at "
                                           "most 2 classes"):
        folders.read_class_folders(root, val_size=1)


@pytest.mark.parametrize("name", ["zero\u200dwidth", "a\ttab", "c" * 150],
                         ids=["zero-width-joiner", "tab", "150-characters"])
def test_a_class_name_no_model_could_keep_is_refused_when_the_folder_is_read(
        tmp_path: Path, name: str) -> None:
    root = write_classes(tmp_path / "data", ["fine", name])
    with pytest.raises(CapsNetError, match="the folder's name cannot be a class name") as info:
        folders.read_class_folders(root, val_size=1)
    assert str(root / "train" / name) in str(info.value)


def nested_folder(folder: Path) -> None:
    (folder / "more").mkdir()


def fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe.png")


def link_loop(folder: Path) -> None:
    os.symlink("y.png", folder / "x.png")
    os.symlink("x.png", folder / "y.png")


def broken_link(folder: Path) -> None:
    os.symlink("gone.png", folder / "x.png")


@pytest.mark.parametrize("make, entry, message", [
    (nested_folder, "more", "a folder inside a class folder"),
    (fifo, "pipe.png", "not a regular file (a FIFO"),
    (link_loop, "x.png", "cannot be read (Too many levels of symbolic links)"),
    (broken_link, "x.png", "cannot be read (No such file or directory)"),
], ids=["nested-folder", "fifo", "link-loop", "broken-link"])
def test_an_entry_that_is_not_an_image_file_stops_with_its_name(
        tmp_path: Path, make, entry: str, message: str) -> None:
    root = write_classes(tmp_path / "data", ["a", "b"])
    make(root / "train" / "b")
    with pytest.raises(CapsNetError, match=re.escape(message)) as info:
        folders.read_class_folders(root, val_size=1)
    assert str(info.value).startswith(f"{root / 'train' / 'b' / entry}: ")


def test_images_that_would_not_fit_at_the_chosen_size_are_refused_before_reading(
        shapes: Path, memory_of, monkeypatch: pytest.MonkeyPatch) -> None:
    memory_of(MiB)
    monkeypatch.setattr(folders, "read_pixels", lambda path: pytest.fail("an image was read"))
    with pytest.raises(CapsNetError, match=r"18 images of 200x200 would need .*; lower "
                                           r"--image-size$"):
        folders.read_class_folders(shapes, val_size=1, image_size=200)


# -- the real command ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(module_tmp: Callable[[str], Path]) -> Path:
    w = module_tmp("sizes")
    write_classes(w / "shapes", ["circle", "square"], per_class=6)
    for name, make in (("zwj", lambda r: write_classes(r, ["a", "b\u200dc"])),
                       ("tab", lambda r: write_classes(r, ["a", "b\tc"])),
                       ("nested", lambda r: nested_folder(write_classes(r, ["a", "b"]) / "train/a")),
                       ("fifo", lambda r: fifo(write_classes(r, ["a", "b"]) / "train/a")),
                       ("loop", lambda r: link_loop(write_classes(r, ["a", "b"]) / "train/a"))):
        make(w / name)
    return w


TRAIN = ["train", "--val-size", "2", "--device", "cpu", "--no-progress", "--run-dir", "run",
         "--dataset"]
CASES = {
    "image-size-4096": ([*TRAIN, "shapes", "--image-size", "4096"],
                        "train on smaller images (--image-size, --crop)"),
    "class-name-zero-width-joiner": ([*TRAIN, "zwj"], "cannot be a class name"),
    "class-name-tab": ([*TRAIN, "tab"], "b\\tc: the folder's name cannot be a class name"),
    "nested-folder": ([*TRAIN, "nested"], "a/more: a folder inside a class folder"),
    "fifo": ([*TRAIN, "fifo"], "a/pipe.png: not a regular file"),
    "link-loop": ([*TRAIN, "loop"], "a/x.png: cannot be read (Too many levels"),
    "bench-train-batch": (["bench", "--device", "cpu", "--train-batch", "1000000000"],
                          "lower --train-batch"),
    "bench-repeats": (["bench", "--device", "cpu", "--repeats", "1000000000"],
                      "--repeats must be an integer in [1, 1,000]"),
    "figures-samples": (["figures", "mnist", "--out", "figs", "--samples", "1000000"],
                        "--samples must be an integer in [1, 100]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_command_refuses_in_one_line_before_any_work(name: str, workspace: Path) -> None:
    argv, expected = CASES[name]
    refuses_in_one_line(argv, workspace, expected)
    assert not (workspace / "run").exists() and not (workspace / "figs").exists()


@pytest.mark.slow
def test_data_that_are_not_class_folders_are_not_resized(tiny_dataset: Path,
                                                         tmp_path: Path) -> None:
    """--image-size and --channels would change nothing there: refused; a model too large for
    the memory is told to train on crops, not on resized images."""
    idx = [*TRAIN, str(tiny_dataset)]
    refuses_in_one_line([*idx, "--image-size", "24"], tmp_path,
                        "--image-size 24 would change nothing: only class folders")
    refuses_in_one_line([*idx, "--channels", "3"], tmp_path, "--channels 3 would change nothing")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folders, flags", [(True, "--image-size, --crop"), (False, "--crop")])
def test_a_model_too_large_is_told_to_train_on_images_its_data_can_give(
        memory_of, shapes: Path, tiny_dataset: Path, folders: bool, flags: str) -> None:
    memory_of(1 * MiB)
    config = TrainConfig(dataset=str(shapes if folders else tiny_dataset))
    with pytest.raises(CapsNetError, match=re.escape(f"train on smaller images ({flags}) or")):
        check_training_memory(config, CapsNetConfig())


@pytest.mark.slow
def test_resuming_checks_the_memory_once_before_loading_the_weights(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaded checkpoint is compared with the model the task built, not with a config
    computed again: that would check the memory a second time, the weights already loaded,
    and could refuse a model that fits."""
    from capsnet.training.task import Classification
    from capsnet.training.trainer import Trainer

    run_dir = tmp_path / "run"
    assert main(["train", "--dataset", str(tiny_dataset), "--epochs", "2", "--val-size", "40",
                 "--train-limit", "32", "--batch-size", "16", "--device", "cpu",
                 "--no-progress", "--run-dir", str(run_dir)]) == 0
    calls = []
    original = Classification.model_config
    monkeypatch.setattr(Classification, "model_config",
                        lambda self: calls.append(1) or original(self))
    config = make_config("paper", dataset=str(tiny_dataset), epochs=2, val_size=40,
                         train_limit=32, batch_size=16, device="cpu")
    Trainer(Classification.from_config(config), run_dir, resume=True, show_progress=False)
    assert len(calls) == 1
