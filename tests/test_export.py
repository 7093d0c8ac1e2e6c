"""Export to ONNX, safetensors and TorchScript: the exported models agree with PyTorch."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
import torch

from capsnet.training.checkpoint import save_checkpoint
from capsnet.cli import main
from capsnet.errors import CapsNetError
from capsnet.tools.export import (DEFAULT_OPSET, FORMATS, InferenceWrapper, export_model,
                                   load_safetensors)
from capsnet.nn.efficient import EfficientCapsNet, EfficientCapsNetConfig
from capsnet.nn.em_routing import EMCapsNet, EMCapsNetConfig
from capsnet.nn.model import CapsNet, CapsNetConfig

# Measured differences to PyTorch are ~1e-7 (float32 rounding in a different order of
# operations); 1e-5 leaves room for other CPUs and onnxruntime versions.
ATOL = 1e-5

# Two channels, four classes, three routing iterations: not the defaults, so the
# exported graph cannot lean on them.
SMALL = CapsNetConfig(image_size=16, in_channels=2, num_classes=4, conv1_channels=8,
                      conv1_kernel=5, primary_maps=4, primary_dim=4, primary_kernel=5,
                      digit_dim=6, routing_iterations=3, decoder_hidden=(16,))


# The other routings, as small and as far from their defaults: Efficient-CapsNet, and EM
# capsules with 2 iterations, without a decoder (as trained here) and with one.
EM = EMCapsNetConfig(image_size=16, in_channels=2, num_classes=4, conv1_channels=8,
                     primary_types=3, caps1_types=4, caps2_types=5, routing_iterations=2)
OTHERS = {
    "efficient-capsnet": (EfficientCapsNet, EfficientCapsNetConfig(
        image_size=16, in_channels=2, num_classes=4, conv_channels=(6, 8), conv_kernels=(5, 3),
        conv_strides=(1, 2), primary_maps=2, primary_dim=4, primary_kernel=3, digit_dim=6,
        decoder_hidden=(16,))),
    "em-capsnet": (EMCapsNet, EM),
    "em-capsnet with a decoder": (EMCapsNet, replace(EM, decoder_hidden=(16,))),
}


def make_checkpoint(folder: Path, config: CapsNetConfig, seed: int = 0) -> tuple[Path, CapsNet]:
    torch.manual_seed(seed)
    model = CapsNet(config).eval()
    path = folder / "model.pt"
    save_checkpoint(path, {"model_config": config.to_dict(), "model": model.state_dict()})
    return path, model


def images_for(config: CapsNetConfig, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    c, s = config.in_channels, config.image_size
    return torch.rand(batch, c, s, s, generator=generator)


def reference(model: CapsNet, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return InferenceWrapper(model).eval()(images)


def assert_agree(got: tuple, want: tuple[torch.Tensor, ...]) -> None:
    """lengths, predictions and reconstructions (where the model has them) agree."""
    got = tuple(torch.as_tensor(g) for g in got)
    assert len(got) == len(want)
    lengths, predictions, *reconstructions = got
    want_lengths, want_predictions, *want_rec = want
    assert lengths.shape == want_lengths.shape
    torch.testing.assert_close(lengths, want_lengths, atol=ATOL, rtol=0)
    assert torch.equal(predictions, want_predictions)
    for rec, want_r in zip(reconstructions, want_rec):
        torch.testing.assert_close(rec, want_r, atol=ATOL, rtol=0)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small(module_tmp: Callable[[str], Path]) -> tuple[Path, CapsNet]:
    return make_checkpoint(module_tmp("small"), SMALL)


# -- ONNX -------------------------------------------------------------------------------

def check_onnx(path: Path, model: CapsNet, batches: tuple[int, ...] = (1, 7)) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch
    assert any(node.op_type == "Einsum" for node in proto.graph.node)  # the model's own routing
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert CapsNetConfig.from_dict(json.loads(metadata["capsnet_model_config"])) == model.config
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["lengths", "predictions", "reconstructions"]
    for seed, batch in enumerate(batches):
        images = images_for(model.config, batch, seed)
        assert_agree(session.run(None, {"images": images.numpy()}), reference(model, images))


def test_onnx_via_cli_agrees_with_pytorch(small, tmp_path, capsys) -> None:
    pytest.importorskip("onnxscript")
    checkpoint, model = small
    out = tmp_path / "sub" / "small.onnx"
    code, stdout, err = run_cli(capsys, "export", checkpoint, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert f"ONNX opset {DEFAULT_OPSET}" in stdout and "0 predictions differ" in stdout
    check_onnx(out, model)
    assert os.listdir(out.parent) == ["small.onnx"]  # no temporary file left behind


def test_onnx_default_mnist_model(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    checkpoint, model = make_checkpoint(tmp_path, CapsNetConfig())
    result = export_model(checkpoint, tmp_path / "mnist.onnx", "onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff["lengths"] <= ATOL
    check_onnx(tmp_path / "mnist.onnx", model)


# -- safetensors ------------------------------------------------------------------------

def test_safetensors_round_trip(small, tmp_path, capsys) -> None:
    pytest.importorskip("safetensors")
    checkpoint, model = small
    out = tmp_path / "small.safetensors"
    code, stdout, err = run_cli(capsys, "export", checkpoint, "--format", "safetensors",
                                "--out", out)
    assert code == 0, err
    assert "read back identical" in stdout
    loaded = load_safetensors(out)
    assert loaded.config == model.config and not loaded.training
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    images = images_for(model.config, 5, seed=3)
    for a, b in zip(reference(loaded, images), reference(model, images)):
        assert torch.equal(a, b)

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "capsnet-safetensors"
    assert json.loads(metadata["model_config"]) == model.config.to_dict()


def test_load_safetensors_refuses_foreign_files(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    with pytest.raises(CapsNetError, match="no such file"):
        load_safetensors(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CapsNetError, match="not a valid safetensors file"):
        load_safetensors(garbage)
    foreign = tmp_path / "foreign.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CapsNetError, match="not a capsnet safetensors file"):
        load_safetensors(foreign)
    mismatched = tmp_path / "mismatched.safetensors"
    metadata = {"format": "capsnet-safetensors", "version": "1",
                "model_config": json.dumps(SMALL.to_dict())}
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(mismatched), metadata=metadata)
    with pytest.raises(CapsNetError, match="weights do not fit"):
        load_safetensors(mismatched)


# -- TorchScript ------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_agrees_with_pytorch(small, tmp_path, capsys) -> None:
    checkpoint, model = small
    out = tmp_path / "small.torchscript"
    code, stdout, err = run_cli(capsys, "export", checkpoint, "--format", "torchscript",
                                "--out", out)
    assert code == 0, err
    extra = {"capsnet_model_config.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["capsnet_model_config.json"]) == model.config.to_dict()
    for seed, batch in enumerate((1, 7)):
        images = images_for(model.config, batch, seed)
        with torch.no_grad():
            assert_agree(loaded(images), reference(model, images))


# -- files and errors -------------------------------------------------------------------

def test_files_are_replaced_whole_and_shareable(small, tmp_path, monkeypatch) -> None:
    pytest.importorskip("safetensors")
    checkpoint, _ = small
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous")
    old_umask = os.umask(0o022)
    try:
        export_model(checkpoint, out, "safetensors")
    finally:
        os.umask(old_umask)
    assert out.stat().st_mode & 0o777 == 0o644
    exported = out.read_bytes()

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CapsNetError, match="could not write .*No space left on device"):
        export_model(checkpoint, out, "safetensors", verify=False)
    assert out.read_bytes() == exported
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_export_model_rejects_bad_input(small, tmp_path) -> None:
    checkpoint, model = small
    with pytest.raises(CapsNetError, match="unknown export format 'pdf'"):
        export_model(checkpoint, tmp_path / "m.pdf", "pdf")
    with pytest.raises(CapsNetError, match="is a folder"):
        export_model(checkpoint, tmp_path, "torchscript")
    with pytest.raises(CapsNetError, match="opset applies to onnx only"):
        export_model(checkpoint, tmp_path / "m.safetensors", "safetensors", opset=20)
    pytest.importorskip("onnx")
    with pytest.raises(CapsNetError, match="opset 99 is out of range"):
        export_model(model, tmp_path / "m.onnx", "onnx", opset=99)


@pytest.mark.parametrize("make_argv, message", [
    (lambda d, ckpt: [ckpt, "--format", "pdf", "--out", d / "m.pdf"], "invalid choice: 'pdf'"),
    (lambda d, ckpt: [ckpt, "--out", d / "m.onnx"], "--format"),
    (lambda d, ckpt: [d / "missing.pt", "--format", "onnx", "--out", d / "m.onnx"],
     "missing.pt: no such file or folder"),
    (lambda d, ckpt: [d / "corrupt.pt", "--format", "torchscript", "--out", d / "m.ts"],
     "corrupt or truncated checkpoint"),
    (lambda d, ckpt: [ckpt, "--format", "torchscript", "--out", d], "is a folder"),
    (lambda d, ckpt: [ckpt, "--format", "onnx", "--out", d / "m.onnx", "--opset", "0"],
     "expected an integer >= 1"),
    (lambda d, ckpt: [ckpt, "--format", "torchscript", "--out", d / "blocker" / "m.ts"],
     "blocker is a file"),
])
def test_cli_bad_input_exits_2_with_one_line(small, tmp_path, capsys, make_argv, message) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip file")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    code, stdout, err = run_cli(capsys, "export", *make_argv(tmp_path, small[0]))
    assert code == 2
    assert err.startswith("capsnet: ") and err.count("\n") == 1 and message in err, err
    assert stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["blocker", "corrupt.pt"]  # nothing written


# -- the other routings -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", OTHERS)
def test_every_network_exports_to_every_format_and_keeps_its_predictions(
        name: str, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model_class, config = OTHERS[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    images = images_for(config, 5, seed=4)
    with torch.no_grad():  # as it runs in capsnet: in the fused operators where it has them
        out = model(images)
    names = ["lengths", "predictions"] + (["reconstructions"] if config.decoder_hidden else [])
    want = (out.lengths, out.predictions, out.reconstructions)[:len(names)]
    model.save_pretrained(tmp_path / "saved")
    for fmt in FORMATS:
        code, stdout, err = run_cli(capsys, "export", tmp_path / "saved", "--format", fmt,
                                    "--out", tmp_path / f"model.{fmt}")
        assert code == 0, err
        assert ("reconstructions" in stdout) == (fmt != "safetensors" and len(names) == 3)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    assert_agree(session.run(None, {"images": images.numpy()}), want)
    with torch.no_grad():
        assert_agree(torch.jit.load(str(tmp_path / "model.torchscript"))(images), want)
    loaded = load_safetensors(tmp_path / "model.safetensors")
    assert type(loaded) is model_class and loaded.config == config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
