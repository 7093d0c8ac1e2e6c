"""What every capsule network of capsnet can do besides its forward pass: prepare a user's
images as its training images were, predict with class names and "none of these", and be
saved and loaded as one file format.

A model class mixes in :class:`CapsuleModel` and sets ``architecture`` (the tag stored with
it) and ``config_class``; its instances have ``config`` (with ``image_size``,
``in_channels``, ``num_classes``), ``class_names``, ``prepare`` and ``crop_from``. ::

    model = CapsNet.from_pretrained("mnist")
    for p in model.predict(["three.png", pil_image, numpy_array]):
        print(p.label or "none", f"{p.confidence:.2f}")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CapsNetError
from ..utils.images import ImageSource, centre_crop, load_image
from . import pretrained
from .layers import safe_norm
from .prediction import Prediction, predictions


class CapsNetOutput(NamedTuple):
    digit_caps: Tensor        # (batch, classes, digit_dim) output capsules v_j
    lengths: Tensor           # (batch, classes) safe norms |v_j|, the class scores
    predictions: Tensor       # (batch,) index of the longest capsule
    reconstructions: Tensor   # (batch, [k,] channels, size, size) decoder output in [0, 1]


class CapsuleModel:
    """``preprocess``, ``predict``, ``save_pretrained`` and ``from_pretrained``; and, for a
    network of vector capsules with ``capsules(images)`` and a ``decoder``, ``reconstruct``
    and ``forward`` (masking by label while training, by the longest capsule otherwise)."""

    architecture: str
    config_class: type
    class_names: tuple[str, ...]
    prepare: str  # "mnist": centred like MNIST's digits; "resize": only resized
    crop_from: int = 0  # the side of the images its training crops were cut from; 0: none
    config: Any

    def preprocess(self, images: ImageSource | Iterable[ImageSource]) -> Tensor:
        """Images as this model's input ``(batch, channels, size, size)`` in [0, 1]: each a
        path, a PIL image, a NumPy array or a tensor, prepared as the model's training images
        were (see :meth:`prepare_image`)."""
        sources = [images] if is_one_image(images) else list(images)  # type: ignore[arg-type]
        if not sources:
            raise CapsNetError("no images given")
        prepared = [self.prepare_image(source, self.prepare == "mnist", f"image {i}")
                    for i, source in enumerate(sources)]
        return torch.from_numpy(np.stack(prepared))

    def prepare_image(self, source: ImageSource, preprocess: bool = True,
                      name: str | None = None) -> np.ndarray:
        """One image as this model's input ``(channels, size, size)``: made the size of its
        training images by :func:`capsnet.utils.images.load_image` (``preprocess``: centred
        as MNIST's digits), then, for a model trained on crops, cut to the centre window."""
        size = self.config.image_size
        image = load_image(source, self.crop_from or size, self.config.in_channels,
                           preprocess, name)
        return centre_crop(image, size)

    @torch.no_grad()
    def predict(self, images: ImageSource | Iterable[ImageSource] | Tensor,
                batch_size: int = 256) -> list[Prediction]:
        """A :class:`~capsnet.nn.prediction.Prediction` per image: ``images`` as
        :meth:`preprocess` takes them, or a prepared batch ``(batch, channels, size, size)``.
        The model's mode is left as it was; eval mode is what a prediction wants."""
        batch = (images if isinstance(images, Tensor) and images.dim() == 4
                 else self.preprocess(images))
        parameter = next(self.parameters())  # type: ignore[attr-defined]
        lengths = [self(part.to(parameter.device, parameter.dtype)).lengths  # type: ignore[operator]
                   for part in batch.split(batch_size)]
        return predictions(torch.cat(lengths), self.class_names)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json and model.safetensors (``dtype``: e.g. torch.float16 to halve
        the size) to ``folder``, both or neither; :meth:`from_pretrained` reads it back."""
        return pretrained.save_pretrained(self, folder, dtype)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> Any:
        """A trained model of this class in eval mode, float32, on the CPU, with its class
        names and image preparation, from any of: a model shipped with the package by name
        (``"mnist"``), a run folder (its best.pt), a checkpoint file (.pt), a folder written
        by :meth:`save_pretrained`, or a safetensors file (``capsnet export --format
        safetensors``). :func:`capsnet.load_model` loads any architecture."""
        stored = pretrained.read_model(source)
        return pretrained.built(stored, {cls.architecture: (cls, cls.config_class)}).eval()

    @property
    def reconstructs(self) -> bool:
        """Whether a decoder reconstructs images from the class capsules (an EM network has
        one only when its config asks for it)."""
        return getattr(self, "decoder", None) is not None

    def routing_kernel(self, device: torch.device) -> str | None:
        """The fused operators this model routes in on ``device``, by the name and hash of
        the source they were built from (:func:`capsnet.nn.cbuild.source_version`), or None
        where it routes in torch (see ``capsnet bench``), as a model without such operators
        always does."""
        return None

    def reconstruct(self, digit_caps: Tensor, classes: Tensor) -> Tensor:
        """Decode the capsule of ``classes`` from ``digit_caps``; others are zeroed.

        ``classes`` ``(batch,)`` gives ``(batch, channels, size, size)``; ``(batch, k)``
        (several objects, as MultiMNIST) gives one image per column,
        ``(batch, k, channels, size, size)``, in one decoder pass.
        """
        if classes.dim() == 2:
            batch, k = classes.shape
            images = self.reconstruct(digit_caps.repeat(k, 1, 1), classes.T.reshape(-1))
            return images.view(k, batch, *images.shape[1:]).transpose(0, 1)
        mask = F.one_hot(classes, self.config.num_classes).to(digit_caps.dtype)  # (batch, classes)
        decoder_input = (digit_caps * mask.unsqueeze(-1)).flatten(1)  # (batch, classes * digit_dim)
        c, s = self.config.in_channels, self.config.image_size
        return self.decoder(decoder_input).view(-1, c, s, s)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> CapsNetOutput:
        digit_caps, _ = self.capsules(images)
        lengths = safe_norm(digit_caps)  # (batch, classes)
        predictions = lengths.argmax(dim=1)
        mask_classes = predictions if labels is None else labels
        return CapsNetOutput(digit_caps, lengths, predictions,
                             self.reconstruct(digit_caps, mask_classes))


def is_one_image(images: Any) -> bool:
    """Whether ``images`` is one image rather than a collection of them."""
    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "getbands"):
        return True
    return isinstance(images, Tensor) and images.dim() <= 3
