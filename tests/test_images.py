"""capsnet.utils.images.load_image: MNIST-style preprocessing, formats, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from capsnet.errors import CapsNetError
from capsnet.utils.images import load_image

INK = 0.2  # pixels above this count as ink in the checks below


def draw_seven(width: int = 120, height: int = 160, ink: int = 20, paper: int = 235,
               offset: tuple[int, int] = (10, 25), stroke: int = 9) -> Image.Image:
    """A "7" drawn with dark ink on light paper, off-centre in a larger grayscale image."""
    image = Image.new("L", (width, height), paper)
    x, y = offset
    draw = ImageDraw.Draw(image)
    draw.line([(x, y), (x + 70, y), (x + 30, y + 100)], fill=ink, width=stroke, joint="curve")
    return image


def centre_of_mass(plane: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(plane.shape)
    mass = plane.sum()
    return float((rows * plane).sum() / mass), float((cols * plane).sum() / mass)


def ink_box(plane: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of the pixels above INK."""
    rows, cols = np.nonzero(plane > INK)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# -- preprocessing ----------------------------------------------------------------------


def test_dark_on_light_digit_is_inverted_cropped_scaled_and_centred(tmp_path: Path) -> None:
    out = load_image(save(draw_seven(), tmp_path / "seven.png"))
    assert out.shape == (1, 28, 28) and out.dtype == np.float32
    plane = out[0]
    assert plane.min() == 0.0 and plane.max() == pytest.approx(1.0, abs=0.02)
    # inverted: the background (corners, border) is black, the ink bright
    assert plane[[0, 0, -1, -1], [0, -1, 0, -1]].max() == 0.0
    assert np.abs(np.concatenate([plane[0], plane[-1], plane[:, 0], plane[:, -1]])).max() == 0.0
    # scaled: the longer side (the 7's height) is 20 pixels, the aspect ratio kept
    height, width = ink_box(plane)
    assert height == 20 and 12 <= width <= 17  # drawn 100+9 tall, 70+9 wide
    # centred by mass, to the pixel: (27 / 2) on both axes
    row, col = centre_of_mass(plane)
    assert abs(row - 13.5) <= 0.5 and abs(col - 13.5) <= 0.5


def test_light_on_dark_digit_gives_the_same_result(tmp_path: Path) -> None:
    dark = load_image(save(draw_seven(), tmp_path / "dark.png"))
    light = load_image(save(draw_seven(ink=235, paper=20), tmp_path / "light.png"))
    np.testing.assert_allclose(dark, light, atol=1e-5)


def test_position_and_scale_of_the_input_do_not_matter(tmp_path: Path) -> None:
    small = draw_seven(offset=(10, 25)).resize((60, 80), Image.Resampling.LANCZOS)
    big = draw_seven(width=400, height=300, offset=(250, 150), stroke=9).resize(
        (800, 600), Image.Resampling.LANCZOS)
    a = load_image(save(small, tmp_path / "small.png"))[0]
    b = load_image(save(big, tmp_path / "big.png"))[0]
    assert ink_box(a)[0] == ink_box(b)[0] == 20
    for plane in (a, b):
        row, col = centre_of_mass(plane)
        assert abs(row - 13.5) <= 0.5 and abs(col - 13.5) <= 0.5


def test_centring_uses_the_centre_of_mass_not_the_box(tmp_path: Path) -> None:
    """A "b"-like shape, heavy at the bottom: its centre of mass lies about 3.5 pixels
    below its box's centre, so centring by mass puts the box high, as MNIST's does."""
    image = Image.new("L", (100, 100), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 19, 89], fill=255)  # stem, 10 x 80
    draw.rectangle([20, 70, 49, 89], fill=255)  # bowl, 30 x 20
    plane = load_image(save(image, tmp_path / "b.png"))[0]
    row, col = centre_of_mass(plane)
    assert abs(row - 13.5) <= 0.5 and abs(col - 13.5) <= 0.5
    rows, _ = np.nonzero(plane > INK)
    assert ink_box(plane)[0] == 20 and (rows.min() + rows.max()) / 2 < 11


def test_very_lopsided_shapes_are_moved_only_as_far_as_keeps_all_ink(tmp_path: Path) -> None:
    image = Image.new("L", (100, 100), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 14, 89], fill=255)  # thin stem
    draw.rectangle([10, 70, 89, 89], fill=255)  # very heavy foot: mass centre near the bottom
    plane = load_image(save(image, tmp_path / "ell.png"))[0]
    rows, _ = np.nonzero(plane > INK)
    assert ink_box(plane)[0] == 20 and rows.min() == 0  # the stem's top is kept, at the edge
    assert centre_of_mass(plane)[0] > 13.5  # as close to the centre as that allows


