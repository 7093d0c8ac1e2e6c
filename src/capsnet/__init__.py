"""capsnet: Capsule Networks with dynamic routing on PyTorch."""

from .nn.layers import PrimaryCapsules, RoutingCapsules, safe_norm, squash
from .nn.losses import capsule_loss, margin_loss, reconstruction_loss
from .nn.model import CapsNet, CapsNetConfig, CapsNetOutput, capsnet_mnist, count_parameters

__version__ = "0.1.0"

__all__ = [
    "CapsNet", "CapsNetConfig", "CapsNetOutput", "PrimaryCapsules", "RoutingCapsules",
    "capsnet_mnist", "capsule_loss", "count_parameters", "margin_loss",
    "reconstruction_loss", "safe_norm", "squash",
]
