"""capsnet: Capsule Networks with dynamic routing, self-attention routing and EM routing on
PyTorch.

The public names below are imported on first use, so ``import capsnet.cli`` loads nothing
heavy before the command can answer Ctrl-C.
"""

from importlib import import_module as _import_module

_HOMES = {  # public name -> the module that defines it
    "PrimaryCapsules": ".nn.layers", "RoutingCapsules": ".nn.layers", "safe_norm": ".nn.layers",
    "squash": ".nn.layers", "capsule_loss": ".nn.losses", "margin_loss": ".nn.losses",
    "reconstruction_loss": ".nn.losses", "CapsNet": ".nn.model", "CapsNetConfig": ".nn.model",
    "CapsNetOutput": ".nn.model", "capsnet_mnist": ".nn.model",
    "count_parameters": ".nn.model", "EfficientCapsNet": ".nn.efficient",
    "EfficientCapsNetConfig": ".nn.efficient", "EMCapsNet": ".nn.em_routing",
    "EMCapsNetConfig": ".nn.em_routing", "spread_loss": ".nn.em_routing",
    "PrimaryMatrixCapsules": ".nn.em_routing", "ConvMatrixCapsules": ".nn.em_routing",
    "ClassMatrixCapsules": ".nn.em_routing", "em_routing": ".nn.em_routing",
    "receptive_field": ".nn.em_routing",
    "DepthwisePrimaryCapsules": ".nn.efficient", "SelfAttentionRouting": ".nn.efficient",
    "MODELS": ".nn.registry", "load_model": ".nn.registry", "Prediction": ".nn.prediction",
    "TrainConfig": ".training.config", "make_config": ".training.config",
    "Classification": ".training.task", "Task": ".training.task",
    "Trainer": ".training.trainer", "train": ".training.trainer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    """A public name (or ``__version__``), imported on first use."""
    if name == "__version__":
        from .utils.version import package_version
        value: object = package_version()
    elif name in _HOMES:
        value = getattr(_import_module(_HOMES[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the module's own dunders, not its helpers."""
    dunders = (name for name in globals() if name.startswith("__"))
    return sorted({*__all__, "__version__", *dunders})
