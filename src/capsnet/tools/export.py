"""Export a trained capsule network for inference outside this package: ONNX, safetensors,
TorchScript. Every registered network exports (CapsNet, Efficient-CapsNet, EM capsules).

    capsnet export runs/mnist-paper --format onnx --out capsnet.onnx
    capsnet export mnist --format onnx --out capsnet.onnx      # any model load_model takes

ONNX and TorchScript hold :class:`InferenceWrapper`: images ``(batch, channels, size,
size)`` float32 in [0, 1] -> ``lengths`` ``(batch, classes)`` float32 (the class scores:
capsule lengths, or an EM network's class activations), ``predictions`` ``(batch,)`` int64
and, for a model with a decoder, ``reconstructions`` ``(batch, channels, size, size)``
float32, with a dynamic batch dimension. The graph is the model's own modules and weights,
routing einsums included (they export as ONNX ``Einsum``); layers that route in fused
operators route in torch's instead, so the file needs nothing of capsnet to run.

ONNX uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
which needs onnxscript). The TorchScript-based exporter also handles this model, but
PyTorch marks it for removal, so it is not used. The default opset is
:data:`DEFAULT_OPSET`, the highest that the exporter translates natively; recent
onnxruntime loads higher ones, which ``opset=`` (``--opset``) can ask for.

safetensors holds the state dict; its metadata carries the model config as JSON, so
:func:`load_safetensors` rebuilds the model without any other file.

Every file is written whole to a temporary file in the target folder and renamed over
the target, so a crash never leaves half a file. Only a regular file is ever replaced (a
FIFO, a device such as /dev/null, or a link to one, is refused before the export starts;
a link to a regular file is replaced, its target left as it was), and never the model
being exported. Unless ``verify=False``, the written model is run on a few random images
(onnxruntime, where installed) or read back, and compared with PyTorch before
``export_model`` returns.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CapsNetError, error_line
from ..utils.files import check_replaceable, same_file, write_or_fail
from ..utils.version import package_version
from ..nn.base import CapsuleModel
from ..nn.pretrained import SHIPPED, WEIGHTS, architecture_of, model_file, weights_bytes
from ..nn.registry import load_model

FORMATS = ("onnx", "safetensors", "torchscript")
DEFAULT_OPSET = 25  # the newest opset the torch.export-based exporter (onnxscript 0.7) converts natively
MIN_OPSET = 18      # the exporter's own opset; it converts the graph up from there
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ("lengths", "predictions", "reconstructions")  # the last: with a decoder
VERIFY_BATCH = 3      # differs from the tracing batch, so verification also checks the dynamic batch
VERIFY_TOLERANCE = 1e-4  # refuse an export whose lengths differ from PyTorch's by more
INSTALL_HINT = "pip install 'capsnet[export]'"


def output_names(model: CapsuleModel) -> tuple[str, ...]:
    """The exported outputs of ``model``: :data:`OUTPUT_NAMES`, without ``reconstructions``
    where it has no decoder."""
    return OUTPUT_NAMES if model.reconstructs else OUTPUT_NAMES[:2]


class InferenceWrapper(nn.Module):
    """The model as exported: ``images -> (lengths, predictions[, reconstructions])``, as
    :func:`output_names` says. The decoder reconstructs the top class (no labels at
    inference). Layers with fused routing operators (``fused``) route in torch from now on:
    the exported graph holds torch's operations only."""

    def __init__(self, model: CapsuleModel) -> None:
        super().__init__()
        self.model = model
        self.outputs = len(output_names(model))
        for module in model.modules():
            if hasattr(module, "fused"):
                module.fused = False

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        return (out.lengths, out.predictions, out.reconstructions)[:self.outputs]


@dataclass
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    opset: int | None = None
    # max abs difference to PyTorch per output on VERIFY_BATCH random images (None: not run)
    max_abs_diff: dict[str, float] | None = None
    verified_with: str | None = None
    notes: list[str] = field(default_factory=list)


def example_images(model: CapsuleModel, batch: int, seed: int = 0) -> Tensor:
    c, s = model.config.in_channels, model.config.image_size
    return torch.rand(batch, c, s, s, generator=torch.Generator().manual_seed(seed))


def capsnet_version() -> str:
    return package_version()


