"""Photos of handwritten digits for testing how ``capsnet predict`` prepares your images.

    python scripts/make_photos.py                               # both sets, seed 0
    python scripts/make_photos.py --figure docs/figures/photos.png

Every digit is a handwritten digit of the MNIST test set (never a training image), enlarged
smoothly and laid on synthetic paper as ink. Two sets, each with a ``labels.json``:

* ``tests/data/photos``: hard photos, ten of each kind in :data:`PHOTO_KINDS` (one per class),
  JPEG files named ``<kind>-<nn>-label<class>.jpg``: ruled and squared paper, a shadow across
  half the page, a frame around the digit, sensor noise with heavy JPEG compression, low
  resolution, rotation, uneven light, a small digit far from the centre of a large page;
  With them ``twin-digits.png``: ten more test digits (0 to 9, side by side) from which
  :func:`twins` draws the same page with and without each effect, for comparisons;
* ``tests/data/drawn``: easier drawings in many styles (:data:`DRAWN_STYLES`), named
  ``<style>-<nn>-label<class>.<png|jpg>``: thick and thin strokes, white on black, off-centre,
  a transparent PNG, coloured ink, a large 3000x2000 JPEG.

The same seed writes the same files. ``--figure`` draws, for each hard kind, a photo, what the
shipped model sees after preparation (28x28) and its answer with the capsule's length.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "data" / "photos"
DRAWN = REPO / "tests" / "data" / "drawn"
TWIN_DIGITS = "twin-digits.png"  # in PHOTOS: MNIST test digits 0 to 9 side by side (28x280)

# Ink as the fraction of each colour of light it lets through (R, G, B).
INKS = {"blue pen": (0.2, 0.3, 0.65), "black pen": (0.1, 0.1, 0.12),
        "pencil": (0.42, 0.42, 0.45), "red": (0.85, 0.15, 0.15), "green": (0.15, 0.6, 0.2),
        "violet": (0.5, 0.2, 0.7)}
PHOTO_INKS = ("blue pen", "black pen", "pencil")
RULE_BLUE = (0.6, 0.75, 0.95)
MARGIN_RED = (0.95, 0.55, 0.55)
GRID_GREY = (0.7, 0.76, 0.85)
SUPERSAMPLE = 4  # lines are drawn this many times larger, then reduced: smooth edges

Rng = np.random.Generator
Page = np.ndarray  # (height, width, 3) float in [0, 1]


# -- MNIST test digits ------------------------------------------------------------------

def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test images (10000, 28, 28) uint8 and labels, fetched once and verified."""
    sys.path.insert(0, str(REPO / "src"))
    from capsnet.data import acquire

    data = acquire("mnist")
    return data["test_images"], data["test_labels"]


def pick_digits(labels: np.ndarray, per_class: int, rng: Rng, taken: set[int]) -> list[int]:
    """``per_class`` test indices of each class, none of them in ``taken`` (then added to it),
    ordered 0, 1, ..., 9, 0, 1, ... so that every run of ten holds every class."""
    chosen = []
    for label in range(10):
        free = [int(i) for i in np.flatnonzero(labels == label) if int(i) not in taken]
        picks = [free[k] for k in rng.choice(len(free), per_class, replace=False)]
        taken.update(picks)
        chosen.append(picks)
    return [chosen[label][n] for n in range(per_class) for label in range(10)]


# -- ink --------------------------------------------------------------------------------

