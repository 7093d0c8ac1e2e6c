"""smallNORB: tiny files in NORB's binary matrix format with the official names, read through the
data-directory source, the 2x2 downsampling, and one-line errors for hostile headers."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
import tracemalloc
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import capsnet.data.sources as sources
from capsnet.cli import main
from capsnet.data import DATASETS, acquire, batches, load_splits
from capsnet.data.smallnorb import (BYTE_MATRIX, INTEGER_MATRIX, SMALLNORB_FILES, SMALLNORB_URL,
                                    downsample, parse_binary_matrix, read_smallnorb)
from capsnet.errors import CapsNetError

pytestmark = pytest.mark.usefixtures("isolated_env")  # a private cache, no proxy

OFFICIAL_NAMES = {
    "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
    "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
    "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat",
}
SIZES = {"train": 4, "test": 3}  # stereo pairs per part
TRAIN_DAT = SMALLNORB_FILES["train"]["dat"]
TEST_CAT = SMALLNORB_FILES["test"]["cat"]
TEST_INFO = SMALLNORB_FILES["test"]["info"]


# --- tiny files in the official format -------------------------------------------------------


def binary_matrix(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """A binary matrix file: magic, ndim, max(3, ndim) sizes padded with 1, then ``payload``,
    all little-endian."""
    sizes = (*shape, *(1,) * (3 - len(shape)))
    return struct.pack(f"<Ii{len(sizes)}i", magic, len(shape), *sizes) + payload


def byte_matrix(array: np.ndarray) -> bytes:
    return binary_matrix(BYTE_MATRIX, array.shape, array.astype(np.uint8).tobytes())


def integer_matrix(array: np.ndarray) -> bytes:
    return binary_matrix(INTEGER_MATRIX, array.shape, array.astype("<i4").tobytes())


def part_files(part: str, seed: int) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """The three decompressed files of ``part``, its stereo pairs and its labels."""
    n, rng = SIZES[part], np.random.default_rng(seed)
    pairs = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
    labels = (np.arange(n) + seed) % 5
    info = rng.integers(0, 9, (n, 4))
    names = SMALLNORB_FILES[part]
    return ({names["dat"]: byte_matrix(pairs), names["cat"]: integer_matrix(labels),
             names["info"]: integer_matrix(info)}, pairs, labels)


def made_files() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """All six decompressed files and the pairs and labels they hold."""
    files, held = {}, {}
    for seed, part in enumerate(SIZES):
        part_bytes, held[f"{part}_pairs"], held[f"{part}_labels"] = part_files(part, seed)
        files.update(part_bytes)
    return files, held


def write_gzipped(folder: Path, files: dict[str, bytes]) -> Path:
    """``files`` as the site serves them: NAME.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
    return folder


def register(files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> str:
    """``fake-smallnorb``: the real entry with the MD5s of ``files`` (decompressed) and no
    mirrors."""
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    fake = dataclasses.replace(DATASETS["smallnorb"], name="fake-smallnorb", md5=md5, mirrors=())
    monkeypatch.setitem(DATASETS, fake.name, fake)
    return fake.name


def block_means(pairs: np.ndarray) -> np.ndarray:
    """The 48x48 images as the papers made them: the mean of each 2x2 block, to the nearest."""
    means = pairs.astype(np.float64).reshape(len(pairs), 2, 48, 2, 48, 2).mean(axis=(3, 5))
    return np.floor(means + 0.5).astype(np.uint8)


# --- the entry and the format ----------------------------------------------------------------


def test_entry_names_the_official_files_site_and_classes() -> None:
    spec = DATASETS["smallnorb"]
    assert set(spec.md5) == OFFICIAL_NAMES and spec.gzipped
    assert spec.mirrors == ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)
    assert spec.num_classes == 5
    assert spec.class_names == ("animal", "human", "airplane", "truck", "car")


