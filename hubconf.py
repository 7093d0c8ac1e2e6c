"""torch.hub entry points: ``torch.hub.load(CHECKOUT, "capsnet_mnist", source="local")``."""

import sys
from pathlib import Path

dependencies = ["torch", "safetensors"]

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # a checkout, installed or not

from capsnet import capsnet_mnist  # noqa: E402,F401 - the entry point