def ink_alpha(digit: np.ndarray, height: float, angle: float = 0.0, weight: float = 0.0
              ) -> np.ndarray:
    """How much ink covers each pixel of a ``digit`` (28x28, 0-255) enlarged so that it is
    about ``height`` pixels tall (MNIST's digits are 20 of 28), rotated by ``angle`` degrees.
    ``weight`` thickens (> 0) or thins (< 0) the strokes: a sharper pen edge than MNIST's blur."""
    side = max(8, round(28 * height / 20))
    image = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    if angle:
        image = image.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    level = np.asarray(image, dtype=np.float64) / 255.0
    edge = float(np.clip(0.35 - 0.3 * weight, 0.08, 0.85))  # where the stroke's edge lies
    ramp = min(0.2, 2 * edge)  # no ink at all where MNIST has none
    return smoothstep((level - edge) / ramp + 0.5)


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def lay_ink(page: Page, alpha: np.ndarray, centre: tuple[float, float], ink: str,
            rng: Rng) -> Page:
    """``page`` with ``alpha`` (ink coverage) laid on at ``centre`` (row, column) in ``ink``;
    pencil is grainy, so its coverage varies from place to place."""
    if ink == "pencil":
        grain = ndimage.gaussian_filter(rng.random(alpha.shape), 1.0)
        alpha = alpha * np.clip(0.85 + 1.5 * (grain - 0.5), 0.4, 1.0)
    layer = np.zeros(page.shape[:2])
    top = round(centre[0] - alpha.shape[0] / 2)
    left = round(centre[1] - alpha.shape[1] / 2)
    paste(layer, alpha, top, left)
    return page * (1.0 - layer[:, :, None] * (1.0 - np.array(INKS[ink])))


def paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """``canvas[top:, left:] = max(canvas, patch)`` for the part of ``patch`` inside it."""
    rows = slice(max(top, 0), min(top + patch.shape[0], canvas.shape[0]))
    cols = slice(max(left, 0), min(left + patch.shape[1], canvas.shape[1]))
    inner = patch[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
    canvas[rows, cols] = np.maximum(canvas[rows, cols], inner)


def random_ink(rng: Rng) -> str:
    return str(rng.choice(PHOTO_INKS))


# -- paper and lines --------------------------------------------------------------------

def paper(width: int, height: int, rng: Rng, tint: tuple[float, float, float] | None = None,
          fibre: float = 0.03) -> Page:
    """Off-white paper with a faint fibrous texture of strength ``fibre``."""
    colour = np.array(tint) if tint else rng.uniform(0.9, 0.97) + rng.uniform(-0.02, 0.02, 3)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 2.0) * fibre
    return np.clip(colour * (1 + texture[:, :, None]), 0, 1)


