"""An exponential moving average of a model's weights (Polyak averaging, as torchvision's
``--model-ema`` and timm's ``ModelEma``): after every optimiser step each floating-point
weight and buffer of the average moves ``1 - decay`` of the way to the trained one, and
integer buffers (batch norm's step count) are copied. The average is often a little more
accurate than the weights of the last step, and costs one model's memory. With ``warmup``
the decay of step ``t`` is ``min(decay, (1 + t) / (10 + t))`` (as TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``): 0.1 at the first step, so that the
average does not hold on to the initial weights for thousands of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The average of ``model``'s weights, itself a model (``.model``, in eval mode) that
    starts as a copy of ``model``, or of ``state`` (a state dict) when given."""

    def __init__(self, model: nn.Module, decay: float,
                 state: dict[str, torch.Tensor] | None = None, warmup: bool = False) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None:
            self.model.load_state_dict(state)
        # Detached views of both models' weights: in-place updates reach the weights
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(),
                         strict=True))
        self.averages = [a for a, _ in pairs if a.is_floating_point()]
        self.weights = [w for a, w in pairs if a.is_floating_point()]
        self.counts = [(a, w) for a, w in pairs if not a.is_floating_point()]

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimiser step ``step`` (0 for the first)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the model's weights as they are after step ``step``."""
        if self.averages:
            torch._foreach_lerp_(self.averages, self.weights, 1 - self.decay_at(step))
        for average, weight in self.counts:
            average.copy_(weight)
