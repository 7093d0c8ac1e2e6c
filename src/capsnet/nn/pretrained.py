"""Trained models as files anyone can load: safetensors weights with the model's config, class
names and input preparation in the file's metadata, in the folder layout people know from the
Hugging Face hub (no hub needed)::

    FOLDER/config.json         the same information, readable
    FOLDER/model.safetensors   the weights (float32, or float16 to halve the size)

``capsnet export --format safetensors`` writes the same ``model.safetensors``. Models shipped
inside the package are loaded by name (:data:`SHIPPED`): ``CapsNet.from_pretrained("mnist")``.
Nothing in these files is executed: safetensors holds tensors and strings only.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CapsNetError, reading
from ..utils.files import write_or_fail
from ..utils.version import package_version

FORMAT = "capsnet-safetensors"
VERSION = "1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
SHIPPED = ("mnist",)  # folders of src/capsnet/pretrained/
PREPARATIONS = ("mnist", "resize")


def labels_of(model: nn.Module) -> dict[str, Any]:
    """What the model's outputs mean: its class names and how to prepare a user's image."""
    return {"class_names": list(model.class_names), "prepare": model.prepare}


def weights_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> bytes:
    """The safetensors file of ``model`` (optionally cast to ``dtype``) with its config,
    class names and preparation in the metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "version": VERSION,
                "capsnet_version": package_version(),
                "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
                "labels": json.dumps(labels_of(model), sort_keys=True)}
    return save(state, metadata=metadata)


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(model config, float32 state dict, labels)`` of a capsnet safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CapsNetError(f"{path}: no such file")
    with reading(path, "safetensors file"):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key).float() for key in f.keys()}
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise CapsNetError(f"{path}: not a capsnet safetensors file (no model config in its "
                           f"metadata)")
    if metadata.get("version") != VERSION:
        raise CapsNetError(f"{path}: capsnet safetensors version {metadata.get('version')!r} is "
                           f"not supported (this capsnet reads version {VERSION})")
    with reading(path, "model config in the metadata"):
        config = json.loads(metadata["model_config"])
        labels = json.loads(metadata.get("labels", "{}"))
    return config, state, labels


def check_labels(labels: Any, num_classes: int, source: str) -> dict[str, Any]:
    """Stored class names and preparation, checked (untrusted input); defaults when absent."""
    if not isinstance(labels, dict):
        raise CapsNetError(f"{source}: the stored labels are not a JSON object")
    names = labels.get("class_names") or [str(i) for i in range(num_classes)]
    if not (isinstance(names, list) and len(names) == num_classes
            and all(isinstance(n, str) and 0 < len(n) <= 100 and n.isprintable() for n in names)):
        raise CapsNetError(f"{source}: the stored class names are not {num_classes} short "
                           f"printable names")
    prepare = labels.get("prepare", "mnist")
    if prepare not in PREPARATIONS:
        raise CapsNetError(f"{source}: unknown image preparation {prepare!r}")
    return {"class_names": tuple(names), "prepare": prepare}


def build(model_class: type, config_class: type, config: Any, state: Any, source: str) -> Any:
    """A model of ``model_class`` from a stored ``config`` dict and ``state`` dict, both
    checked (a config breaking the rules, weights that do not fit: one line)."""
    try:
        checked = config_class.from_dict(config)
    except (TypeError, ValueError, CapsNetError) as exc:
        raise CapsNetError(f"{source}: bad model config ({' '.join(str(exc).split())[:200]})") from None
    model = model_class(checked)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise CapsNetError(f"{source}: weights do not fit the model config "
                           f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    return model


def save_pretrained(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` to ``folder`` (config.json and model.safetensors); returns the folder."""
    folder = Path(folder)
    config = {"format": FORMAT, "version": VERSION, "model_config": model.config.to_dict(),
              **labels_of(model), "dtype": str(dtype or torch.float32).removeprefix("torch.")}
    write_or_fail(folder / WEIGHTS, weights_bytes(model, dtype))
    write_or_fail(folder / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return folder


def pretrained_file(name_or_path: str | Path) -> Path:
    """The weights file of a shipped model's name, a saved folder, or a safetensors file."""
    if str(name_or_path) in SHIPPED:
        return Path(str(resources.files("capsnet").joinpath("pretrained", str(name_or_path),
                                                            WEIGHTS)))
    path = Path(name_or_path)
    if path.is_dir():
        return path / WEIGHTS
    if path.suffix == ".safetensors" or path.is_file():
        return path
    raise CapsNetError(f"{name_or_path}: neither a shipped model ({', '.join(SHIPPED)}) nor a "
                       f"folder written by save_pretrained nor a .safetensors file")
