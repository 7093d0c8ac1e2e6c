"""capsnet: Capsule Networks with dynamic routing on PyTorch."""

from .layers import PrimaryCapsules, RoutingCapsules, safe_norm, squash
from .losses import capsule_loss, margin_loss, reconstruction_loss
from .model import CapsNet, CapsNetConfig, CapsNetOutput, capsnet_mnist, count_parameters

__version__ = "0.1.0"

__all__ = [
    "CapsNet", "CapsNetConfig", "CapsNetOutput", "PrimaryCapsules", "RoutingCapsules",
    "capsnet_mnist", "capsule_loss", "count_parameters", "margin_loss",
    "reconstruction_loss", "safe_norm", "squash",
]
