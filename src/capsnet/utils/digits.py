"""The digit on a photo of a page, cut out the way a careful person would and prepared as
MNIST's digits were (:func:`capsnet.utils.images.load_image` with ``preprocess``, for one
channel):

1. **Size.** The image is reduced, averaging areas, until its longer side is at most 256
   pixels: enough for a digit, and a 4000x3000 photo is prepared as fast as a small one.
2. **Polarity.** Each pixel is compared with the median of its surroundings (which is the
   paper, in the light or in a shadow, as ink covers little of any large area). If the
   pixels that differ most are brighter than it, the ink is light on a dark ground (chalk,
   white on black) and the image is inverted, so that the ink is dark from here on. Near
   the edge of a shadow, where that median jumps, pixels are not compared; when the
   comparison is close (bold strokes filling the image, as in MNIST), a uniform border
   decides: it is the ground.
3. **Paper.** The paper's brightness at each pixel is estimated by a closing (the brightest
   level around, then the darkest of those) over a window a quarter of the image wide: it
   erases strokes but keeps a shadow's edge, gradients of light and tinted paper. Each
   pixel's ink is how much darker it is than its paper, relative to it: 0 on paper, 1 for
   black ink, the same under a shadow as in the light.
4. **Ink.** Two levels, set by the strongest ink and by the paper's noise, tell ink from
   paper: pixels above the upper one, and the fainter ones joined to them (pencil) are ink.
5. **Rules and frames.** Long straight horizontal and vertical lines (runs of 15% of the
   image found by a morphological opening with a line, spanning 30% of it, thin, with paper
   on both sides) are erased if they reach past the digit at both ends: the rules of lined
   and squared paper, a frame around the digit. A digit's own straight strokes (the bar of
   a 7, a "1", the stem of a 4) do not reach past it, or are as broad as its other strokes.
   Strokes that crossed a rule are mended across it.
6. **The digit.** The connected strokes with the most ink are kept with the strokes near
   them (a broken stroke, the bar of a 5); specks, noise and other marks are dropped.
7. **Contrast.** The ink is stretched so that the strokes are 1 (pencil and pen alike),
   keeping their soft edges; everything else is 0.
8. **MNIST's box.** The digit is cropped to its ink, scaled (keeping its aspect ratio,
   anti-aliased) so that its longer side is 20 pixels (``round(size * 20 / 28)`` for other
   sizes), and pasted into a black ``size`` x ``size`` image with its centre of mass at the
   centre (moved the least needed to keep all ink inside, for very lopsided shapes).

An image with no ink standing out from its paper is refused as blank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import CapsNetError
from .resample import reduced, resize

MNIST_BOX = 20 / 28  # MNIST digits fit a 20x20 box inside the 28x28 image
MIN_CONTRAST = 0.05  # ink must be this much darker than its paper: 5% of its brightness
INK_LEVEL = 0.2  # after contrast stretching, pixels above this count as ink for the crop
WORK_SIDE = 256  # the page is prepared at most this large: enough for a digit, and fast
POLARITY_SIDE = 32  # ... and its polarity found at this size
POLARITY_TIE = 0.05  # ink brighter or darker than its surroundings by less: undecided
PAPER_WINDOW = 1 / 4  # of the longer side: wider than any stroke, narrower than a shadow
LOW_INK, HIGH_INK = 0.25, 0.5  # of the strongest ink: the two levels of step 4
NOISE_SIGMAS = 4.0  # ink stands this many noise deviations above the paper
RULE_RUN, RULE_SPAN = 0.15, 0.3  # of the side: a line's straight runs, its least length
SPECK = 0.03  # strokes with less ink than this share of the digit's are specks
NEAR = 0.25  # strokes this close (share of the digit's size) belong to the digit


# -- finding the digit on the page ----------------------------------------------------------

def mnist_normalise(plane: np.ndarray, size: int, name: str | Path) -> np.ndarray:
    """The digit on the page ``plane`` (gray, in [0, 1]) as a ``size`` x ``size`` MNIST-style
    image: the steps of the module's description."""
    plane = reduced(plane, WORK_SIDE)
    if bright_ink(plane):
        plane = 1.0 - plane
    ink = ink_level(plane)
    mask, marks = ink_mask(ink, name)
    digit = digit_strokes(without_rules(mask, marks, ink), ink)
    patch = stretched(ink, digit, mask)
    if patch.max() <= INK_LEVEL:
        raise blank(name)
    patch = crop_to_ink(patch)
    box = max(1, round(size * MNIST_BOX))
    height, width = patch.shape
    scale = box / max(height, width)
    patch = np.clip(resize(patch, max(1, round(height * scale)), max(1, round(width * scale))),
                    0.0, 1.0)
    return paste_centred(patch, size)


