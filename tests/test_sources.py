"""CIFAR-10 and SVHN: acquisition from a local HTTP mirror, verification, caching, reading of
tiny files made in the real formats, and one-line errors for corrupt ones."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import scipy.io
import torch

import capsnet.data.formats as formats
from capsnet.data import DATASETS, acquire, load_splits
from capsnet.data.formats import CIFAR10_ARCHIVE, CIFAR10_TEST, CIFAR10_TRAIN, SVHN_FILES
from capsnet.errors import CapsNetError
from conftest import dead_url

pytestmark = pytest.mark.usefixtures("isolated_env")  # a private cache, no proxy

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


# --- tiny files in the real formats ------------------------------------------------------------


def cifar10_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch file of ``n`` records and the images (n, 3, 32, 32) and labels it holds."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    records = [bytes([label]) + image.tobytes() for image, label in zip(images, labels)]
    # The layout by hand: label, then 1024 red, 1024 green, 1024 blue bytes, rows in order.
    assert records[0][1 + 1024 * 2 + 32 * 5 + 7] == images[0, 2, 5, 7]
    return b"".join(records), images, labels


def tar_gz(files: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-bin")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in symlinks:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def cifar10_members() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The batch files (2 records per training batch, 3 in the test batch), a file the reader
    must skip, and the four arrays they hold."""
    members = {"cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\n"}
    parts = []
    for seed, name in enumerate((*CIFAR10_TRAIN, CIFAR10_TEST)):
        members[name], images, labels = cifar10_batch(3 if name == CIFAR10_TEST else 2, seed)
        parts.append((images, labels))
    expected = {"train_images": np.concatenate([images for images, _ in parts[:5]]),
                "train_labels": np.concatenate([labels for _, labels in parts[:5]]),
                "test_images": parts[5][0], "test_labels": parts[5][1]}
    return members, expected