def test_binary_matrix_header_is_little_endian_with_three_sizes_at_least() -> None:
    vector = integer_matrix(np.array([7, 8, 9]))
    # By hand: 0x1E3D4C54, ndim 1, sizes 3, 1, 1, then the elements, all little-endian.
    assert vector[:20] == bytes.fromhex("544c3d1e 01000000 03000000 01000000 01000000")
    assert vector[20:24] == bytes.fromhex("07000000")
    parsed = parse_binary_matrix(vector, "v")
    assert parsed.dtype == np.int32 and parsed.tolist() == [7, 8, 9]
    cube = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    four_d = byte_matrix(cube)
    assert len(four_d) == 8 + 4 * 4 + cube.size  # four sizes, no padding
    np.testing.assert_array_equal(parse_binary_matrix(four_d, "c"), cube)


def test_downsampling_is_the_rounded_mean_of_each_2x2_block() -> None:
    images = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    images[0, 0, :2, :2] = [[0, 1], [2, 3]]  # 1.5 -> 2
    images[0, 0, :2, 2:] = 255  # no overflow
    images[0, 0, 2:, :2] = [[0, 0], [0, 1]]  # 0.25 -> 0
    images[0, 0, 2:, 2:] = [[0, 0], [1, 1]]  # 0.5 -> 1
    assert downsample(images)[0, 0].tolist() == [[2, 255], [0, 1]]
    pairs = np.random.default_rng(5).integers(0, 256, (3, 2, 96, 96), dtype=np.uint8)
    np.testing.assert_array_equal(downsample(pairs), block_means(pairs))


# --- through the data directory --------------------------------------------------------------


def test_data_dir_of_official_gz_files_gives_stereo_48x48_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    files, held = made_files()
    folder = write_gzipped(tmp_path / "norb", files)
    name = register(files, monkeypatch)
    arrays = acquire(name, data_dir=folder, quiet=False)
    assert f"using data directory {folder}" in capsys.readouterr().out
    assert not (isolated_env / "capsnet").exists()  # a user's folder is not cached
    assert arrays.keys() == {"train_images", "train_labels", "test_images", "test_labels"}
    for part, n in SIZES.items():
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        assert images.dtype == np.uint8 and images.shape == (n, 2, 48, 48)
        assert labels.dtype == np.uint8 and labels.tolist() == held[f"{part}_labels"].tolist()
        np.testing.assert_array_equal(images, block_means(held[f"{part}_pairs"]))
    # Channel 0 is the first image of each pair, channel 1 the second.
    np.testing.assert_array_equal(arrays["train_images"][:, 1],
                                  block_means(held["train_pairs"])[:, 1])


def test_splits_have_two_channels_five_named_classes_and_crop_to_32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, held = made_files()
    name = register(files, monkeypatch)
    splits = load_splits(name, data_dir=write_gzipped(tmp_path / "norb", files), val_size=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 3)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (2, 48, 5)
    assert splits.class_names == ("animal", "human", "airplane", "truck", "car")
    assert splits.train.images.dtype == torch.uint8
    np.testing.assert_array_equal(splits.val.labels.numpy(), held["train_labels"][:1])
    # --crop 32 tests on the centre 32x32 of the 48x48 images, as the papers did.
    images, _ = next(batches(splits.test, 3, crop=32))
    assert images.shape == (3, 2, 32, 32)
    np.testing.assert_allclose(images.numpy() * 255, splits.test.images[:, :, 8:40, 8:40].numpy(),
                               atol=1e-3)