def config_json(model: CapsuleModel) -> str:
    return json.dumps(model.config.to_dict(), sort_keys=True)


def export_model(checkpoint: str | os.PathLike | CapsuleModel, out: str | os.PathLike, fmt: str,
                 *, opset: int | None = None, verify: bool = True) -> ExportResult:
    """Write the model ``checkpoint`` (a capsule network of capsnet, or anything
    :func:`capsnet.load_model` takes) to ``out`` in format ``fmt`` (see :data:`FORMATS`).

    Raises :class:`CapsNetError` for an unknown format, a bad checkpoint, a missing
    optional package, an ``out`` that is not a regular file or is the model itself, an
    unwritable ``out`` or an export that disagrees with PyTorch."""
    if fmt not in FORMATS:
        raise CapsNetError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise CapsNetError(f"an opset applies to onnx only, not {fmt}")
    out = Path(out)
    if out.is_dir():
        raise CapsNetError(f"{out} is a folder; give the path of the file to write")
    source = model_source(checkpoint)
    if source is not None and same_file(out, source):
        raise CapsNetError(f"{out} is the model being exported ({source}); name another file")
    try:  # fail before the (slow) export, not after it
        check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CapsNetError(f"could not write {out}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CapsNetError(f"could not write {out}: the folder {out.parent} is not writable")
    if isinstance(checkpoint, CapsuleModel):
        model = copy.deepcopy(checkpoint).eval()  # leave the caller's model where it is
    else:
        model = load_model(checkpoint)
    model = model.cpu().float()
    exporter = {"onnx": export_onnx, "safetensors": export_safetensors,
                "torchscript": export_torchscript}[fmt]
    kwargs: dict[str, Any] = {"opset": opset} if fmt == "onnx" else {}
    return exporter(model, out, verify=verify, **kwargs)


def model_source(checkpoint: str | os.PathLike | CapsuleModel) -> Path | None:
    """The file the model ``checkpoint`` is read from (as :func:`capsnet.load_model` reads
    it); None for a model in memory or a source that names no file."""
    if isinstance(checkpoint, CapsuleModel):
        return None
    if isinstance(checkpoint, str) and checkpoint in SHIPPED:
        return Path(str(resources.files("capsnet").joinpath("pretrained", checkpoint, WEIGHTS)))
    try:
        return model_file(Path(checkpoint))
    except CapsNetError:
        return None  # load_model says what is wrong with it


def max_abs_diffs(got: tuple[Any, ...], want: tuple[Tensor, ...], source: str) -> dict[str, float]:
    """Max abs difference per output (for ``predictions``: how many differ; reconstructions
    where the model has them, of the images predicted alike); raise if the lengths are off
    by more than :data:`VERIFY_TOLERANCE` or a prediction differs where PyTorch's two
    candidate classes are not tied within it."""
    got = tuple(torch.as_tensor(g) for g in got)
    if len(got) != len(want):
        raise CapsNetError(f"{source}: {len(got)} outputs, PyTorch {len(want)}")
    for name, g, w in zip(OUTPUT_NAMES, got, want):
        if g.shape != w.shape:
            raise CapsNetError(f"{source}: {name} has shape {tuple(g.shape)}, PyTorch {tuple(w.shape)}")
    lengths, predictions, *reconstructions = got
    want_lengths, want_predictions, *want_rec = want
    differ = predictions != want_predictions
    gap = (want_lengths.gather(1, predictions[:, None]) -
           want_lengths.gather(1, want_predictions[:, None])).abs().squeeze(1)
    diffs = {"lengths": (lengths.double() - want_lengths.double()).abs().max().item(),
             "predictions": float(differ.sum().item())}
    for rec, want_r in zip(reconstructions, want_rec):
        diffs["reconstructions"] = ((rec[~differ].double() - want_r[~differ].double()).abs()
                                    .max().item() if bool((~differ).any()) else 0.0)
    if not diffs["lengths"] <= VERIFY_TOLERANCE or bool((gap[differ] > VERIFY_TOLERANCE).any()):
        raise CapsNetError(f"{source}: the exported model disagrees with PyTorch (max |lengths "
                           f"difference| {diffs['lengths']:.3g}, {int(diffs['predictions'])} of "
                           f"{len(differ)} predictions differ)")
    return diffs


# -- ONNX -------------------------------------------------------------------------------

def export_onnx(model: CapsuleModel, out: Path, *, opset: int | None = None,
                verify: bool = True) -> ExportResult:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError as exc:
        raise CapsNetError(f"ONNX export needs the onnx and onnxscript packages "
                           f"({exc.name} is missing): {INSTALL_HINT}") from None
    max_opset = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= max_opset:
        raise CapsNetError(f"opset {opset} is out of range: this onnx writes opsets "
                           f"{MIN_OPSET} to {max_opset}")
    wrapper, names = InferenceWrapper(model).eval(), output_names(model)
    images = example_images(model, 2)  # not 1: torch.export would fix a batch of 1
    # quiet "torchvision is not installed", the opset converter's fallback notice and such
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (images,), None, dynamo=True, opset_version=opset, verbose=False,
                input_names=INPUT_NAMES, output_names=list(names),
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        proto = program.model_proto
    except Exception as exc:  # the exporter raises many kinds; keep the cause chained
        raise CapsNetError(f"ONNX export failed: {error_line(exc, 300)}") from exc
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    architecture = architecture_of(model)
    proto.doc_string = (f"capsnet {architecture}: images (batch, channels, size, size) in "
                        f"[0, 1] -> {', '.join(names)}")
    proto.producer_name, proto.producer_version = "capsnet", capsnet_version()
    for key, value in (("capsnet_architecture", architecture),
                       ("capsnet_model_config", config_json(model)),
                       ("capsnet_outputs", ",".join(names))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    result = ExportResult(out, "onnx", len(data), opset=opset)
    if verify:
        try:
            import onnxruntime
        except ImportError:
            result.notes.append(f"not verified: onnxruntime is not installed ({INSTALL_HINT})")
        else:
            images = example_images(model, VERIFY_BATCH, seed=1)
            try:
                session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
                got = session.run(list(names), {INPUT_NAMES[0]: images.numpy()})
            except Exception as exc:  # e.g. an onnxruntime too old for the opset
                raise CapsNetError(f"onnxruntime {onnxruntime.__version__} cannot run the "
                                   f"exported model ({error_line(exc, 300)}); try a lower --opset "
                                   f"or --no-verify") from exc
            with torch.no_grad():
                want = wrapper(images)
            result.max_abs_diff = max_abs_diffs(tuple(got), want, f"{out} (onnxruntime)")
            result.verified_with = f"onnxruntime {onnxruntime.__version__}"
    write_or_fail(out, data)
    return result


# -- safetensors ------------------------------------------------------------------------

def export_safetensors(model: CapsuleModel, out: Path, *, verify: bool = True) -> ExportResult:
    """The file ``save_pretrained`` writes as model.safetensors."""
    data = weights_bytes(model)
    write_or_fail(out, data)
    result = ExportResult(out, "safetensors", len(data))
    if verify:
        state = model.state_dict()
        loaded = load_safetensors(out).state_dict()
        if loaded.keys() != state.keys() or not all(torch.equal(loaded[k], v) for k, v in state.items()):
            raise CapsNetError(f"{out}: the written weights do not read back the same")
        result.max_abs_diff = {"weights": 0.0}
        result.verified_with = "read back"
    return result


def load_safetensors(path: str | os.PathLike) -> nn.Module:
    """The model (eval mode, CPU) stored by ``capsnet export --format safetensors``, of
    whichever architecture it holds."""
    return load_model(Path(path))


# -- TorchScript ------------------------------------------------------------------------

def export_torchscript(model: CapsuleModel, out: Path, *, verify: bool = True) -> ExportResult:
    wrapper = InferenceWrapper(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated (it says so on every call) but still works; the routing
        # loop has a fixed number of iterations, so tracing records all of it.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example_images(model, 2),), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"capsnet_model_config.json": config_json(model)})
        data = buffer.getvalue()
        result = ExportResult(out, "torchscript", len(data))
        if verify:
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
            images = example_images(model, VERIFY_BATCH, seed=1)
            result.max_abs_diff = max_abs_diffs(tuple(loaded(images)), wrapper(images),
                                                f"{out} (TorchScript)")
            result.verified_with = "torch.jit.load"
    write_or_fail(out, data)
    return result
