"""Trained models as files anyone can load: safetensors weights with the model's config, class
names and input preparation in the file's metadata, in the folder layout people know from the
Hugging Face hub (no hub needed)::

    FOLDER/config.json         the same information, readable
    FOLDER/model.safetensors   the weights (float32, or float16 to halve the size)

``capsnet export --format safetensors`` writes the same ``model.safetensors``. Models shipped
inside the package are loaded by name (:data:`SHIPPED`): ``CapsNet.from_pretrained("mnist")``.
Nothing in these files is executed: safetensors holds tensors and strings only.

:func:`read_model` is the one place that decides what a user's model argument stands for: a
shipped name, a run folder, a checkpoint, a save_pretrained folder or a safetensors file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CapsNetError, error_line, reading
from ..utils.checkpoint_file import RUN_CHECKPOINTS, ZIP_MAGIC, read_checkpoint
from ..utils.settings import MAX_IMAGE_SIDE, short
from ..utils.version import package_version

FORMAT = "capsnet-safetensors"
VERSION = "1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
SHIPPED = {"mnist": "mnist"}  # folders of src/capsnet/pretrained/ -> the data set each learnt
PREPARATIONS = ("mnist", "resize")
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # stored weights
SAFETENSORS_FLOAT_BITS = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64}  # header dtype names
MODEL_KINDS = (f"a run folder (its best.pt), a checkpoint (.pt), a save_pretrained folder, a "
               f".safetensors file or a shipped model's name ({', '.join(SHIPPED)})")
ACCEPTED = f"a model is {MODEL_KINDS}"


@dataclass(frozen=True)
class Stored:
    """A model as a file holds it, read and checked but not built (see :func:`read_model`)."""

    path: Path
    config: dict[str, Any]  # the model config
    state: dict[str, torch.Tensor]
    labels: dict[str, Any]  # class names and image preparation, unchecked
    architecture: str = "capsnet"
    train_config: dict[str, Any] | None = None  # a checkpoint's training settings
    dataset: str | None = None  # the data set of a shipped model (a checkpoint's is in train_config)


def labels_of(model: nn.Module) -> dict[str, Any]:
    """What the model's outputs mean: its class names and how to prepare a user's image."""
    return {"class_names": list(model.class_names), "prepare": model.prepare,
            "crop_from": model.crop_from}


def weights_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> bytes:
    """The safetensors file of ``model`` (optionally cast to ``dtype``) with its config,
    class names and preparation in the metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().to(dtype if dtype and v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "version": VERSION,
                "capsnet_version": package_version(), "architecture": architecture_of(model),
                "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
                "labels": json.dumps(labels_of(model), sort_keys=True)}
    return save(state, metadata=metadata)


def architecture_of(model: nn.Module) -> str:
    """The tag that names ``model``'s class in the files it is stored in."""
    return getattr(model, "architecture", "capsnet")


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                            dict[str, Any], str]:
    """``(model config, float32 state dict, labels, architecture)`` of a capsnet safetensors
    file (files written before other architectures existed hold a CapsNet)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CapsNetError(f"{path}: no such file")
    with reading(path, "safetensors file"):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise CapsNetError(f"{path}: not a capsnet safetensors file (no model config in its "
                           f"metadata)")
    if metadata.get("version") != VERSION:
        raise CapsNetError(f"{path}: capsnet safetensors version {metadata.get('version')!r} is "
                           f"not supported (this capsnet reads version {VERSION})")
    with reading(path, "model config in the metadata"):
        config = json.loads(metadata["model_config"])
        labels = json.loads(metadata.get("labels", "{}"))
    # other dtypes stay as stored, for check_fits to refuse or accept (an integer buffer)
    architecture = metadata.get("architecture", "capsnet")
    return config, {key: tensor.float() if tensor.dtype in WEIGHT_DTYPES else tensor
                    for key, tensor in state.items()}, labels, architecture


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


def check_crop_from(labels: dict[str, Any], image_size: int, source: str) -> int:
    """The stored side a model's images are made before their centre ``image_size`` crop
    (untrusted input): 0 (no crop, also when absent) or larger than ``image_size``."""
    crop_from = labels.get("crop_from", 0)
    if not (type(crop_from) is int
            and (crop_from == 0 or image_size < crop_from <= MAX_IMAGE_SIDE)):
        raise CapsNetError(f"{source}: the stored crop_from must be 0 or a side from "
                           f"{image_size + 1} to {MAX_IMAGE_SIDE}, got {short(crop_from)}")
    return crop_from


def build(model_class: type, config_class: type, config: Any, state: Any, source: str) -> Any:
    """A model of ``model_class`` from a stored ``config`` dict and ``state`` dict, both
    checked (a config breaking the rules, weights that do not fit: one line) before the
    model is built. The model takes copies of the stored weights, in its own dtypes, as its
    parameters: no random initialisation is made only to be overwritten."""
    model = outline(model_class, config_class, config, state, source)
    expected = model.state_dict()  # outline() checked every name and shape
    model.load_state_dict({name: state[name].to(dtype=meta.dtype, copy=True,
                                                memory_format=torch.contiguous_format)
                           for name, meta in expected.items()}, assign=True)
    return model


def outline(model_class: type, config_class: type, config: Any, state: dict[str, torch.Tensor],
            source: str) -> nn.Module:
    """The model a stored ``config`` describes on the meta device (shapes and dtypes, no
    memory), once ``state`` is known to hold exactly its weights. A config that asks for
    more parameters than the file stores is refused from its fields alone, before even
    that: a small file must not make a large model."""
    try:
        checked = config_class.from_dict(config)
    except (TypeError, ValueError, CapsNetError) as exc:
        raise CapsNetError(f"{source}: bad model config ({error_line(exc)})") from None
    stored = sum(tensor.numel() for tensor in state.values())
    if checked.parameter_count > stored:
        raise CapsNetError(f"{source}: weights do not fit the model config (it describes "
                           f"{checked.parameter_count:,} parameters, the file stores {stored:,})")
    with torch.device("meta"):
        model = model_class(checked)
    check_fits(model.state_dict(), state, source)
    return model


def check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
               source: str) -> None:
    """Refuse stored weights ``state`` unless they have exactly the names and shapes of the
    model's ``expected`` ones, each of a fitting dtype and finite."""
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        names = [*(f"missing {name}" for name in sorted(missing)),
                 *(f"unexpected {name}" for name in sorted(unexpected))]
        raise CapsNetError(f"{source}: weights do not fit the model config "
                           f"({', '.join(names)[:200]})")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CapsNetError(f"{source}: weights do not fit the model config ({name} is "
                               f"{tuple(state[name].shape)} in the file, "
                               f"{tuple(tensor.shape)} in the model)")
        check_weight(name, state[name], tensor.dtype, source)


