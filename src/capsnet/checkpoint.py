"""Checkpoints: written atomically, loaded without running code, checked before use.

A checkpoint is a ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so ``torch.load(weights_only=True)`` reads it and nothing in it can execute:

    format            "capsnet-checkpoint"
    version           1
    model_config      CapsNetConfig.to_dict()
    train_config      TrainConfig.to_dict() (absent for exported weights)
    model             model state dict
    optimizer         optimizer state dict (training checkpoints)
    progress          {"epoch", "batch", "step", "best_val_loss"}
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .data import atomic_write_bytes
from .errors import CapsNetError
from .model import CapsNet, CapsNetConfig

FORMAT = "capsnet-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (see the module docstring) to ``path`` atomically.

    The bytes are built in memory, written to a temporary file in the same folder, synced
    and renamed over ``path``: a crash at any moment leaves the previous file whole.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    try:
        atomic_write_bytes(Path(path), buffer.getvalue())
    except OSError as exc:
        raise CapsNetError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                           f"the previous checkpoint is unchanged") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a capsnet checkpoint on the CPU; raise :class:`CapsNetError` if it is
    missing, truncated, corrupt, would need code to unpickle, or is not a capsnet file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    if not path.is_file():
        raise CapsNetError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CapsNetError(f"{path}: refused to load: not a plain-data checkpoint ({reason[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CapsNetError(f"{path}: corrupt or truncated checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CapsNetError(f"{path}: not a capsnet checkpoint")
    if payload.get("version") != VERSION:
        raise CapsNetError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                           f"(this capsnet reads version {VERSION})")
    for key in ("model_config", "model"):
        if not isinstance(payload.get(key), dict):
            raise CapsNetError(f"{path}: checkpoint has no {key}")
    return payload


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint") -> CapsNet:
    """Build the model a checkpoint describes and load its weights."""
    try:
        config = CapsNetConfig.from_dict(payload["model_config"])
    except (TypeError, ValueError) as exc:
        raise CapsNetError(f"{source}: bad model config ({exc})") from None
    model = CapsNet(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CapsNetError(f"{source}: weights do not fit the model config "
                           f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model


def load_model(path: str | os.PathLike) -> tuple[CapsNet, dict[str, Any]]:
    """Model (in eval mode, on CPU) and payload of the checkpoint at ``path``."""
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, str(path))
    return model.eval(), payload
