"""torch.hub entry points: ``torch.hub.load(CHECKOUT, "capsnet_mnist", source="local")``."""

import sys
from pathlib import Path

dependencies = ["torch", "safetensors"]

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # a checkout, installed or not

from capsnet import CapsNet, CapsNetConfig  # noqa: E402


def capsnet_mnist(pretrained: bool = True, **config) -> CapsNet:
    """The MNIST CapsNet: trained weights shipped with capsnet, or (``pretrained=False``) a
    fresh network of the notebook's architecture with ``config`` overrides."""
    if pretrained:
        if config:
            raise ValueError("the pretrained model has its own config; pass none")
        return CapsNet.from_pretrained("mnist")
    return CapsNet(CapsNetConfig(**config))
