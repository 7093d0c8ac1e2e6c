"""Fuzzing the two parsers of untrusted files: IDX data (capsnet.data.parse_idx) and the
user's images for ``capsnet predict`` (capsnet.utils.images.load_image).

Each parser must either return a correct result or raise CapsNetError, whatever the bytes:
never another exception, never a wrong array. 1000 generated cases per test.
"""

from __future__ import annotations

import atexit
import gzip
import io
import math
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from capsnet.data import parse_idx
from capsnet.utils.images import load_image
from capsnet.errors import CapsNetError

FUZZ = settings(max_examples=1000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
QUIET_PIL = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # "Truncated File Read" etc.


# -- IDX ---------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(s.to_bytes(4, "big") for s in array.shape) \
        + array.astype(np.uint8).tobytes()


def expected_idx(data: bytes) -> np.ndarray | None:
    """What a correct IDX parser returns for ``data``, from the format's definition
    (Python integers throughout); None where the bytes are not a valid IDX file of
    unsigned bytes with 1 to 3 non-empty dimensions."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except Exception:
            return None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 3:
        return None
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        return None
    shape = tuple(struct.unpack(">%dI" % ndim, data[4:4 + 4 * ndim]))
    if 0 in shape or len(data) - 4 - 4 * ndim != math.prod(shape):
        return None
    return np.array(list(data[4 + 4 * ndim:]), dtype=np.uint8).reshape(shape)


def check_parse_idx(data: bytes) -> None:
    expected = expected_idx(data)
    try:
        result = parse_idx(data, "fuzz")
    except CapsNetError as exc:
        assert expected is None, f"valid IDX {expected.shape} refused: {exc}"
        assert "\n" not in str(exc) and str(exc).startswith("fuzz: ")
        event("refused with CapsNetError")
        return
    event("parsed")
    assert expected is not None, f"invalid IDX bytes accepted as {result.shape}"
    assert result.dtype == np.uint8 and result.shape == expected.shape
    assert np.array_equal(result, expected)


@FUZZ
@given(st.one_of(
    st.binary(max_size=80),
    # bytes behind a plausible magic number, so more cases reach the dimension checks
    st.builds(lambda ndim, rest: bytes([0, 0, 8, ndim]) + rest, st.integers(0, 5),
              st.binary(max_size=80)),
    st.builds(lambda raw: gzip.compress(raw, mtime=0), st.binary(max_size=40)),
))
def test_parse_idx_on_arbitrary_bytes(data: bytes) -> None:
    check_parse_idx(data)


mutations = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.integers(0, 200)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("set_byte"), st.integers(0, 15), st.integers(0, 255)),
    st.tuples(st.just("set_dim"), st.integers(0, 2),
              st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from(
                  [0, 1, 2, 3, 2 ** 16, 2 ** 31, 2 ** 32 - 1]))),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(0, 7)),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, *args = mutation
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[:args[0] % (len(buf) + 1)])
    if kind == "append":
        return bytes(buf) + args[0]
    if kind == "set_byte" and args[0] < len(buf):
        buf[args[0]] = args[1]
    if kind == "set_dim" and 8 + 4 * args[0] <= len(buf):
        buf[4 + 4 * args[0]: 8 + 4 * args[0]] = args[1].to_bytes(4, "big")
    if kind == "flip" and buf:
        buf[args[0] % len(buf)] ^= 1 << args[1]
    return bytes(buf)


@FUZZ
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)),
       st.lists(mutations, min_size=1, max_size=3), st.booleans())
@example(np.zeros((1, 1, 1), np.uint8),  # dimensions whose product overflows int64 to 0
         [("set_dim", 0, 2 ** 31), ("set_dim", 1, 2 ** 31), ("set_dim", 2, 4), ("truncate", 16)],
         False)
def test_parse_idx_on_mutated_files(array: np.ndarray, mutation_list: list, gzipped: bool) -> None:
    data = idx_bytes(array)
    for mutation in mutation_list:
        data = mutate(data, mutation)
    if gzipped:
        data = gzip.compress(data, mtime=0)
    if all(m == ("none",) for m in mutation_list):
        assert np.array_equal(parse_idx(data), array)  # unmutated files parse exactly
    check_parse_idx(data)


def test_parse_idx_dimensions_whose_product_overflows() -> None:
    """Header (2**31, 2**31, 4): the product is 2**64, which wraps to 0 in int64 arithmetic,
    so an empty body must not be taken for a complete file."""
    header = bytes([0, 0, 8, 3]) + (2 ** 31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big")
    with pytest.raises(CapsNetError, match="truncated"):
        parse_idx(header)


# -- images for capsnet predict -----------------------------------------------------------

WORK = Path(tempfile.mkdtemp(prefix="capsnet-fuzz-"))  # one file rewritten per case
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def check_load_image(data: bytes, suffix: str, size: int, channels: int, preprocess: bool
                     ) -> np.ndarray | None:
    """Write ``data`` and load it: a float32 (channels, size, size) array in [0, 1], or
    CapsNetError with a one-line message naming the file. Returns the array or None."""
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        out = load_image(path, size, channels, preprocess=preprocess)
    except CapsNetError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(path)), message
        event("refused with CapsNetError")
        return None
    event("loaded")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (channels, size, size)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    return out


image_options = dict(size=st.sampled_from([28, 17, 40]), channels=st.sampled_from([1, 3]),
                     preprocess=st.booleans())


@QUIET_PIL
@FUZZ
@example(data=b"PK\x03\x04" + b"\0" * 40, suffix=".npy", size=28, channels=1, preprocess=False)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".png", ".jpg", ".npy", ".bin", ""]),
       **image_options)
def test_load_image_on_random_bytes(data: bytes, suffix: str, size: int, channels: int,
                                    preprocess: bool) -> None:
    check_load_image(data, suffix, size, channels, preprocess)


def png_chunks(data: bytes) -> list[list]:
    """[type, payload] of each chunk of a PNG file."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append([kind, data[at + 8:at + 8 + length]])
        at += 12 + length
    return chunks


def png_from_chunks(chunks: list[list]) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, payload in chunks:
        out += struct.pack(">I", len(payload)) + kind + payload + struct.pack(
            ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    return out


MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I"]
FORMATS = ["PNG", "BMP", "GIF", "TIFF", "JPEG"]
NOT_STORABLE = {("RGBA", "JPEG"), ("LA", "BMP"), ("LA", "JPEG"), ("P", "JPEG"), ("I;16", "BMP"),
                ("I;16", "JPEG"), ("I", "PNG"), ("I", "BMP"), ("I", "JPEG")}
# PNG, the format the mutations understand, twice as often as each other format
MODE_FORMATS = [(m, f) for m in MODES for f in FORMATS + ["PNG"] if (m, f) not in NOT_STORABLE]

png_mutations = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    # changes that keep every chunk's CRC right, so the decoder itself meets them
    # (IHDR: the low byte of width or height, depth, colour type, methods; large sizes
    # are legal images that just take long to decode, see test_load_image_size_limit)
    st.tuples(st.just("ihdr"), st.sampled_from([3, 7, 8, 9, 10, 11, 12]), st.integers(0, 255)),
    st.tuples(st.just("chunk"), st.integers(0, 20), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("drop_chunk"), st.integers(0, 20)),
)


def mutate_png(data: bytes, mutation: tuple) -> bytes:
    kind, *args = mutation
    if kind == "truncate":
        return data[:args[0] % (len(data) + 1)]
    if kind == "flip":
        buf = bytearray(data)
        if buf:
            buf[args[0] % len(buf)] ^= 1 << args[1]
        return bytes(buf)
    chunks = png_chunks(data)
    if not chunks:
        return data
    if kind == "ihdr" and args[0] < len(chunks[0][1]):
        payload = bytearray(chunks[0][1])
        payload[args[0]] = args[1]
        chunks[0][1] = bytes(payload)
    elif kind == "chunk" and len(chunks) > 1:
        target = chunks[1 + args[0] % (len(chunks) - 1)]  # any chunk after IHDR
        if target[1]:
            payload = bytearray(target[1])
            payload[args[1] % len(payload)] = args[2]
            target[1] = bytes(payload)
    elif kind == "drop_chunk":
        del chunks[args[0] % len(chunks)]
    return png_from_chunks(chunks) if kind != "none" else data


@QUIET_PIL
@FUZZ
@given(height=st.integers(1, 20), width=st.integers(1, 20), seed=st.integers(0, 2 ** 32 - 1),
       mode_format=st.sampled_from(MODE_FORMATS),
       mutation_list=st.lists(png_mutations, min_size=1, max_size=2), **image_options)
def test_load_image_on_mutated_images(height: int, width: int, seed: int, mode_format: tuple,
                                      mutation_list: list, size: int, channels: int,
                                      preprocess: bool) -> None:
    mode, fmt = mode_format
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
    pixels[rng.random((height, width)) < rng.random()] = 0  # some background
    if mode == "RGBA":
        alpha = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
        image = Image.fromarray(np.stack([pixels, pixels[::-1], 255 - pixels, alpha], -1))
    elif mode == "RGB":
        image = Image.fromarray(np.stack([pixels, 255 - pixels, pixels // 2], -1))
    elif mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)  # 16-bit grey
    elif mode == "I":
        image = Image.fromarray(pixels.astype(np.int32) * 1000)  # 32-bit grey (TIFF only)
    else:
        image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    if fmt == "PNG":
        for mutation in mutation_list:
            data = mutate_png(data, mutation)
    else:
        for mutation in mutation_list:
            if mutation[0] in ("truncate", "flip"):
                data = mutate_png(data, mutation)
    out = check_load_image(data, "." + fmt.lower(), size, channels, preprocess)
    unmutated = all(m == ("none",) for m in mutation_list) or fmt != "PNG" and not any(
        m[0] in ("truncate", "flip") for m in mutation_list)
    if unmutated and not preprocess:
        assert out is not None, "a valid image was refused"  # preprocess may call it blank


NPY_DTYPES = ["u1", "i2", "<i4", "i8", "u2", "f2", "f4", "f8", ">f8", "?", "c8"]
SPECIAL = [math.nan, math.inf, -math.inf, -1.0, 1.5, 255.0, 256.0, 1e300, -0.0]


def make_array(dtype: str, shape: tuple, seed: int, scale: str, special: float | None
               ) -> np.ndarray:
    """A random array of ``dtype`` and ``shape``: pixel-like values in 0..1 or 0..255, or
    anything, with ``special`` written at one random place."""
    rng = np.random.default_rng(seed)
    values = {"unit": rng.random(shape), "byte": rng.integers(0, 256, shape).astype(float),
              "wild": rng.normal(0, 1e4, shape)}[scale]
    with np.errstate(all="ignore"):
        array = values.astype(dtype)
        if special is not None and array.size:
            array.flat[int(rng.integers(array.size))] = np.array(special).astype(dtype)
    return array


@QUIET_PIL
@FUZZ
@given(dtype=st.sampled_from(NPY_DTYPES),
       shape=st.one_of(  # image-like shapes (H x W, H x W x C, C x H x W) and any others
           st.tuples(st.integers(1, 30), st.integers(1, 30)),
           st.tuples(st.integers(1, 20), st.integers(1, 20), st.sampled_from([1, 3, 4])),
           st.tuples(st.sampled_from([1, 3, 4]), st.integers(1, 20), st.integers(1, 20)),
           hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)),
       seed=st.integers(0, 2 ** 32 - 1), scale=st.sampled_from(["unit", "byte", "byte", "wild"]),
       special=st.one_of(st.none(), st.sampled_from(SPECIAL)),
       header_change=st.one_of(st.none(), st.tuples(st.integers(0, 127), st.integers(0, 255))),
       cut=st.one_of(st.none(), st.integers(0, 4000)), **image_options)
@example(dtype="u1", shape=(), seed=0, scale="byte", special=None,  # header no longer parses
         header_change=(25, ord("{")), cut=None, size=28, channels=1, preprocess=False)
@example(dtype="u1", shape=(28, 28), seed=0, scale="byte", special=None,  # {b'descr': ...}:
         header_change=(26, ord("b")), cut=None, size=28, channels=1, preprocess=False)  # TypeError
def test_load_image_on_npy_arrays(dtype: str, shape: tuple, seed: int, scale: str,
                                  special: float | None, header_change: tuple | None,
                                  cut: int | None, size: int, channels: int,
                                  preprocess: bool) -> None:
    array = make_array(dtype, shape, seed, scale, special)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = bytearray(buffer.getvalue())
    if header_change is not None:
        data[header_change[0] % len(data)] = header_change[1]
    if cut is not None:
        data = data[:cut]
    out = check_load_image(bytes(data), ".npy", size, channels, preprocess)
    if header_change is None and cut is None:
        with np.errstate(invalid="ignore", over="ignore"):
            finite = array.dtype.kind != "c" and np.isfinite(array.astype(np.float64)).all()
        if not finite:
            assert out is None, "NaN or infinite pixels were accepted"
        if (array.dtype == np.uint8 and array.ndim == 2 and min(array.shape) >= 1
                and not preprocess):
            assert out is not None, f"a valid uint8 image {array.shape} was refused"


def npy_with_header(header: dict, body: bytes = b"\0" * 16) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=np.zeros((28, 28), np.uint8))
    return buffer.getvalue()


NPY_EDGE_CASES = {
    # the header's Python literal does not parse (np.load raises tokenize.TokenError)
    "unclosed-header": npy_with_header({"descr": "|u1", "fortran_order": False, "shape": (2, 2)}
                                       ).replace(b"'descr': '|u1',", b"'descr': '|u1'{", 1),
    # shape of 2**60 pixels: np.load raises MemoryError
    "huge-shape": npy_with_header({"descr": "|u1", "fortran_order": False, "shape": (2 ** 30, 2 ** 30)}),
    # a side beyond any C integer: np.load raises OverflowError
    "overflowing-shape": npy_with_header({"descr": "|u1", "fortran_order": False,
                                          "shape": (99999999999999999999999, 0)}),
    # a dict key that is bytes: numpy's header check compares bytes with str (TypeError)
    "bytes-key": npy_with_header({"descr": "|u1", "fortran_order": False, "shape": (2, 2)}
                                 ).replace(b"{'descr'", b"{b'descr'", 1),
    # a .npz archive, or any zip, named .npy: np.load returns an NpzFile or raises BadZipFile
    "npz-named-npy": npz_bytes(),
    "zip-garbage-named-npy": b"PK\x03\x04" + b"\0" * 40,
}


@pytest.mark.parametrize("name", list(NPY_EDGE_CASES))
def test_load_image_npy_edge_cases(name: str) -> None:
    path = WORK / f"{name}.npy"
    path.write_bytes(NPY_EDGE_CASES[name])
    with pytest.raises(CapsNetError, match=f"^{path}: "):
        load_image(path)


def test_load_image_size_limit() -> None:
    """A few bytes of PNG declaring 2**31 x 2**31 pixels are refused before any allocation."""
    chunks = png_chunks(_png(np.zeros((4, 4), np.uint8)))
    ihdr = bytearray(chunks[0][1])
    ihdr[0:8] = (2 ** 31 - 1).to_bytes(4, "big") * 2
    chunks[0][1] = bytes(ihdr)
    path = WORK / "bomb.png"
    path.write_bytes(png_from_chunks(chunks))
    with pytest.raises(CapsNetError, match="too large|corrupt"):
        load_image(path)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
