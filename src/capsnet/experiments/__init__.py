"""The paper's experiments beyond MNIST. Each is one module defining an
:class:`~capsnet.experiments.base.Experiment`; adding one is a module and a line here."""

from .affnist import AFFNIST
from .base import OWN_INPUT, Experiment
from .multimnist import MULTIMNIST

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (MULTIMNIST, AFFNIST)}

__all__ = ["EXPERIMENTS", "OWN_INPUT", "Experiment"]