def mat_bytes(**variables: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


def svhn_mat(n: int, seed: int, **variables: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A .mat file of ``n`` digits (``variables`` replace or add some) and its images and
    labels as the reader should give them."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 for the digit 0
    images = np.stack([np.stack([x[:, :, channel, k] for channel in range(3)]) for k in range(n)])
    return mat_bytes(**{"X": x, "y": y, **variables}), images, (np.arange(n) + 1) % 10


def svhn_files() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    files, expected = {}, {}
    for part, n, seed in (("train", 12, 1), ("test", 4, 2)):
        files[SVHN_FILES[part]], images, labels = svhn_mat(n, seed)
        expected[f"{part}_images"], expected[f"{part}_labels"] = images, labels
    return files, expected


@dataclasses.dataclass
class Made:
    """A fake data set registered under ``name``, its files written to ``folder``."""

    name: str
    folder: Path
    expected: dict[str, np.ndarray]
    class_names: tuple[str, ...]


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def register(real: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Register ``fake-REAL``: the real entry's files, reader and class names, with the MD5s
    of the files in ``folder`` and no mirrors of its own."""
    spec = DATASETS[real]
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in spec.md5}
    fake = dataclasses.replace(spec, name=f"fake-{real}", md5=md5, mirrors=())
    monkeypatch.setitem(DATASETS, fake.name, fake)
    return fake.name


def made_files(real: str) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    if real == "cifar10":
        members, expected = cifar10_members()
        return {CIFAR10_ARCHIVE: tar_gz(members)}, expected
    return svhn_files()


@pytest.fixture(params=["cifar10", "svhn"])
def made(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Made:
    files, expected = made_files(request.param)
    folder = write_files(tmp_path / "served", files)
    return Made(register(request.param, folder, monkeypatch), folder, expected,
                DATASETS[request.param].class_names)


# --- a local mirror --------------------------------------------------------------------------


def assert_arrays_equal(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert arrays.keys() == expected.keys()
    for role, array in arrays.items():
        assert array.dtype == np.uint8, role
        np.testing.assert_array_equal(array, expected[role], err_msg=role)


# --- acquisition -----------------------------------------------------------------------------


def test_real_entries_name_the_documented_files_and_checksums() -> None:
    assert DATASETS["cifar10"].md5 == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
    assert DATASETS["cifar10"].mirrors == ("https://www.cs.toronto.edu/~kriz/",)
    assert DATASETS["cifar10"].class_names == CIFAR10_CLASSES
    assert DATASETS["svhn"].md5 == {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
                                    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
    assert DATASETS["svhn"].mirrors == ("http://ufldl.stanford.edu/housenumbers/",)
    assert DATASETS["svhn"].class_names == tuple("0123456789")


def test_mirror_download_is_verified_cached_and_reused(made: Made, serve, isolated_env: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = serve(made.folder)
    assert_arrays_equal(acquire(made.name, mirrors=(url,), quiet=False), made.expected)
    assert f"using mirror {url}" in capsys.readouterr().out
    cache = isolated_env / "capsnet" / made.name
    served = sorted(p.name for p in made.folder.iterdir())
    assert sorted(p.name for p in cache.iterdir()) == served  # no temporary file left
    for name in served:
        assert (cache / name).read_bytes() == (made.folder / name).read_bytes()
    # The mirror is gone: the cache answers.
    assert_arrays_equal(acquire(made.name, mirrors=(dead_url(),), quiet=False), made.expected)
    assert f"using cache {cache}" in capsys.readouterr().out


def test_user_data_dir_is_read_and_not_cached(made: Made, isolated_env: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert_arrays_equal(acquire(made.name, data_dir=made.folder, quiet=False), made.expected)
    assert f"using data directory {made.folder}" in capsys.readouterr().out
    assert not (isolated_env / "capsnet").exists()


def tampered_copy(made: Made, folder: Path) -> Path:
    """``made``'s files with one byte changed near the end of the first file."""
    files = {p.name: p.read_bytes() for p in made.folder.iterdir()}
    first = min(files)
    files[first] = files[first][:-20] + bytes([files[first][-20] ^ 0xFF]) + files[first][-19:]
    return write_files(folder, files)


def test_bad_checksum_and_dead_mirrors_are_skipped(made: Made, serve, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad, good = serve(tampered_copy(made, tmp_path / "tampered")), serve(made.folder)
    arrays = acquire(made.name, mirrors=(dead_url(), bad, good), quiet=False)
    assert_arrays_equal(arrays, made.expected)
    assert f"using mirror {good}" in capsys.readouterr().out


def test_failure_is_one_line_listing_every_source(made: Made, serve, tmp_path: Path,
                                                  isolated_env: Path) -> None:
    tampered = tampered_copy(made, tmp_path / "tampered")
    dead, bad = dead_url(), serve(tampered)
    with pytest.raises(CapsNetError) as info:
        acquire(made.name, mirrors=(dead, bad))
    message = str(info.value)
    cache = isolated_env / "capsnet" / made.name
    assert "\n" not in message
    assert not cache.exists()  # nothing from the bad mirror was kept
    assert f"cache {cache} (no " in message
    assert f"mirror {dead} (" in message and "refused" in message.lower()
    first = min(p.name for p in tampered.iterdir())
    bad_part = message.split(f"mirror {bad} (")[1].split(")")[0]
    assert f"MD5 mismatch for {first}: expected {DATASETS[made.name].md5[first]}" in bad_part
    assert hashlib.md5((tampered / first).read_bytes()).hexdigest() in bad_part
    # How to fix it by hand.
    assert "CAPSNET_DATA_DIR" in message and "--data-dir" in message and str(cache) in message
    for name in DATASETS[made.name].md5:
        assert name in message


# --- splits ----------------------------------------------------------------------------------


def test_load_splits_gives_colour_images_labels_and_class_names(made: Made) -> None:
    splits = load_splits(made.name, data_dir=made.folder, val_size=3)
    train_images, train_labels = made.expected["train_images"], made.expected["train_labels"]
    n_train = len(train_labels)
    assert (len(splits.train), len(splits.val)) == (n_train - 3, 3)
    assert len(splits.test) == len(made.expected["test_labels"])
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
    np.testing.assert_array_equal(splits.val.images.numpy(), train_images[:3])
    np.testing.assert_array_equal(splits.val.labels.numpy(), train_labels[:3])
    np.testing.assert_array_equal(splits.train.images.numpy(), train_images[3:])
    np.testing.assert_array_equal(splits.test.images.numpy(), made.expected["test_images"])
    np.testing.assert_array_equal(splits.test.labels.numpy(), made.expected["test_labels"])
    assert splits.num_classes == 10 and splits.class_names == made.class_names
    assert splits.in_channels == 3 and splits.image_size == 32


def test_svhn_label_10_is_the_digit_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = svhn_files()
    name = register("svhn", write_files(tmp_path / "svhn", files), monkeypatch)
    arrays = acquire(name, data_dir=tmp_path / "svhn")
    stored = scipy.io.loadmat(io.BytesIO(files[SVHN_FILES["train"]]))["y"].reshape(-1)
    assert 10 in stored and 0 not in stored
    np.testing.assert_array_equal(arrays["train_labels"], np.where(stored == 10, 0, stored))
    assert sorted(set(arrays["train_labels"].tolist())) == list(range(10))


# --- corrupt files ---------------------------------------------------------------------------


def cifar10_archive(change: Callable[[dict[str, bytes]], dict[str, bytes]],
                    symlinks: tuple[str, ...] = ()) -> bytes:
    """The tiny archive with its members (in order) as ``change`` makes them."""
    members, _ = cifar10_members()
    return tar_gz(change(members), symlinks)


def without(name: str) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda members: {key: data for key, data in members.items() if key != name}


def replaced(name: str, data: bytes) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda members: {**members, name: data}


JUNK = {f"cifar-10-batches-bin/junk{k}": b"" for k in range(100)}
GOOD_ARCHIVE = cifar10_archive(dict)
CIFAR10_CORRUPTIONS = {
    "not-gzip": (b"PK\x03\x04 a zip file", "not a valid CIFAR-10 binary archive"),
    "cut-short": (GOOD_ARCHIVE[:len(GOOD_ARCHIVE) // 2], "not a valid CIFAR-10 binary archive"),
    "missing-member": (cifar10_archive(without(CIFAR10_TEST)), f"no {CIFAR10_TEST}"),
    "symlink": (cifar10_archive(without(CIFAR10_TRAIN[0]), symlinks=(CIFAR10_TRAIN[0],)),
                f"{CIFAR10_TRAIN[0]} is not a regular file"),
    "twice": (cifar10_archive(without(CIFAR10_TEST), symlinks=(CIFAR10_TRAIN[0],)),
              f"{CIFAR10_TRAIN[0]} appears twice"),
    "partial-record": (cifar10_archive(replaced(CIFAR10_TRAIN[2], bytes(3073 * 2 + 1))),
                       "6147 bytes is not a whole number of 3073-byte records"),
    "empty-batch": (cifar10_archive(replaced(CIFAR10_TEST, b"")),
                    "0 bytes is not a whole number"),
    "label-10": (cifar10_archive(replaced(CIFAR10_TEST, bytes([10]) + bytes(3072))),
                 r"test_batch.bin: label 10 out of range 0\.\.9"),
    "too-large": (cifar10_archive(replaced(CIFAR10_TRAIN[1], bytes(3073 * 4))),
                  f"{CIFAR10_TRAIN[1]} has 12292 bytes, over the limit of 9219"),
    "many-entries": (cifar10_archive(lambda members: {**JUNK, **members}),
                     "more than 100 entries"),
}


@pytest.mark.parametrize("case", CIFAR10_CORRUPTIONS)
def test_corrupt_cifar10_archive_is_one_line_naming_it(case: str, serve, tmp_path: Path,
                                                       isolated_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    content, problem = CIFAR10_CORRUPTIONS[case]
    monkeypatch.setattr(formats, "CIFAR10_MAX_RECORDS", 3)  # so "too-large" stays tiny
    folder = write_files(tmp_path / "corrupt", {CIFAR10_ARCHIVE: content})
    name, url = register("cifar10", folder, monkeypatch), serve(folder)
    with pytest.raises(CapsNetError, match=problem) as info:
        acquire(name, mirrors=(url,))
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"mirror {url}{CIFAR10_ARCHIVE}")
    assert not (isolated_env / "capsnet" / name).exists()  # unreadable files are not cached


GOOD_MAT = svhn_mat(3, 0)[0]
SVHN_CORRUPTIONS = {
    "garbage": (b"not a MATLAB file at all" * 8, "not a valid SVHN .mat file"),
    "cut-short": (GOOD_MAT[:len(GOOD_MAT) // 2], "no variable y"),
    "cut-in-header": (GOOD_MAT[:100], "not a valid SVHN .mat file"),
    "no-X": (mat_bytes(y=np.ones((3, 1), np.uint8)), r"no variable X \(found: y\)"),
    "grey-images": (svhn_mat(3, 0, X=np.zeros((32, 32, 1, 3), np.uint8))[0],
                    r"X is uint8 \(32, 32, 1, 3\), expected uint8 \(32, 32, 3, N\)"),
    "float-images": (svhn_mat(3, 0, X=np.zeros((32, 32, 3, 3)))[0], "X is double"),
    "label-count": (svhn_mat(3, 0, y=np.ones((4, 1), np.uint8))[0],
                    r"3 images but y has shape \(4, 1\)"),
    "label-0": (svhn_mat(3, 0, y=np.zeros((3, 1), np.uint8))[0], "labels outside 1..10"),
}


@pytest.mark.parametrize("case", SVHN_CORRUPTIONS)
def test_corrupt_svhn_file_is_one_line_naming_it(case: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    content, problem = SVHN_CORRUPTIONS[case]
    files, _ = svhn_files()
    folder = write_files(tmp_path / "corrupt", {**files, SVHN_FILES["test"]: content})
    name = register("svhn", folder, monkeypatch)
    with pytest.raises(CapsNetError, match=problem) as info:
        acquire(name, data_dir=folder)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"data directory {folder}/{SVHN_FILES['test']}: ")