def test_tall_thin_digit_keeps_its_aspect_ratio(tmp_path: Path) -> None:
    image = Image.new("L", (50, 200), 255)
    ImageDraw.Draw(image).rectangle([20, 20, 29, 179], fill=0)  # a "1": 10 x 160
    plane = load_image(save(image, tmp_path / "one.png"))[0]
    height, width = ink_box(plane)
    assert height == 20 and width <= 3


def test_other_sizes_scale_the_20_of_28_box(tmp_path: Path) -> None:
    out = load_image(save(draw_seven(), tmp_path / "seven.png"), size=40)
    assert out.shape == (1, 40, 40)
    assert ink_box(out[0])[0] == round(40 * 20 / 28)
    row, col = centre_of_mass(out[0])
    assert abs(row - 19.5) <= 0.5 and abs(col - 19.5) <= 0.5


def test_jpeg_rgb_and_transparent_png_match_the_grayscale_png(tmp_path: Path) -> None:
    seven = draw_seven()
    reference = load_image(save(seven, tmp_path / "seven.png"))
    rgb = load_image(save(seven.convert("RGB"), tmp_path / "seven_rgb.png"))
    np.testing.assert_allclose(rgb, reference, atol=1e-5)
    jpeg = load_image(save(seven.convert("RGB"), tmp_path / "seven.jpg"))
    assert np.abs(jpeg - reference).mean() < 0.02 and ink_box(jpeg[0])[0] == 20
    # black strokes on a transparent layer: the transparent part counts as paper
    layer = Image.new("RGBA", seven.size, (0, 0, 0, 0))
    layer.putalpha(Image.eval(seven, lambda v: 255 - v))
    transparent = load_image(save(layer, tmp_path / "seven_rgba.png"))
    np.testing.assert_allclose(transparent, reference, atol=0.02)


def test_no_preprocess_only_resizes(tmp_path: Path) -> None:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[2:6, 3:25] = 200  # off-centre bar, dark background
    out = load_image(save(Image.fromarray(pixels), tmp_path / "bar.png"), preprocess=False)
    np.testing.assert_array_equal(out[0], pixels.astype(np.float32) / 255)
    # a light image stays light (no inversion) and is squeezed to the size
    light = load_image(save(draw_seven(), tmp_path / "seven.png"), preprocess=False)
    assert light.shape == (1, 28, 28) and light[0, 0, 0] == pytest.approx(235 / 255, abs=0.01)
    big = np.kron(pixels, np.ones((3, 3), dtype=np.uint8))  # 84x84, same picture
    down = load_image(save(Image.fromarray(big), tmp_path / "big.png"), preprocess=False)
    assert np.abs(down[0] - pixels / 255).max() < 0.1


def test_three_channel_models_get_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 100, 250
    out = load_image(save(Image.fromarray(rgb), tmp_path / "rgb.png"), size=10, channels=3)
    assert out.shape == (3, 10, 10)
    np.testing.assert_allclose(out[:, 4, 4], [10 / 255, 100 / 255, 250 / 255], atol=1e-6)
    gray = load_image(save(draw_seven(), tmp_path / "seven.png"), channels=3)
    assert gray.shape == (3, 28, 28) and np.array_equal(gray[0], gray[2])


# -- .npy arrays ------------------------------------------------------------------------


def seven_array() -> np.ndarray:
    return np.asarray(draw_seven(), dtype=np.uint8)


@pytest.mark.parametrize("make", [
    pytest.param(lambda a: a, id="HxW-uint8"),
    pytest.param(lambda a: a.astype(np.float32) / 255, id="HxW-float32"),
    pytest.param(lambda a: (a / 255.0)[:, :, None], id="HxWx1-float64"),
    pytest.param(lambda a: a[None], id="1xHxW-uint8"),
    pytest.param(lambda a: np.stack([a] * 3, axis=-1), id="HxWx3-uint8"),
    pytest.param(lambda a: np.stack([a] * 3).astype(np.float32) / 255, id="3xHxW-float32"),
    pytest.param(lambda a: a.astype(np.int64), id="HxW-int64"),
])
def test_npy_arrays_match_the_png(tmp_path: Path, make) -> None:
    reference = load_image(save(draw_seven(), tmp_path / "seven.png"))
    path = tmp_path / "seven.npy"
    np.save(path, make(seven_array()))
    np.testing.assert_allclose(load_image(path), reference, atol=1e-5)