def test_data_command_without_the_files_names_the_site_and_data_dir(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    assert main(["data", "smallnorb"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert f"mirror {SMALLNORB_URL} (" in message and "no network" in message
    assert "--data-dir" in message and TRAIN_DAT in message and "raw or .gz" in message


# --- hostile files ---------------------------------------------------------------------------

HUGE = 2**31 - 1
GOOD_LABELS = integer_matrix(np.arange(3) % 5)
CORRUPTIONS = {
    "empty": (TEST_CAT, b"", r"too short for a binary matrix header \(0 bytes\)"),
    "idx-magic": (TEST_CAT, bytes.fromhex("00000801 00000003") + bytes(3),
                  "bad magic number 0x01080000"),
    "big-endian": (TEST_CAT, struct.pack(">Ii3i", INTEGER_MATRIX, 1, 3, 1, 1) + bytes(12),
                   "bad magic number 0x544C3D1E"),
    "packed-matrix": (TEST_CAT, binary_matrix(0x1E3D4C52, (3,), bytes(12)),
                      "bad magic number 0x1E3D4C52"),
    "ndim-100": (TEST_CAT, struct.pack("<Ii", INTEGER_MATRIX, 100) + bytes(400),
                 "has 100 dimensions, expected 1 to 8"),
    "ndim-negative": (TEST_CAT, struct.pack("<Ii3i", INTEGER_MATRIX, -1, 3, 1, 1),
                      "has -1 dimensions"),
    "header-cut": (TRAIN_DAT, struct.pack("<Ii3i", BYTE_MATRIX, 4, 3, 2, 96),
                   r"truncated binary matrix header \(20 bytes, 4 dimensions need 24\)"),
    "size-negative": (TEST_CAT, binary_matrix(INTEGER_MATRIX, (-3,), bytes(12)),
                      r"sizes \(-3,\) must be positive"),
    "size-zero": (TRAIN_DAT, binary_matrix(BYTE_MATRIX, (0, 2, 96, 96), b""),
                  r"sizes \(0, 2, 96, 96\) must be positive"),
    "sizes-overflow": (TRAIN_DAT, binary_matrix(BYTE_MATRIX, (HUGE,) * 4, bytes(64)),
                       f"truncated: 64 data bytes, .* needs {HUGE ** 4}"),
    "more-than-the-file": (TRAIN_DAT, binary_matrix(BYTE_MATRIX, (24300, 2, 96, 96), bytes(64)),
                           f"truncated: 64 data bytes, .* needs {24300 * 2 * 96 * 96}"),
    "data-cut": (TEST_CAT, GOOD_LABELS[:-1], "truncated: 11 data bytes, .* needs 12"),
    "trailing": (TEST_CAT, GOOD_LABELS + b"\0", r"1 bytes of trailing data after \(3,\)"),
    "images-as-integers": (TRAIN_DAT, integer_matrix(np.zeros((4, 2, 96, 96))),
                           "an integer matrix, expected a byte matrix"),
    "labels-as-bytes": (TEST_CAT, byte_matrix(np.zeros(3)), "a byte matrix, expected an integer"),
    "one-camera": (TRAIN_DAT, byte_matrix(np.zeros((4, 1, 96, 96))),
                   r"shape \(4, 1, 96, 96\), expected \(N, 2, 96, 96\)"),
    "label-count": (TEST_CAT, integer_matrix(np.zeros(4)), r"shape \(4,\), expected \(3,\)"),
    "info-columns": (TEST_INFO, integer_matrix(np.zeros((3, 5))),
                     r"shape \(3, 5\), expected \(3, 4\)"),
    "label-5": (TEST_CAT, integer_matrix(np.array([0, 5, 1])), r"labels outside 0\.\.4"),
    "label-negative": (TEST_CAT, integer_matrix(np.array([0, -1, 1])), r"labels outside 0\.\.4"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_hostile_file_is_one_line_naming_it_without_allocating(case: str) -> None:
    name, content, problem = CORRUPTIONS[case]
    files, _ = made_files()
    files[name] = content
    tracemalloc.start()
    try:
        with pytest.raises(CapsNetError, match=problem) as info:
            read_smallnorb(files, "folder/")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(f"folder/{name}: ")
    assert "\n" not in str(info.value)
    assert peak < 2**20  # the declared sizes (up to 2**124 bytes) are never allocated


def test_hostile_file_in_the_data_dir_names_it(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = made_files()
    files[TEST_CAT] = struct.pack("<Ii", INTEGER_MATRIX, 100)
    folder = write_gzipped(tmp_path / "norb", files)
    with pytest.raises(CapsNetError, match="has 100 dimensions") as info:
        acquire(register(files, monkeypatch), data_dir=folder)
    assert str(info.value).startswith(f"data directory {folder}/{TEST_CAT}: ")


def test_corrupt_gzip_is_one_line_listing_the_sources(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = made_files()
    name = register(files, monkeypatch)
    folder = write_gzipped(tmp_path / "norb", files)
    dat = folder / (TRAIN_DAT + ".gz")
    dat.write_bytes(dat.read_bytes()[:100])
    with pytest.raises(CapsNetError, match=f"could not get data set {name!r}") as info:
        acquire(name, data_dir=folder)
    assert "\n" not in str(info.value) and f"data directory {folder} (" in str(info.value)
