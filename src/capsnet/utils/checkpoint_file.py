"""The checkpoint file: written atomically, read without running code, checked before use.
It sits below the model layers so that ``CapsNet.from_pretrained`` can read checkpoints;
:mod:`capsnet.training.checkpoint` adds the checks of the training settings.

A checkpoint is a ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so ``torch.load(weights_only=True)`` reads it and nothing in it can execute:

    format            "capsnet-checkpoint"
    version           1
    architecture      the model's kind: "capsnet" (absent) or "cnn"
    model_config      the model's config as a dict
    train_config      TrainConfig.to_dict() (absent for exported weights)
    model             model state dict
    optimizer         optimizer state dict (training checkpoints)
    progress          how far the run got (capsnet.training.checkpoint.Progress, which
                      checks it)
    rng_state         the random state training continues from
    task              what the run trained (experiments: their name and settings)
    sha256            :func:`state_digest` of everything above

``torch.load`` does not check the CRC-32 of the zip records it reads, so a flipped bit in
tensor data loads silently as a different number. The ``sha256`` entry closes that gap: it
is a SHA-256 over a canonical encoding of every value in the file (tensors by dtype, shape
and raw bytes), recomputed and compared on every load. Corruption anywhere else (the pickle
or the zip structure) makes ``torch.load`` fail, which is reported the same way: one
:class:`CapsNetError` line, never a PyTorch traceback.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CapsNetError, error_line
from .files import atomic_write_bytes
from .settings import short

FORMAT = "capsnet-checkpoint"
VERSION = 1
DIGEST_KEY = "sha256"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives
RUN_CHECKPOINTS = ("best.pt", "last.pt")  # what a run folder stands for, in this order


# -- the checksum -------------------------------------------------------------------------

def state_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``payload`` without its ``sha256`` entry, over a canonical encoding:
    each value is a type tag, a length and its bytes; tensors are hashed as dtype, shape and
    their raw little-endian bytes (on the CPU), dicts in their (preserved) key order.
    Raises ``TypeError`` for a value a checkpoint cannot hold."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != DIGEST_KEY})
    return digest.hexdigest()


def _record(digest: Any, tag: bytes, data: bytes | memoryview) -> None:
    digest.update(tag + str(len(data)).encode() + b":")
    digest.update(data)


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cannot checksum a {value.layout} tensor")
        tensor = value.detach().resolve_conj().resolve_neg().cpu().contiguous()
        _record(digest, b"T", f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        _record(digest, b"t", memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        _record(digest, b"D", str(len(value)).encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        _record(digest, b"L", str(len(value)).encode())
        for item in value:
            _feed(digest, item)
    elif value is None:
        _record(digest, b"N", b"")
    elif isinstance(value, bool):
        _record(digest, b"B", b"1" if value else b"0")
    elif isinstance(value, int):
        _record(digest, b"I", str(value).encode())
    elif isinstance(value, float):
        _record(digest, b"F", value.hex().encode())
    elif isinstance(value, str):
        _record(digest, b"S", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        _record(digest, b"Y", bytes(value))
    elif isinstance(value, (torch.dtype, torch.device)):
        _record(digest, b"O", str(value).encode())
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


# -- writing ----------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (see the module docstring) to ``path`` atomically, with its checksum.

    The bytes are built in memory, written to a temporary file in the same folder, synced
    and renamed over ``path``: a crash at any moment leaves the previous file whole. Model
    weights that are NaN or infinite are refused, so a diverged run never replaces a good
    checkpoint. Temporary files left by a writer that was killed are removed.
    """
    path = Path(path)
    full = {"format": FORMAT, "version": VERSION, **payload}
    full.pop(DIGEST_KEY, None)
    for name, tensor in (full.get("model") or {}).items():
        if (isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex())
                and not bool(torch.isfinite(tensor).all())):
            raise CapsNetError(f"refused to write checkpoint {path}: weight {name} holds NaN or "
                               f"infinite values; the previous checkpoint is unchanged")
    try:
        full[DIGEST_KEY] = state_digest(full)
    except TypeError as exc:
        raise CapsNetError(f"cannot write checkpoint {path}: {exc}") from None
    buffer = io.BytesIO()
    torch.save(full, buffer)
    remove_stale_temporaries(path)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CapsNetError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                           f"the previous checkpoint is unchanged") from None


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.*.tmp`` files next to ``path``: what :func:`atomic_write_bytes` leaves
    when its process is killed mid-write (a whole checkpoint's worth of disk each)."""
    try:
        for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
    except OSError:
        pass  # only housekeeping: the write that follows reports real problems


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- reading ----------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike, *, resumable: bool = False) -> dict[str, Any]:
    """Read and check a capsnet checkpoint on the CPU (a run folder: its best.pt, else its
    last.pt); raise :class:`CapsNetError` if it is missing, truncated, corrupt (checksum or
    structure), would need code to unpickle, or is not a capsnet file. With ``resumable`` it
    must also hold the training state (``train_config``, ``optimizer``, ``progress``)."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in RUN_CHECKPOINTS if (path / name).is_file()),
                    path / RUN_CHECKPOINTS[-1])
    if not path.is_file():
        raise CapsNetError(f"{path}: no such checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
        if ZIP_MAGIC.startswith(head) and not zipfile.is_zipfile(path):
            # A zip cut short: torch.load would take it for an old-style pickle and complain
            # about pickle opcodes, which sounds like an attack rather than a short file.
            reason = "empty file" if not head else "the zip archive is incomplete"
            raise CapsNetError(f"{path}: corrupt or truncated checkpoint ({reason})")
        if not ZIP_MAGIC.startswith(head[:2]) and head[:1] != b"\x80":
            raise CapsNetError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                               f"pickle)")
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CapsNetError(f"{path}: refused to load: not a plain-data checkpoint "
                           f"({unpickling_reason(exc)})") from None
    except MemoryError:
        raise CapsNetError(f"{path}: corrupt checkpoint (it asks for more memory than there is)") from None
    except Exception as exc:  # corrupt bytes surface as any of a dozen exception types
        raise CapsNetError(f"{path}: corrupt or truncated checkpoint ({error_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CapsNetError(f"{path}: not a capsnet checkpoint")
    if payload.get("version") != VERSION:
        raise CapsNetError(f"{path}: checkpoint version {short(payload.get('version'))} is not supported "
                           f"(this capsnet reads version {VERSION})")
    stored = payload.get(DIGEST_KEY)
    if not isinstance(stored, str):
        raise CapsNetError(f"{path}: checkpoint has no checksum; it was not written by "
                           f"capsnet's save_checkpoint")
    try:
        actual = state_digest(payload)
    except TypeError as exc:
        raise CapsNetError(f"{path}: corrupt checkpoint ({exc})") from None
    if actual != stored:
        raise CapsNetError(f"{path}: checksum mismatch (stored sha256 {short(stored, 70)}, content "
                           f"{actual}): the file is corrupt")
    check_structure(payload, path, resumable)
    return payload


def check_structure(payload: dict[str, Any], path: Path, resumable: bool = False) -> None:
    """Raise :class:`CapsNetError` unless each entry of ``payload`` has the expected shape."""
    for key in ("model_config", "model"):
        if not isinstance(payload.get(key), dict):
            raise CapsNetError(f"{path}: checkpoint has no {key}")
    if not payload["model"]:
        raise CapsNetError(f"{path}: checkpoint has no weights")
    if "training_weights" in payload and not isinstance(payload["training_weights"], dict):
        raise CapsNetError(f"{path}: checkpoint's training_weights is not a dict")
    # model: the weights to use (a run's average, with --ema-decay); training_weights: then
    # the trained ones, which training resumes from
    for key in ("model", "training_weights"):
        for name, tensor in payload.get(key, {}).items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise CapsNetError(f"{path}: {key} entry {str(name)[:80]!r} is not a named tensor")
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                raise CapsNetError(f"{path}: {key} weight {name} holds NaN or infinite values")
    required = ("train_config", "optimizer", "progress") if resumable else ()
    for key in ("train_config", "optimizer", "progress"):
        if key not in payload:
            if key in required:
                raise CapsNetError(f"{path}: checkpoint has no {key}, so training cannot resume "
                                   f"from it (it holds weights only)")
            continue
        if not isinstance(payload[key], dict):
            raise CapsNetError(f"{path}: checkpoint's {key} is not a dict")
    optimizer = payload.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        raise CapsNetError(f"{path}: checkpoint's optimizer state is malformed")


def unpickling_reason(exc: BaseException) -> str:
    """The useful part of torch's long weights-only refusal, e.g. ``Unsupported global: GLOBAL
    exec was not an allowed global by default``."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
    if match and match.group(1).strip():
        return match.group(1).strip()[:200]
    return error_line(exc) if text.strip() else "unsafe content"