def test_npy_without_preprocessing_is_the_array(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", pixels)
    out = load_image(tmp_path / "raw.npy", preprocess=False)
    np.testing.assert_array_equal(out[0], pixels.astype(np.float32) / 255)


# -- bad inputs -------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_npy(array: np.ndarray):
    return lambda path: np.save(path, array)


def nan_image() -> np.ndarray:
    a = seven_array().astype(np.float32) / 255
    a[3, 3] = np.nan
    return a


def inf_image() -> np.ndarray:
    a = seven_array().astype(np.float64) / 255
    a[3, 3] = np.inf
    return a


BAD_INPUTS = {
    "missing.png": (None, "no such file"),
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "text.png": (lambda p: p.write_text("not an image at all\n"), "not an image"),
    "random.jpg": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(500)), "not an image"),
    "truncated.png": (lambda p: p.write_bytes(png_bytes(draw_seven())[:300]), "truncated"),
    "white.png": (lambda p: draw_seven(ink=235).save(p), "blank"),
    "black.png": (lambda p: Image.new("L", (40, 40), 0).save(p), "blank"),
    "nearly_blank.png": (lambda p: Image.new("L", (40, 40), 128).save(p), "blank"),
    "empty.npy": (lambda p: p.write_bytes(b""), "empty file"),
    "garbage.npy": (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), ".npy"),
    "pickled.npy": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), ".npy"),
    "ndim1.npy": (write_npy(np.zeros(784, dtype=np.uint8)), "shape (784,)"),
    "ndim4.npy": (write_npy(np.zeros((1, 1, 28, 28), dtype=np.uint8)), "shape (1, 1, 28, 28)"),
    "channels7.npy": (write_npy(np.zeros((28, 28, 7), dtype=np.uint8)), "shape (28, 28, 7)"),
    "no_pixels.npy": (write_npy(np.zeros((0, 28), dtype=np.uint8)), "no pixels"),
    "strings.npy": (write_npy(np.array([["a", "b"], ["c", "d"]])), "not an image"),
    "complex.npy": (write_npy(np.ones((28, 28), dtype=np.complex64)), "not an image"),
    "nan.npy": (write_npy(nan_image()), "NaN"),
    "inf.npy": (write_npy(inf_image()), "infinite"),
    "float_above_1.npy": (write_npy(seven_array().astype(np.float32)), "[0, 1]"),
    "float_negative.npy": (write_npy(seven_array() / 255.0 - 0.5), "[0, 1]"),
    "int_above_255.npy": (write_npy(seven_array().astype(np.int32) * 2), "0..255"),
    "int_negative.npy": (write_npy(seven_array().astype(np.int16) - 100), "0..255"),
    "blank.npy": (write_npy(np.full((28, 28), 0.5, dtype=np.float32)), "blank"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    make, fragment = BAD_INPUTS[name]
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(CapsNetError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_a_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(CapsNetError, match="not a file"):
        load_image(tmp_path)


def test_blank_is_fine_without_preprocessing(tmp_path: Path) -> None:
    """Only the MNIST normalisation needs ink; a plain resize takes a blank image as it is."""
    Image.new("L", (40, 40), 0).save(tmp_path / "black.png")
    assert load_image(tmp_path / "black.png", preprocess=False).max() == 0.0


def test_too_many_channels_for_the_model(tmp_path: Path) -> None:
    np.save(tmp_path / "rgb.npy", np.zeros((28, 28, 3), dtype=np.uint8))
    with pytest.raises(CapsNetError, match="3 channels; the model takes 2"):
        load_image(tmp_path / "rgb.npy", channels=2)


def test_huge_images_are_refused_before_decoding(tmp_path: Path) -> None:
    from capsnet.utils.images import MAX_IMAGE_PIXELS

    path = tmp_path / "huge.png"
    Image.new("L", (4097, 4096)).save(path)  # one column over the limit
    assert 4097 * 4096 > MAX_IMAGE_PIXELS
    with pytest.raises(CapsNetError, match="too large"):
        load_image(path)
    Image.new("L", (4096, 4096), 255).save(path)  # at the limit: decoded (and found blank)
    with pytest.raises(CapsNetError) as error:
        load_image(path)
    assert "too large" not in str(error.value)
