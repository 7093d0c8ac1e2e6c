"""Gray planes resampled with Pillow: shrunk by averaging areas, or resized anti-aliased."""

from __future__ import annotations

import numpy as np
from PIL import Image


def reduced(plane: np.ndarray, side: int) -> np.ndarray:
    """``plane`` shrunk, each pixel the mean of those it covers, to at most ``side`` pixels
    along its longer side (unchanged if already that small)."""
    height, width = plane.shape
    scale = side / max(height, width)
    if scale >= 1:
        return plane.astype(np.float64)
    image = Image.fromarray(plane.astype(np.float32))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """``plane`` resized to ``height`` x ``width`` with Lanczos (anti-aliased) resampling."""
    if plane.shape == (height, width):
        return plane.astype(np.float64)
    image = Image.fromarray(plane.astype(np.float32))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float64)
