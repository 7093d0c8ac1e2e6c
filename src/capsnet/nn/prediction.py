"""Predictions as a person reads them: class names, capsule lengths, and "none of these".

A capsule's length is the probability that its entity is present (the margin loss pushes it
above 0.9 when present and below 0.1 when absent), so an image whose longest capsule stays
under :data:`PRESENT` holds none of the classes the model knows: its answer is ``None``, not
the least unlikely class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import CapsNetError

PRESENT = 0.5  # the length above which a capsule says "my class is here"


@dataclass(frozen=True)
class Prediction:
    """What a model sees in one image."""

    label: str | None  # the longest capsule's class, or None when no length reaches PRESENT
    index: int | None  # that class's index
    confidence: float  # the longest capsule's length
    lengths: dict[str, float]  # every class's capsule length (EM: activation), by class name

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` longest capsules as ``(class name, length)``, longest first."""
        return sorted(self.lengths.items(), key=lambda item: -item[1])[:k]

    def to_dict(self, top_k: int | None = None) -> dict[str, Any]:
        """JSON-ready: ``class`` is null for "none of these"; ``top`` with ``top_k``."""
        d: dict[str, Any] = {"class": self.label, "index": self.index,
                             "confidence": round(self.confidence, 6),
                             "lengths": {k: round(v, 6) for k, v in self.lengths.items()}}
        if top_k is not None:
            d["top"] = [[name, round(v, 6)] for name, v in self.top(top_k)]
        return d


def predictions(lengths: Tensor, class_names: Sequence[str]) -> list[Prediction]:
    """One :class:`Prediction` per row of capsule ``lengths`` ``(batch, classes)``."""
    lengths = lengths.detach().float().cpu()
    if not torch.isfinite(lengths).all():
        raise CapsNetError("the model's outputs are not finite numbers: its weights are damaged")
    best, index = lengths.max(dim=1)
    return [Prediction(label=class_names[i] if b >= PRESENT else None,
                       index=i if b >= PRESENT else None, confidence=b,
                       lengths=dict(zip(class_names, row)))
            for b, i, row in zip(best.tolist(), index.tolist(), lengths.tolist())]