def blank(name: str | Path) -> CapsNetError:
    return CapsNetError(f"{name}: the image is blank (no ink stands out from the background)")


def bright_ink(plane: np.ndarray) -> bool:
    """Whether the ink is lighter than its ground (step 2)."""
    small = reduced(plane, POLARITY_SIDE)
    window = max(3, max(small.shape) // 2 | 1)
    ground = ndimage.median_filter(small, window, mode="nearest")
    steady = (ndimage.maximum_filter(ground, 3) - ndimage.minimum_filter(ground, 3)
              < 2 * POLARITY_TIE)  # not at the edge of a shadow
    deviation = np.sort((small - ground)[steady])
    tail = max(1, small.size // 50)
    lean = float(deviation[-tail:].sum() + deviation[:tail].sum()) / tail
    border = np.concatenate([plane[0], plane[-1], plane[:, 0], plane[:, -1]])
    low, high = np.percentile(border, [10, 90])
    if abs(lean) < POLARITY_TIE and high - low < 2 * POLARITY_TIE:
        return float(np.median(border)) < float(plane.mean())
    return lean > 0


def ink_level(plane: np.ndarray) -> np.ndarray:
    """How much darker each pixel is than the paper around it, relative to the paper: 0 on
    paper, 1 for black ink, the same in the light and in a shadow (step 3)."""
    window = max(3, round(max(plane.shape) * PAPER_WINDOW) | 1)
    # Beyond the edges the paper goes on as it went, blurred (an odd reflection of the
    # smoothed page), so that light falling off towards an edge is not taken for ink there.
    trend = ndimage.gaussian_filter(plane, window / 4, mode="nearest")
    padded = np.pad(trend, window, mode="reflect", reflect_type="odd")
    padded[window:-window, window:-window] = plane
    padded = np.clip(padded, plane.min(), plane.max())
    paper = ndimage.grey_closing(padded, size=(window, window))[window:-window, window:-window]
    return (paper - plane) / np.maximum(paper, MIN_CONTRAST)


def ink_mask(ink: np.ndarray, name: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of ink (step 4), and every mark that stands out of the paper's noise, faint
    rules too. Raises CapsNetError if there is no ink."""
    smooth = ndimage.gaussian_filter(ink, 0.7, mode="nearest")  # sensor noise, JPEG blocks
    peak = float(smooth.max())
    if peak < MIN_CONTRAST:
        raise blank(name)
    paper = float(np.median(smooth))
    noise = 1.4826 * float(np.median(np.abs(smooth - paper)))  # robust: most pixels are paper
    marks = smooth >= min(max(paper + NOISE_SIGMAS * noise, MIN_CONTRAST), peak)
    low = min(max(LOW_INK * peak, paper + NOISE_SIGMAS * noise), peak)
    high = min(max(HIGH_INK * peak, paper + 2 * NOISE_SIGMAS * noise), peak)
    labels, _ = ndimage.label(smooth >= low, structure=np.ones((3, 3)))
    strong = np.unique(labels[smooth >= high])
    return np.isin(labels, strong[strong > 0]), marks


def without_rules(mask: np.ndarray, marks: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """``mask`` without the rules and frames among ``marks``, the strokes that crossed them
    mended (step 5)."""
    lines = [straight_lines(marks, mask, axis) for axis in (0, 1)]  # vertical, horizontal
    if not (lines[0] or lines[1]):
        return mask
    on_lines = np.logical_or.reduce(lines[0] + lines[1])
    digit = digit_seed(mask & ~on_lines, lines[0] + lines[1], ink)
    stroke = stroke_width(digit)
    kept = mask.copy()
    for axis, pieces in enumerate(lines):
        rules = [piece for piece in pieces if is_rule(piece, axis, digit, stroke)]
        if not rules:
            continue
        found = np.logical_or.reduce(rules)
        kept &= ~found
        # where a stroke crossed a rule, the gap is bridged across the rule
        reach = 3 + 2 * max(line_thickness(piece, axis) for piece in rules)
        across = np.ones((1, reach) if axis == 0 else (reach, 1), dtype=bool)
        kept |= found & mask & closed(kept, across)
    return kept


def straight_lines(marks: np.ndarray, mask: np.ndarray, axis: int) -> list[np.ndarray]:
    """The straight lines along ``axis`` (0: vertical) among ``marks``: runs of at least
    :data:`RULE_RUN` of the image (an opening with a line), joined across gaps as long (a
    faint rule broken into dashes), spanning :data:`RULE_SPAN` of the image, thin, with
    paper on both sides (not a sliver of a broad stroke), and without the places where a
    stroke lies along them."""
    run = max(3, round(marks.shape[axis] * RULE_RUN))
    along = np.ones((run, 1) if axis == 0 else (1, run), dtype=bool)
    runs = closed(ndimage.binary_opening(marks, along), along)
    beside = np.ones((1, 5) if axis == 0 else (5, 1), dtype=bool)
    lines = []
    for piece in components(runs):
        piece = thin_part(piece, axis)
        length = bounding_extent(piece)[axis]
        if length < RULE_SPAN * marks.shape[axis] or line_thickness(piece, axis) > length / 8:
            continue
        flanks = ndimage.binary_dilation(piece, beside) & ~piece
        if np.count_nonzero(flanks & mask) <= 0.5 * np.count_nonzero(flanks):
            lines.append(piece)
    return lines


def line_thickness(line: np.ndarray, axis: int) -> int:
    """How many pixels thick ``line`` (along ``axis``) is where it is thinnest, mostly (a
    quarter of its places are thinner)."""
    across = np.count_nonzero(line, axis=1 - axis)
    return max(1, round(float(np.percentile(across[across > 0], 25))))


def thin_part(line: np.ndarray, axis: int) -> np.ndarray:
    """``line`` where it is about as thin as it mostly is: not where a stroke lies along it."""
    across = np.count_nonzero(line, axis=1 - axis)
    thin = across <= 2 * line_thickness(line, axis) + 1
    return line & (thin[:, np.newaxis] if axis == 0 else thin[np.newaxis, :])


def digit_seed(rest: np.ndarray, lines: list[np.ndarray], ink: np.ndarray) -> np.ndarray:
    """Strokes surely of the digit: its strokes off the straight ``lines`` or, for a digit of
    straight strokes alone (a "1"), the shortest line."""
    digit = digit_strokes(rest, ink)
    if digit.any() and float(ink[digit].sum()) >= 0.1 * max(float(ink[p].sum()) for p in lines):
        return digit
    return min(lines, key=lambda piece: max(bounding_extent(piece)))


def is_rule(line: np.ndarray, axis: int, digit: np.ndarray, stroke: float) -> bool:
    """Whether ``line`` (along ``axis``) reaches past the ``digit``, and past where it touches
    it, at both ends by more than its thickness and a fifth of the digit's size: rules and
    frames do, a digit's own strokes do not. A line that touches the digit must also be
    thinner than half its strokes (``stroke`` pixels wide), as printed rules are: a stroke as
    broad as the digit's that runs on past it is the digit's (the stem of a 4)."""
    box = bounding_box(digit)
    start, end = box[2 * axis], box[2 * axis + 1]  # the digit's extent along the line
    touching = line & ndimage.binary_dilation(digit, np.ones((3, 3)))
    contact = np.flatnonzero(touching.any(axis=1 - axis))
    thickness = line_thickness(line, axis)
    if contact.size:
        if thickness > 0.5 * stroke:
            return False
        start, end = min(start, int(contact[0])), max(end, int(contact[-1]))
    first, last = bounding_box(line)[2 * axis:2 * axis + 2]
    reach = thickness + 0.2 * (max(box[1] - box[0], box[3] - box[2]) + 1)
    return first < start - reach and last > end + reach


def stroke_width(mask: np.ndarray) -> float:
    """The usual width of the strokes of ``mask``: twice the distance from their middle
    (the ridge of the distance to the paper) to their edge."""
    distance = ndimage.distance_transform_edt(closed(mask, np.ones((3, 3), dtype=bool)))
    ridge = mask & (distance >= ndimage.maximum_filter(distance, size=3))
    return 2 * float(np.median(distance[ridge]))


def digit_strokes(mask: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """The connected strokes of ``mask`` with the most ink, and those near them that are
    more than specks (a broken stroke, the bar of a 5), step 6."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return mask
    mass = ndimage.sum_labels(ink, labels, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(labels)
    chosen = {int(np.argmax(mass))}
    grown = True
    while grown:
        top = min(boxes[i][0].start for i in chosen)
        bottom = max(boxes[i][0].stop for i in chosen)
        left = min(boxes[i][1].start for i in chosen)
        right = max(boxes[i][1].stop for i in chosen)
        reach = NEAR * max(bottom - top, right - left)
        near = {i for i in range(count) if i not in chosen
                and mass[i] >= SPECK * mass[list(chosen)].sum()
                and boxes[i][0].start < bottom + reach and boxes[i][0].stop > top - reach
                and boxes[i][1].start < right + reach and boxes[i][1].stop > left - reach}
        chosen |= near
        grown = bool(near)
    return np.isin(labels, [i + 1 for i in chosen])


def stretched(ink: np.ndarray, digit: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The digit's ink and its soft edge (but no other mark), scaled so that its strokes
    reach 1; all else 0 (step 7)."""
    edge = ndimage.binary_dilation(digit, np.ones((3, 3))) & ~(mask & ~digit)
    strength = float(np.percentile(ink[digit], 90))
    return np.clip(np.where(edge, ink, 0.0) / max(strength, 1e-6), 0.0, 1.0)


def closed(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """A binary closing that takes the image's edges for paper going on, not for a wall
    (scipy's would erode everything near them)."""
    pad = max(structure.shape)
    return ndimage.binary_closing(np.pad(mask, pad), structure)[pad:-pad, pad:-pad]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """Each connected (8-neighbour) part of ``mask`` on its own."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    return [labels == index for index in range(1, count + 1)]


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``, inclusive, of the pixels of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def bounding_extent(mask: np.ndarray) -> tuple[int, int]:
    top, bottom, left, right = bounding_box(mask)
    return bottom - top + 1, right - left + 1


# -- MNIST's box --------------------------------------------------------------------------

def crop_to_ink(plane: np.ndarray) -> np.ndarray:
    """The smallest rectangle of ``plane`` holding every pixel above :data:`INK_LEVEL`."""
    rows = np.flatnonzero((plane > INK_LEVEL).any(axis=1))
    cols = np.flatnonzero((plane > INK_LEVEL).any(axis=0))
    return plane[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def paste_centred(patch: np.ndarray, size: int) -> np.ndarray:
    """A black ``size`` x ``size`` image with ``patch`` placed so that its centre of mass is
    at the image centre, rounded to whole pixels, and all of it inside."""
    canvas = np.zeros((size, size))
    mass = patch.sum()
    rows, cols = np.indices(patch.shape)
    centre = (size - 1) / 2
    offsets = []
    for axis, index in enumerate((rows, cols)):
        com = float((index * patch).sum() / mass) if mass > 0 else (patch.shape[axis] - 1) / 2
        offset = int(np.floor(centre - com + 0.5))
        offsets.append(min(max(offset, 0), size - patch.shape[axis]))
    top, left = offsets
    canvas[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return canvas
