"""capsnet: Capsule Networks with dynamic routing on PyTorch."""

from .nn.layers import PrimaryCapsules, RoutingCapsules, safe_norm, squash
from .nn.losses import capsule_loss, margin_loss, reconstruction_loss
from .nn.model import CapsNet, CapsNetConfig, CapsNetOutput, capsnet_mnist, count_parameters
from .training.config import TrainConfig, make_config
from .training.task import Classification, Task
from .training.trainer import Trainer, train
from .utils.version import package_version

__version__ = package_version()

__all__ = [
    "CapsNet", "CapsNetConfig", "CapsNetOutput", "Classification", "PrimaryCapsules",
    "RoutingCapsules", "Task", "TrainConfig", "Trainer", "capsnet_mnist", "capsule_loss",
    "count_parameters", "make_config", "margin_loss", "reconstruction_loss", "safe_norm",
    "squash", "train",
]
