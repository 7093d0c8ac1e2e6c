"""Trained models as files: save_pretrained / from_pretrained, the shipped MNIST model, export
and torch.hub agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet import CapsNet, CapsNetConfig, count_parameters
from capsnet.cli import main
from capsnet.errors import CapsNetError
from capsnet.nn.pretrained import read_weights
from capsnet.tools.export import export_model

REPO = Path(__file__).resolve().parent.parent
CAPSNET = str(Path(sys.executable).with_name("capsnet"))
SMALL = CapsNetConfig(image_size=20, conv1_channels=8, primary_maps=2, decoder_hidden=(16,),
                      num_classes=3)


def small_model() -> CapsNet:
    torch.manual_seed(0)
    model = CapsNet(SMALL).eval()
    model.class_names, model.prepare = ("cat", "dog", "eel"), "resize"
    return model


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = small_model()
    model.save_pretrained(tmp_path / "m")
    loaded = CapsNet.from_pretrained(tmp_path / "m")
    assert loaded.config == SMALL and not loaded.training
    assert (loaded.class_names, loaded.prepare) == (("cat", "dog", "eel"), "resize")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    readable = json.loads((tmp_path / "m" / "config.json").read_text())
    assert readable["model_config"] == SMALL.to_dict() and readable["class_names"][2] == "eel"


def test_half_precision_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    model = small_model()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("full", "half"))
    assert half < 0.55 * full
    loaded = CapsNet.from_pretrained(tmp_path / "half")
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(loaded.state_dict()[name], tensor.half().float())


def test_export_writes_what_save_pretrained_writes(tmp_path: Path) -> None:
    """The same tensors and metadata (safetensors orders metadata keys as it likes)."""
    model = small_model()
    model.save_pretrained(tmp_path / "m")
    export_model(model, tmp_path / "exported.safetensors", "safetensors")
    stored = [read_weights(path) for path in (tmp_path / "exported.safetensors",
                                              tmp_path / "m" / "model.safetensors")]
    (config_a, state_a, labels_a), (config_b, state_b, labels_b) = stored
    assert config_a == config_b and labels_a == labels_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_shipped_mnist_model() -> None:
    model = CapsNet.from_pretrained("mnist")
    assert count_parameters(model) == 8_215_568 and model.class_names == tuple("0123456789")
    size = (REPO / "src/capsnet/pretrained/mnist/model.safetensors").stat().st_size
    assert size <= 17e6
    summary = json.loads((REPO / "src/capsnet/pretrained/mnist/summary.json").read_text())
    assert summary["shipped"]["weights"] == "float16" and summary["shipped"]["test_accuracy"] > 0.99
    # A bright vertical stroke, as MNIST writes a one.
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 5:23, 13:16] = 1.0
    with torch.no_grad():
        assert model(image).predictions.item() == 1


def test_predict_with_the_shipped_model_needs_no_training(tmp_path: Path) -> None:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:23, 13:16] = 255
    Image.fromarray(pixels).save(tmp_path / "one.png")
    done = subprocess.run([CAPSNET, "predict", "--model", "mnist", str(tmp_path / "one.png")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAPSNET_DATA_DIR": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'one.png'}: 1  lengths ")


def test_torch_hub_loads_the_shipped_model() -> None:
    model = torch.hub.load(str(REPO), "capsnet_mnist", source="local", pretrained=True)
    shipped = CapsNet.from_pretrained("mnist")
    for name, tensor in shipped.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    fresh = torch.hub.load(str(REPO), "capsnet_mnist", source="local", pretrained=False,
                           routing_iterations=3)
    assert fresh.config.routing_iterations == 3


def test_bad_pretrained_sources_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CapsNetError, match="neither a shipped model"):
        CapsNet.from_pretrained(tmp_path / "nothing")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(CapsNetError, match="x.safetensors: not a valid safetensors file"):
        CapsNet.from_pretrained(tmp_path / "x.safetensors")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("capsnet ")
