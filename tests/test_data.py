"""IDX files, data set acquisition from local sources and a local HTTP mirror, splits, batches."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import capsnet.data.sources as data
from capsnet.data import (FILE_NAMES, ROLES, DatasetSpec, Split, acquire, batches,
                          check_images_labels, load_splits, read_idx, shift_images, write_idx)
from capsnet.data.formats import read_idx_files
from capsnet.errors import CapsNetError
from conftest import dead_url, write_dataset

pytestmark = pytest.mark.usefixtures("isolated_env")  # a private cache, no proxy

# --- IDX files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 3)])
def test_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"x{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def idx_bytes(shape: tuple[int, ...], dtype: int = 0x08) -> bytes:
    header = bytes([0, 0, dtype, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)
    return header + bytes(int(np.prod(shape)))


GOOD = idx_bytes((2, 3))
GOOD_GZ = gzip.compress(GOOD, mtime=0)
# A gzip header followed by a deflate block of the reserved type 11: zlib rejects it.
BAD_DEFLATE = GOOD_GZ[:10] + b"\xff" * 20


@pytest.mark.parametrize("content, problem", [
    (b"\x00\x01\x08\x02" + GOOD[4:], "bad IDX magic"),
    (idx_bytes((2, 3), dtype=0x0D), "bad IDX magic"),  # float32 instead of unsigned byte
    (bytes([0, 0, 8, 0]), "0 dimensions"),
    (bytes([0, 0, 8, 4]) + b"\x00\x00\x00\x01" * 4 + b"\x00", "4 dimensions"),
    (GOOD[:9], "truncated IDX header"),
    (GOOD[:-1], "truncated"),
    (GOOD + b"\x00\x00", "2 bytes of trailing data"),
    (GOOD_GZ[:-8] + b"\x00" * 8, "corrupt gzip"),  # CRC and length wrong
    (GOOD_GZ[:20], "corrupt gzip"),  # stream cut short
    (BAD_DEFLATE, "corrupt gzip"),
    (b"", "too short"),
    (b"\x00\x00\x08", "too short"),
], ids=["magic", "dtype", "0-dims", "4-dims", "header", "data", "trailing", "gzip-crc",
        "gzip-cut", "gzip-deflate", "empty", "3-bytes"])
def test_corrupt_idx_raises_capsnet_error_naming_file(tmp_path: Path, content: bytes,
                                                       problem: str) -> None:
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(CapsNetError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_unreadable_path_raises_capsnet_error(tmp_path: Path, make: str) -> None:
    path = tmp_path / "nothing-here"
    if make == "directory":
        path.mkdir()
    with pytest.raises(CapsNetError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_check_images_labels() -> None:
    images, labels = np.zeros((4, 5, 5), np.uint8), np.array([0, 1, 2, 2], np.uint8)
    check_images_labels(images, labels, 3, "ok")  # consistent: no error
    with pytest.raises(CapsNetError, match="mnist train: 4 images but 3 labels"):
        check_images_labels(images, labels[:3], 3, "mnist train")
    with pytest.raises(CapsNetError, match=r"mnist test: label 2 out of range 0\.\.1"):
        check_images_labels(images, labels, 2, "mnist test")
    with pytest.raises(CapsNetError, match="3 dimensions"):
        check_images_labels(images[0], labels, 3, "x")


# --- acquisition ---------------------------------------------------------------------------


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """The four .gz files of a tiny data set."""
    return write_dataset(tmp_path / "source", n_train=12, n_test=6, gzipped=True)


@pytest.fixture()
def fake_spec(source: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., DatasetSpec]:
    """Register data set ``fake`` whose MD5s match ``source``; keyword args override fields."""
    md5 = {name: hashlib.md5(gzip.decompress((source / (name + ".gz")).read_bytes())).hexdigest()
           for name in FILE_NAMES.values()}

    def register(**fields) -> DatasetSpec:
        spec = DatasetSpec(name="fake", md5=md5, reader=read_idx_files, gzipped=True,
                           **{"npm_package": None, **fields})
        monkeypatch.setitem(data.DATASETS, "fake", spec)
        return spec

    register()
    return register


def assert_matches_source(arrays: dict[str, np.ndarray], source: Path) -> None:
    for role in ROLES:
        np.testing.assert_array_equal(arrays[role], read_idx(source / (FILE_NAMES[role] + ".gz")))


def cache_dir(cache_home: Path) -> Path:
    return cache_home / "capsnet" / "fake"


def test_mirror_download_is_verified_cached_atomically_and_reused(
        source: Path, fake_spec, serve, isolated_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = serve(source)
    arrays = acquire("fake", mirrors=(url,), quiet=False)
    assert_matches_source(arrays, source)
    assert arrays["train_images"].shape == (12, 28, 28) and arrays["test_labels"].shape == (6,)
    assert f"using mirror {url}" in capsys.readouterr().out
    cached = cache_dir(isolated_env)
    # Exactly the four raw files, no leftover temporary file.
    assert sorted(p.name for p in cached.iterdir()) == sorted(FILE_NAMES.values())
    for role in ROLES:
        assert (cached / FILE_NAMES[role]).read_bytes() == gzip.decompress(
            (source / (FILE_NAMES[role] + ".gz")).read_bytes())
    # Second call: the mirror is gone, the cache answers.
    again = acquire("fake", mirrors=(dead_url(),), quiet=False)
    assert_matches_source(again, source)
    assert f"using cache {cached}" in capsys.readouterr().out


def test_dead_mirror_then_good_one(source: Path, fake_spec, serve, isolated_env: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = serve(source)
    arrays = acquire("fake", mirrors=(dead_url(), good), quiet=False)
    assert_matches_source(arrays, source)
    assert f"using mirror {good}" in capsys.readouterr().out
    assert len(list(cache_dir(isolated_env).iterdir())) == 4


def test_bad_checksum_is_skipped_and_failure_lists_every_source(
        source: Path, fake_spec, serve, tmp_path: Path, isolated_env: Path) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in FILE_NAMES.values():
        (tampered / (name + ".gz")).write_bytes((source / (name + ".gz")).read_bytes())
    labels = read_idx(source / (FILE_NAMES["test_labels"] + ".gz")).copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(tampered / (FILE_NAMES["test_labels"] + ".gz"), labels)
    bad_md5 = hashlib.md5(gzip.decompress(
        (tampered / (FILE_NAMES["test_labels"] + ".gz")).read_bytes())).hexdigest()
    good_md5 = data.DATASETS["fake"].md5[FILE_NAMES["test_labels"]]
    dead, bad = dead_url(), serve(tampered)

    with pytest.raises(CapsNetError) as info:
        acquire("fake", mirrors=(dead, bad))
    message = str(info.value)
    lines = message.splitlines()
    cache = cache_dir(isolated_env)
    assert not cache.exists()  # nothing from the bad mirror was kept
    assert any(f"cache {cache}" in line for line in lines)
    assert any(f"mirror {dead}" in line and "refused" in line.lower() for line in lines)
    [bad_line] = [line for line in lines if f"mirror {bad}" in line]
    assert "MD5 mismatch" in bad_line and good_md5 in bad_line and bad_md5 in bad_line
    assert FILE_NAMES["test_labels"] in bad_line
    # How to fix it by hand.
    assert "CAPSNET_DATA_DIR" in message and "--data-dir" in message and str(cache) in message
    for name in FILE_NAMES.values():
        assert name in message


def test_user_data_dir_has_priority(source: Path, fake_spec, serve, isolated_env: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    acquire("fake", mirrors=(serve(source),))  # fill the cache
    assert_matches_source(acquire("fake", data_dir=source, quiet=False), source)
    assert f"using data directory {source}" in capsys.readouterr().out


def test_data_dir_env_variable(source: Path, fake_spec, isolated_env: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(source))
    assert_matches_source(acquire("fake", mirrors=(dead_url(),), quiet=False), source)
    assert f"using data directory {source}" in capsys.readouterr().out
    assert not cache_dir(isolated_env).exists()  # the user's own files are not copied


def test_data_dir_argument_beats_env(source: Path, fake_spec, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "elsewhere"))
    acquire("fake", data_dir=source, mirrors=(), quiet=False)
    assert f"using data directory {source}" in capsys.readouterr().out


def test_system_dir_is_used(source: Path, fake_spec, isolated_env: Path,
                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake_spec(system_dirs=(str(tmp_path / "not-installed"), str(source)))
    assert_matches_source(acquire("fake", mirrors=(), quiet=False), source)
    assert f"using system folder {source}" in capsys.readouterr().out
    assert not cache_dir(isolated_env).exists()


def test_unknown_dataset_name(fake_spec) -> None:
    with pytest.raises(CapsNetError, match="unknown data set 'nope'"):
        acquire("nope")


# --- splits ----------------------------------------------------------------------------------


@pytest.fixture()
def folder_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "own", n_train=30, n_test=10)


def test_load_splits_on_a_folder(folder_dataset: Path) -> None:
    splits = load_splits(str(folder_dataset), val_size=7)
    train_images = read_idx(folder_dataset / FILE_NAMES["train_images"])
    train_labels = read_idx(folder_dataset / FILE_NAMES["train_labels"])
    assert (len(splits.train), len(splits.val), len(splits.test)) == (23, 7, 10)
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
    # The notebook's split (TensorFlow's read_data_sets): the FIRST val_size training images
    # are held out, in order, and training gets the rest.
    np.testing.assert_array_equal(splits.val.images[:, 0].numpy(), train_images[:7])
    np.testing.assert_array_equal(splits.val.labels.numpy(), train_labels[:7])
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), train_images[7:])
    np.testing.assert_array_equal(splits.train.labels.numpy(), train_labels[7:])
    assert splits.num_classes == 10 and splits.image_size == 28 and splits.in_channels == 1


def test_load_splits_can_hold_out_the_last_images(folder_dataset: Path) -> None:
    splits = load_splits(str(folder_dataset), val_size=7, val_split="last")
    train_images = read_idx(folder_dataset / FILE_NAMES["train_images"])
    np.testing.assert_array_equal(splits.val.images[:, 0].numpy(), train_images[-7:])
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), train_images[:-7])


def test_load_splits_on_a_registered_name(source: Path, fake_spec) -> None:
    splits = load_splits("fake", data_dir=source, val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 6)


@pytest.mark.parametrize("val_size", [0, -1, 30, 31])
def test_load_splits_rejects_bad_val_size(folder_dataset: Path, val_size: int) -> None:
    with pytest.raises(CapsNetError, match=f"validation size {val_size} must be between 1 and 29"):
        load_splits(str(folder_dataset), val_size=val_size)


# --- batches ---------------------------------------------------------------------------------


def numbered_split(n: int = 10, size: int = 5) -> Split:
    """Images with distinct pixel values (1..255) and labels equal to the image index."""
    images = torch.arange(n * size * size).remainder(255).add(1).to(torch.uint8)
    return Split(images.view(n, 1, size, size), torch.arange(n))


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) with its content moved down ``dy`` and right ``dx``, zero filled."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    for r in range(h):
        for c in range(w):
            if 0 <= r + dy < h and 0 <= c + dx < w:
                out[:, r + dy, c + dx] = image[:, r, c]
    return out


def test_batches_shapes_and_range() -> None:
    split = numbered_split()
    split.images[0, 0, 0, 0], split.images[1, 0, 0, 0] = 255, 0  # both ends of the range
    got = list(batches(split, 4))
    assert [len(labels) for _, labels in got] == [4, 4, 2]
    for images, labels in got:
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 5, 5)
        assert images.min() >= 0 and images.max() <= 1
        assert labels.dtype == torch.int64
    torch.testing.assert_close(torch.cat([i for i, _ in got]), split.images.float() / 255)
    assert torch.cat([i for i, _ in got]).aminmax() == (0.0, 1.0)


def test_same_seed_same_batches_and_start_resumes() -> None:
    split = numbered_split(11)
    full = list(batches(split, 3, seed=7, max_shift=1))
    again = list(batches(split, 3, seed=7, max_shift=1))
    other = list(batches(split, 3, seed=8, max_shift=1))
    for (a, la), (b, lb) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not all(torch.equal(la, lb) for (_, la), (_, lb) in zip(full, other))
    assert sorted(torch.cat([labels for _, labels in full]).tolist()) == list(range(11))
    for k in (1, 3):
        tail = list(batches(split, 3, seed=7, max_shift=1, start=k))
        assert len(tail) == len(full) - k
        for (a, la), (b, lb) in zip(tail, full[k:]):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert list(batches(split, 3, seed=7, start=4)) == []


def test_seeded_batches_are_shifted_copies_within_max_shift() -> None:
    split = numbered_split(12)
    originals = split.images.float() / 255
    moves = set()
    for images, labels in batches(split, 5, seed=3, max_shift=2):
        for image, label in zip(images, labels.tolist()):
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if torch.equal(image, shifted(originals[label], dy, dx))]
            assert found, f"image {label} is not a shift of its original by at most 2 px"
            moves.add(found[0])
    assert len(moves) > 1  # the shifts really vary


def test_no_shift_without_seed_or_with_zero_max_shift() -> None:
    split = numbered_split()
    originals = split.images.float() / 255
    for kwargs in (dict(max_shift=2), dict(seed=1, max_shift=0)):
        for images, labels in batches(split, 4, **kwargs):
            torch.testing.assert_close(images, originals[labels], rtol=0, atol=0)
    unseeded = torch.cat([labels for _, labels in batches(split, 4, max_shift=2)])
    assert unseeded.tolist() == list(range(10))  # fixed order


def test_shift_images_by_hand() -> None:
    image = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1 2 3] [4 5 6] [7 8 9]]
    images = image.repeat(3, 1, 1, 1)
    # Offsets (rows, then columns) in [0, 2 * max_shift]; content moves by max_shift - offset.
    offsets = torch.tensor([[0, 1, 2],
                            [2, 1, 0]])
    out = shift_images(images, offsets, max_shift=1)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0, 0], [2, 3, 0], [5, 6, 0]]))  # down, left
    torch.testing.assert_close(out[1, 0], image[0, 0])  # centre offset: unchanged
    torch.testing.assert_close(out[2, 0], torch.tensor([[0.0, 4, 5], [0, 7, 8], [0, 0, 0]]))  # up, right
    torch.testing.assert_close(out[0], shifted(image[0], 1, -1))  # agrees with the test's helper


def test_random_crops_stay_inside_and_evaluation_takes_the_centre() -> None:
    # Each pixel holds its own column index, so a crop's content says where it was cut.
    images = torch.arange(32, dtype=torch.uint8).repeat(6, 3, 32, 1)  # (6, 3, 32, 32)
    split = Split(images, torch.arange(6))
    cropped = torch.cat([x for x, _ in batches(split, 4, seed=5, crop=24)])
    assert cropped.shape == (6, 3, 24, 24)
    first_columns = (cropped[:, 0, 0, 0] * 255).round().long()
    assert torch.all((0 <= first_columns) & (first_columns <= 8))
    assert len(set(first_columns.tolist())) > 1  # random places
    again = torch.cat([x for x, _ in batches(split, 4, seed=5, crop=24)])
    assert torch.equal(cropped, again)  # replayable for resume
    centre = torch.cat([x for x, _ in batches(split, 4, crop=24)])
    assert torch.all((centre[:, :, :, 0] * 255).round() == 4)
    with pytest.raises(CapsNetError, match="cannot crop 40x40 out of 32x32 images"):
        next(batches(split, 4, crop=40))