def lines_alpha(width: int, height: int, segments: list[tuple], thickness: float) -> np.ndarray:
    """Coverage of straight lines ``(x0, y0, x1, y1)`` of ``thickness`` pixels, anti-aliased."""
    scale = SUPERSAMPLE
    image = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in segments:
        draw.line([(x0 * scale, y0 * scale), (x1 * scale, y1 * scale)], fill=255,
                  width=max(1, round(thickness * scale)))
    small = image.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def tilted(x0: float, y0: float, x1: float, y1: float, degrees: float, centre: tuple
           ) -> tuple[float, float, float, float]:
    """The segment rotated by ``degrees`` about ``centre`` (x, y): paper never lies square."""
    turn = math.radians(degrees)
    cx, cy = centre

    def rotate(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return (cx + dx * math.cos(turn) - dy * math.sin(turn),
                cy + dx * math.sin(turn) + dy * math.cos(turn))

    return (*rotate(x0, y0), *rotate(x1, y1))


def draw_lines(page: Page, segments: list[tuple], thickness: float, colour: tuple) -> Page:
    alpha = lines_alpha(page.shape[1], page.shape[0], segments, thickness)
    return page * (1.0 - alpha[:, :, None] * (1.0 - np.array(colour)))


def ruled(page: Page, spacing: float, rng: Rng, margin: bool) -> Page:
    """Ruled notebook paper: blue lines every ``spacing`` pixels, a red margin if asked."""
    height, width = page.shape[:2]
    angle, centre = rng.uniform(-0.8, 0.8), (width / 2, height / 2)
    first = rng.uniform(0, spacing)
    rows = np.arange(first - height, 2 * height, spacing)
    segments = [tilted(-width, y, 2 * width, y, angle, centre) for y in rows]
    page = draw_lines(page, segments, rng.uniform(1.0, 2.0), RULE_BLUE)
    if margin:
        x = width * rng.uniform(0.08, 0.18)
        page = draw_lines(page, [tilted(x, -height, x, 2 * height, angle, centre)],
                          rng.uniform(1.0, 2.0), MARGIN_RED)
    return page


def squared(page: Page, spacing: float, rng: Rng) -> Page:
    """Squared (graph) paper: a grid of thin grey-blue lines every ``spacing`` pixels."""
    height, width = page.shape[:2]
    angle, centre = rng.uniform(-0.8, 0.8), (width / 2, height / 2)
    side = max(width, height)
    offsets = np.arange(-2 * side, 3 * side, spacing) + rng.uniform(0, spacing)
    segments = [tilted(-width, y, 2 * width, y, angle, centre) for y in offsets]
    segments += [tilted(x, -height, x, 2 * height, angle, centre) for x in offsets]
    return draw_lines(page, segments, rng.uniform(0.8, 1.6), GRID_GREY)


def framed(page: Page, box: tuple[float, float, float, float], thickness: float, ink: str,
           rng: Rng) -> Page:
    """A rectangle ``(left, top, right, bottom)`` drawn around the digit, corners overshooting
    a little as a hand with a ruler does."""
    left, top, right, bottom = box
    angle, centre = rng.uniform(-0.8, 0.8), ((left + right) / 2, (top + bottom) / 2)
    over = rng.uniform(0, 0.04, 8) * (right - left)
    sides = [(left - over[0], top, right + over[1], top),
             (left - over[2], bottom, right + over[3], bottom),
             (left, top - over[4], left, bottom + over[5]),
             (right, top - over[6], right, bottom + over[7])]
    return draw_lines(page, [tilted(*s, angle, centre) for s in sides], thickness, INKS[ink])


# -- light, camera, file ----------------------------------------------------------------

def half_shadow(page: Page, rng: Rng, hard: bool) -> Page:
    """A shadow over about half the page, its edge a straight line near the centre: sharp
    (an object in front of a lamp) or a wide soft gradient."""
    height, width = page.shape[:2]
    rows, cols = np.indices((height, width), dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    cy, cx = height * rng.uniform(0.35, 0.65), width * rng.uniform(0.35, 0.65)
    distance = (cols - cx) * math.cos(angle) + (rows - cy) * math.sin(angle)
    blur = rng.uniform(0.5, 2.0) if hard else max(width, height) * rng.uniform(0.08, 0.2)
    shade = 1 / (1 + np.exp(-distance / blur))  # 0 in the light, 1 in the shadow
    depth = rng.uniform(0.4, 0.65)  # light left in the shadow
    factor = 1 - shade[:, :, None] * (1 - depth * np.array([0.96, 0.98, 1.0]))
    return page * factor


def uneven_light(page: Page, rng: Rng) -> Page:
    """A lamp to one side: light falling off across the page, darker corners, warm colour."""
    height, width = page.shape[:2]
    rows, cols = np.indices((height, width), dtype=np.float64)
    y, x = rows / height - 0.5, cols / width - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    slope = x * math.cos(angle) + y * math.sin(angle)  # -0.7 .. 0.7
    light = 1 - rng.uniform(0.35, 0.55) * (slope + 0.7) / 1.4
    light *= 1 - rng.uniform(0.2, 0.4) * (x ** 2 + y ** 2) * 2
    warm = np.array([1.0, rng.uniform(0.88, 0.95), rng.uniform(0.7, 0.85)])
    return page * light[:, :, None] * warm


def defocus(page: Page, sigma: float) -> Page:
    return ndimage.gaussian_filter(page, (sigma, sigma, 0))


def sensor_noise(page: Page, sigma: float, rng: Rng) -> Page:
    """Grain of a small camera sensor: mostly in brightness, some in colour."""
    grain = rng.normal(0, sigma, page.shape[:2])[:, :, None]
    colour = rng.normal(0, sigma / 3, page.shape)
    return np.clip(page + grain + colour, 0, 1)


def shrink(page: Page, factor: int) -> Page:
    """The page ``factor`` times smaller, each pixel the mean of the ones it covers."""
    height, width = (page.shape[0] // factor) * factor, (page.shape[1] // factor) * factor
    cut = page[:height, :width]
    return cut.reshape(height // factor, factor, width // factor, factor, 3).mean(axis=(1, 3))


def to_image(page: Page) -> Image.Image:
    return Image.fromarray(np.round(np.clip(page, 0, 1) * 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -- hard photos ------------------------------------------------------------------------

def centred_page(digit: np.ndarray, rng: Rng, size: tuple[int, int] = (200, 280),
                 height: tuple[int, int] = (70, 110), spread: float = 0.12
                 ) -> tuple[Page, np.ndarray, tuple[float, float], str, float]:
    """Plain paper, the digit's ink coverage, its place near the centre, the ink, its height."""
    width, page_height = int(rng.integers(*size)), int(rng.integers(*size))
    digit_height = float(rng.uniform(*height))
    centre = (page_height * (0.5 + rng.uniform(-spread, spread)),
              width * (0.5 + rng.uniform(-spread, spread)))
    return (paper(width, page_height, rng), ink_alpha(digit, digit_height), centre,
            random_ink(rng), digit_height)


def photo_lined(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """On ruled notebook paper, the digit over one to two lines."""
    page, alpha, centre, ink, height = centred_page(digit, rng)
    page = ruled(page, height * rng.uniform(0.45, 0.9), rng, margin=bool(rng.random() < 0.5))
    return camera(lay_ink(page, alpha, centre, ink, rng), rng)


def photo_squared(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """On squared paper, two to four squares tall."""
    page, alpha, centre, ink, height = centred_page(digit, rng)
    page = squared(page, height * rng.uniform(0.25, 0.5), rng)
    return camera(lay_ink(page, alpha, centre, ink, rng), rng)


def photo_shadow(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Half the page in a shadow, sharp-edged or soft."""
    page, alpha, centre, ink, _ = centred_page(digit, rng)
    page = lay_ink(page, alpha, centre, ink, rng)
    return camera(half_shadow(page, rng, hard=bool(rng.random() < 0.5)), rng)


def photo_frame(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """In a box printed on a form or drawn with the pen, 1.6 to 1.9 times the digit's height."""
    page, alpha, centre, ink, height = centred_page(digit, rng, size=(220, 300),
                                                    height=(60, 95), spread=0.05)
    half = height * rng.uniform(0.8, 0.95)
    box = (centre[1] - half, centre[0] - half, centre[1] + half, centre[0] + half)
    printed = rng.random() < 0.5  # a box printed on a form, or one drawn with the pen
    thickness = rng.uniform(1.0, 2.0) if printed else height * rng.uniform(0.05, 0.09)
    page = framed(page, box, thickness, "black pen" if printed else ink, rng)
    return camera(lay_ink(page, alpha, centre, ink, rng), rng)


def photo_noisy(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Dim, out of focus, grainy, and saved as JPEG of quality 40 to 70."""
    page, alpha, centre, ink, _ = centred_page(digit, rng)
    page = defocus(lay_ink(page, alpha, centre, ink, rng), rng.uniform(0.6, 1.2))
    page = sensor_noise(page * rng.uniform(0.75, 0.95), rng.uniform(0.05, 0.08), rng)
    return to_image(page), int(rng.integers(40, 71))


def photo_lowres(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Taken from afar: the digit 12 to 20 pixels tall on a page of 80 to 110."""
    factor = SUPERSAMPLE
    page, alpha, centre, ink, _ = centred_page(
        digit, rng, size=(80 * factor, 110 * factor), height=(12 * factor, 20 * factor))
    page = shrink(lay_ink(page, alpha, centre, ink, rng), factor)
    return to_image(sensor_noise(page, rng.uniform(0.01, 0.025), rng)), int(rng.integers(60, 81))


def photo_rotated(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Written at a slant: turned by 8 to 20 degrees either way."""
    page, _, centre, ink, height = centred_page(digit, rng)
    angle = rng.uniform(8, 20) * rng.choice([-1, 1])
    return camera(lay_ink(page, ink_alpha(digit, height, angle), centre, ink, rng), rng)


def photo_lighting(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Under a warm lamp to one side: light falling off across the page."""
    page, alpha, centre, ink, _ = centred_page(digit, rng)
    return camera(uneven_light(lay_ink(page, alpha, centre, ink, rng), rng), rng)


def photo_small(digit: np.ndarray, rng: Rng) -> tuple[Image.Image, int]:
    """Small (28 to 45 pixels) near a corner of a large page."""
    width, height = int(rng.integers(320, 401)), int(rng.integers(300, 401))
    digit_height = rng.uniform(28, 45)
    centre = tuple(side * (rng.uniform(0.15, 0.3) if rng.random() < 0.5
                           else rng.uniform(0.7, 0.85)) for side in (height, width))
    page = lay_ink(paper(width, height, rng), ink_alpha(digit, digit_height), centre,
                   random_ink(rng), rng)
    return camera(page, rng)


def camera(page: Page, rng: Rng) -> tuple[Image.Image, int]:
    """What every photo goes through: a little blur and grain, then JPEG (its quality)."""
    page = sensor_noise(defocus(page, rng.uniform(0.4, 0.8)), rng.uniform(0.008, 0.02), rng)
    return to_image(page), int(rng.integers(70, 86))


PHOTO_KINDS: dict[str, Callable[[np.ndarray, Rng], tuple[Image.Image, int]]] = {
    "lined": photo_lined, "squared": photo_squared, "shadow": photo_shadow,
    "frame": photo_frame, "noisy": photo_noisy, "lowres": photo_lowres,
    "rotated": photo_rotated, "lighting": photo_lighting, "small": photo_small,
}


# -- twins: one page with and without each effect ---------------------------------------

TWIN_EFFECTS = ("lined", "squared", "frame", "shadow", "lighting")


def twins(digit: np.ndarray, seed: int) -> dict[str, Image.Image]:
    """The same digit on the same page in the same ink, photographed alike: ``plain``, and
    with each of :data:`TWIN_EFFECTS` alone (the shadow's edge runs through the digit)."""
    def fresh(n: int) -> Rng:
        return np.random.default_rng([seed, n])

    page, alpha, centre, ink, height = centred_page(digit, fresh(0), spread=0.05)
    half = height * 0.9
    box = (centre[1] - half, centre[0] - half, centre[1] + half, centre[0] + half)
    papers = {"plain": page, "lined": ruled(page, height * 0.6, fresh(1), margin=True),
              "squared": squared(page, height * 0.35, fresh(2)),
              "frame": framed(page, box, height * 0.06, ink, fresh(3))}
    inked = {kind: lay_ink(sheet, alpha, centre, ink, fresh(4)) for kind, sheet in papers.items()}
    inked["shadow"] = through_digit_shadow(inked["plain"], centre, fresh(5))
    inked["lighting"] = uneven_light(inked["plain"], fresh(6))
    return {kind: camera(sheet, fresh(7))[0] for kind, sheet in inked.items()}


def through_digit_shadow(page: Page, centre: tuple[float, float], rng: Rng) -> Page:
    """A hard shadow over half the page whose edge crosses the digit's centre."""
    height, width = page.shape[:2]
    rows, cols = np.indices((height, width), dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    distance = (cols - centre[1]) * math.cos(angle) + (rows - centre[0]) * math.sin(angle)
    shade = 1 / (1 + np.exp(-distance))
    return page * (1 - shade[:, :, None] * (1 - rng.uniform(0.4, 0.55)))


# -- easier drawings --------------------------------------------------------------------

Drawn = tuple[Image.Image, str]  # the image and its file's suffix


def drawing(digit: np.ndarray, rng: Rng, weight: float = 0.0, ink: str = "black pen",
            size: int = 180, tint: tuple[float, float, float] = (0.97, 0.97, 0.97),
            place: tuple[float, float] = (0.5, 0.5)) -> Page:
    """A clean drawing: the digit about half the image tall at ``place`` (fractions)."""
    page = paper(size, size, rng, tint, fibre=0.0)
    alpha = ink_alpha(digit, size * rng.uniform(0.45, 0.6), weight=weight)
    return lay_ink(page, alpha, (size * place[0], size * place[1]), ink, rng)


def drawn_thick(digit: np.ndarray, rng: Rng) -> Drawn:
    """A bold marker."""
    return to_image(drawing(digit, rng, weight=rng.uniform(0.8, 1.0))), "png"


def drawn_thin(digit: np.ndarray, rng: Rng) -> Drawn:
    """A fine pen."""
    return to_image(drawing(digit, rng, weight=rng.uniform(-0.8, -0.6))), "png"


def drawn_inverted(digit: np.ndarray, rng: Rng) -> Drawn:
    """Chalk-white strokes on black."""
    return to_image(1.0 - drawing(digit, rng, weight=0.3)), "png"


def drawn_offcentre(digit: np.ndarray, rng: Rng) -> Drawn:
    """In a corner of the image, partly cut off at times."""
    place = tuple(rng.choice([0.28, 0.72], 2))
    return to_image(drawing(digit, rng, size=260, place=place)), "png"


def drawn_transparent(digit: np.ndarray, rng: Rng) -> Drawn:
    """Black strokes on a transparent layer (RGBA), as drawing programs export them."""
    alpha = ink_alpha(digit, 100, weight=0.2)
    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[:, :, 3] = np.round(alpha * 255)
    return Image.fromarray(rgba), "png"


def drawn_coloured(digit: np.ndarray, rng: Rng) -> Drawn:
    """Red, green or violet ink on white or on a yellow note."""
    ink = str(rng.choice(["red", "green", "violet"]))
    tint = (1.0, 0.95, 0.55) if rng.random() < 0.5 else (0.97, 0.97, 0.97)
    return to_image(drawing(digit, rng, ink=ink, tint=tint, weight=0.3)), "png"


def drawn_large(digit: np.ndarray, rng: Rng) -> Drawn:
    """A 3000x2000 photo-sized drawing (grey JPEG, white paper: a small file)."""
    page = np.full((2000, 3000), 0.95)
    alpha = ink_alpha(digit, rng.uniform(700, 1100))
    layer = np.zeros_like(page)
    centre = rng.uniform(1100, 1900)
    paste(layer, alpha, round(1000 - alpha.shape[0] / 2), round(centre - alpha.shape[1] / 2))
    grey = Image.fromarray(np.round(page * (1 - 0.9 * layer) * 255).astype(np.uint8))
    return grey, "jpg"


DRAWN_STYLES: dict[str, Callable[[np.ndarray, Rng], Drawn]] = {
    "thick": drawn_thick, "thin": drawn_thin, "inverted": drawn_inverted,
    "offcentre": drawn_offcentre, "transparent": drawn_transparent,
    "coloured": drawn_coloured, "large": drawn_large,
}
LARGE_COUNT = 3  # photo-sized files are kept few: they are most of the set's bytes


# -- writing the sets -------------------------------------------------------------------

def write_set(folder: Path, makers: dict, digits: np.ndarray, labels: np.ndarray,
              indices: list[int], counts: dict[str, int], rng: Rng, extra: dict | None = None
              ) -> None:
    """One image per index, ``counts[kind]`` of each kind, and ``labels.json`` listing them
    (with ``extra`` entries), in place of the images ``folder`` held."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.jpg")) + list(folder.glob("*.png")):
        old.unlink()
    entries, queue = [], iter(indices)
    for kind, make in makers.items():
        for n in range(counts[kind]):
            index = next(queue)
            label = int(labels[index])
            image, form = make(digits[index], rng)
            name = f"{kind}-{n:02d}-label{label}"
            if isinstance(form, int):  # a JPEG quality
                (folder / f"{name}.jpg").write_bytes(jpeg_bytes(image, form))
                name += ".jpg"
            else:
                name += f".{form}"
                save(image, folder / name)
            entries.append({"file": name, "kind": kind, "label": label, "mnist_test_index": index})
    listing = {"source": "MNIST test set", **(extra or {}), "images": entries}
    (folder / "labels.json").write_text(json.dumps(listing, indent=1) + "\n")


def save(image: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        image.save(path, "JPEG", quality=80)
    else:
        image.save(path, "PNG", optimize=True)


def write_sets(seed: int, photos: Path, drawn: Path) -> None:
    digits, labels = mnist_test()
    rng = np.random.default_rng(seed)
    taken: set[int] = set()
    twin_indices = pick_digits(labels, 1, rng, taken)
    photo_indices = pick_digits(labels, len(PHOTO_KINDS), rng, taken)
    write_set(photos, PHOTO_KINDS, digits, labels, photo_indices,
              {kind: 10 for kind in PHOTO_KINDS}, rng,
              {"twin_digits": {"file": TWIN_DIGITS, "mnist_test_indices": twin_indices}})
    Image.fromarray(np.hstack([digits[i] for i in twin_indices])).save(photos / TWIN_DIGITS)
    drawn_indices = pick_digits(labels, len(DRAWN_STYLES), rng, taken)
    counts = {style: 10 for style in DRAWN_STYLES} | {"large": LARGE_COUNT}
    write_set(drawn, DRAWN_STYLES, digits, labels, drawn_indices, counts, rng)


# -- figure -----------------------------------------------------------------------------

def write_figure(path: Path, photos: Path) -> None:
    """For each hard kind a photo (of digit 0 for the first kind, 1 for the next, ...), what
    the shipped model sees, and what it reads there with its capsule's length."""
    sys.path.insert(0, str(REPO / "src"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from capsnet.utils.images import load_image
    from capsnet.nn.model import CapsNet

    entries = json.loads((photos / "labels.json").read_text())["images"]
    firsts = [next(e for e in entries if e["kind"] == kind and e["label"] == label)
              for label, kind in enumerate(PHOTO_KINDS)]
    model = CapsNet.from_pretrained("mnist")
    seen = np.stack([load_image(photos / e["file"]) for e in firsts])
    with torch.no_grad():
        lengths = model(torch.from_numpy(seen)).lengths
    figure, axes = plt.subplots(2, len(firsts), figsize=(1.6 * len(firsts), 3.6))
    for column, (entry, prepared, length) in enumerate(zip(firsts, seen, lengths)):
        guess = int(length.argmax())
        with Image.open(photos / entry["file"]) as photo:
            axes[0, column].imshow(photo.convert("RGB"))
        axes[0, column].set_title(f"{entry['kind']}\n(a {entry['label']})", fontsize=9)
        axes[1, column].imshow(prepared[0], cmap="gray", vmin=0, vmax=1)
        axes[1, column].set_title(f"reads {guess}, |v| {float(length[guess]):.2f}", fontsize=9,
                                  color="black" if guess == entry["label"] else "red")
        for axis in axes[:, column]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("photo")
    axes[1, 0].set_ylabel("model input")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="folder of the hard photos")
    parser.add_argument("--drawn", type=Path, default=DRAWN, help="folder of the drawings")
    parser.add_argument("--figure", type=Path, help="draw the figure from --photos instead")
    args = parser.parse_args(argv)
    if args.figure:
        write_figure(args.figure, args.photos)
    else:
        write_sets(args.seed, args.photos, args.drawn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