def check_weight(name: str, stored: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    """Refuse a stored weight of another kind than the model's ``dtype``, or one that holds
    NaN or infinity: int8 weights of the right shapes would load and make every prediction
    alike, NaN ones would predict NaN."""
    if dtype.is_floating_point and stored.dtype not in WEIGHT_DTYPES:
        raise CapsNetError(f"{source}: weight {name} is {dtype_name(stored.dtype)}, not floating "
                           f"point ({', '.join(map(dtype_name, WEIGHT_DTYPES))})")
    if not dtype.is_floating_point and stored.dtype != dtype:
        raise CapsNetError(f"{source}: weight {name} is {dtype_name(stored.dtype)}, not "
                           f"{dtype_name(dtype)}")
    if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
        raise CapsNetError(f"{source}: weight {name} holds NaN or infinite values")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` to ``folder`` (config.json and model.safetensors); returns the folder.
    The two files are replaced together: a failure leaves the previous pair (or none)."""
    folder = Path(folder)
    check_precision_kept(folder / WEIGHTS, dtype or torch.float32)
    config = {"format": FORMAT, "version": VERSION, "architecture": architecture_of(model),
              "model_config": model.config.to_dict(),
              **labels_of(model), "dtype": str(dtype or torch.float32).removeprefix("torch.")}
    write_together(folder, {WEIGHTS: weights_bytes(model, dtype),
                            CONFIG: (json.dumps(config, indent=2) + "\n").encode()})
    return folder


def check_precision_kept(path: Path, dtype: torch.dtype) -> None:
    """Refuse to replace the weights at ``path`` by a less precise copy (``dtype``): saving a
    model back into the folder it came from in float16 would lose the float32 weights."""
    from safetensors import safe_open

    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = {f.get_slice(key).get_dtype() for key in f.keys()}
    except Exception:  # noqa: BLE001 - not a weights file we can read: replaced like any other
        return
    bits = max((SAFETENSORS_FLOAT_BITS.get(name, 0) for name in stored), default=0)
    if bits > torch.finfo(dtype).bits:
        raise CapsNetError(f"{path} holds float{bits} weights; writing {dtype_name(dtype)} ones "
                           f"over them would lose precision: save to another folder")


def write_together(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into ``folder``, all or none. A new folder is written
    as a hidden sibling and renamed into place. In an existing one, every file is written
    and synced first, then each is renamed over the old one, which is kept until all are in
    place and put back if one rename fails; the folder's other files are left alone."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise CapsNetError(f"cannot write {folder}: it is not a folder")
    for name in files:
        target = folder / name
        if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
            raise CapsNetError(f"cannot write {target}: it exists and is not a regular file")
    try:
        if folder.is_dir():
            replace_files(folder, files)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            make_folder(folder, files)
    except OSError as exc:
        raise CapsNetError(f"could not write {folder}: {exc.strerror or exc}; no file there was "
                           f"changed") from None


def make_folder(folder: Path, files: dict[str, bytes]) -> None:
    """``folder`` (absent) holding ``files``, made whole beside it and renamed into place."""
    staging = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        for name, data in files.items():
            write_synced(staging / name, data)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_files(folder: Path, files: dict[str, bytes]) -> None:
    """Put ``files`` into the existing ``folder``: written first, then renamed into place,
    the old ones restored if a rename fails."""
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    new = {name: folder / f".{name}.{token}.tmp" for name in files}
    old = {name: folder / f".{name}.{token}.old" for name in files if (folder / name).is_file()}
    placed: list[str] = []
    try:
        for name, data in files.items():
            write_synced(new[name], data)
        for name, kept in old.items():
            keep_copy(folder / name, kept)
        for name in files:
            os.replace(new[name], folder / name)
            placed.append(name)
    except BaseException:
        for name in reversed(placed):
            if name in old:
                os.replace(old[name], folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        raise
    finally:
        for path in (*new.values(), *old.values()):
            path.unlink(missing_ok=True)


def write_synced(path: Path, data: bytes) -> None:
    """A new file ``path`` holding ``data``, on disk (0666 less the umask)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def keep_copy(path: Path, copy: Path) -> None:
    """``copy`` holding what ``path`` holds: a hard link, or where the file system has none,
    a copy. ``path`` itself stays in place."""
    try:
        os.link(path, copy)
    except OSError:
        shutil.copy2(path, copy)


def read_model(source: str | os.PathLike) -> Stored:
    """The model ``source`` stands for, read and checked: a shipped model's name (a str in
    :data:`SHIPPED`; write ``./mnist`` for a folder of that name), a run folder (its best.pt,
    else last.pt), a checkpoint file, a folder written by :func:`save_pretrained`, or a
    safetensors file."""
    if isinstance(source, str) and source in SHIPPED:
        shipped = resources.files("capsnet").joinpath("pretrained", source, WEIGHTS)
        return weights_of(Path(str(shipped)), dataset=SHIPPED[source])
    path = model_file(Path(source))
    if is_safetensors(path):
        return weights_of(path)
    return checkpoint_of(read_checkpoint(path), path)


def model_file(path: Path) -> Path:
    """``path`` itself, or the model file in the folder ``path``."""
    if not path.exists():
        raise CapsNetError(f"{path}: no such file or folder, nor a shipped model; {ACCEPTED}")
    if not path.is_dir():
        return path
    for name in (*RUN_CHECKPOINTS, WEIGHTS):
        if (path / name).is_file():
            return path / name
    raise CapsNetError(f"{path}: a folder without a model (no {', '.join(RUN_CHECKPOINTS)} or "
                       f"{WEIGHTS}); {ACCEPTED}")


def is_safetensors(path: Path) -> bool:
    """Whether the file is safetensors rather than a checkpoint: by its name, else by its
    first bytes (torch.save writes a zip archive or a pickle; safetensors, an 8-byte header
    length and then the JSON header)."""
    if path.suffix in (".safetensors", ".pt", ".pth"):
        return path.suffix == ".safetensors"
    with reading(path, "model file"):
        with open(path, "rb") as f:
            head = f.read(9)
    if head.startswith(ZIP_MAGIC[:2]) or head.startswith(b"\x80"):
        return False
    if head[8:9] == b"{":
        return True
    raise CapsNetError(f"{path}: neither a checkpoint nor a safetensors file; {ACCEPTED}")


def weights_of(path: Path, dataset: str | None = None) -> Stored:
    """What a capsnet safetensors file holds."""
    config, state, labels, architecture = read_weights(path)
    return Stored(path, config, state, labels, architecture, dataset=dataset)


def checkpoint_of(payload: dict[str, Any], path: Path) -> Stored:
    """What a checkpoint's ``payload`` (read and checked) holds."""
    return Stored(path, payload["model_config"], payload["model"],
                  {k: payload[k] for k in ("class_names", "prepare", "crop_from") if k in payload},
                  payload.get("architecture", "capsnet"), payload.get("train_config"))


def built(stored: Stored, architectures: dict[str, tuple[type, type]]) -> Any:
    """The model ``stored`` describes, with its class names and preparation; it must be one of
    ``architectures`` (name -> (model class, its config class))."""
    if stored.architecture not in architectures:
        raise CapsNetError(f"{stored.path}: holds a {short(stored.architecture)} model, not a "
                           f"{' or '.join(architectures)}")
    model = build(*architectures[stored.architecture], stored.config, stored.state,
                  str(stored.path))
    labels = check_labels(stored.labels, model.config.num_classes, str(stored.path))
    model.class_names, model.prepare = labels["class_names"], labels["prepare"]
    model.crop_from = check_crop_from(stored.labels, model.config.image_size, str(stored.path))
    return model
