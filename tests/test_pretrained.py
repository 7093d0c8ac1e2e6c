"""Trained models as files: save_pretrained / from_pretrained, the shipped MNIST model, export
and torch.hub agree."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet import CapsNet, CapsNetConfig, capsnet_mnist, count_parameters
from capsnet.cli import main
from capsnet.data import Split, batches, load_splits
from capsnet.errors import CapsNetError
from capsnet.nn.baseline import ARCHITECTURE, BaselineCNN, BaselineConfig
from capsnet.nn.pretrained import build, read_weights
from capsnet.tools.export import export_model
from capsnet.utils.images import load_image
from capsnet.training.checkpoint import load_trained, save_checkpoint

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


def test_a_model_trained_on_crops_prepares_images_as_its_evaluation_cut_them(
        tmp_path: Path) -> None:
    """A model of 20x20 crops of 26x26 images makes a user's image 26x26 and takes its
    centre, as evaluation crops; the files keep that, and bad stored values are one line."""
    model = small_model()
    model.crop_from = 26
    image = np.random.default_rng(0).random((40, 40, 3))
    whole = load_image(image, 26, 1, preprocess=False)  # (1, 26, 26)
    expected = next(batches(Split(torch.from_numpy(whole)[None], torch.zeros(1, dtype=torch.long)),
                            1, crop=20))[0][0]
    assert torch.equal(torch.from_numpy(model.prepare_image(image, preprocess=False)), expected)
    assert torch.equal(model.preprocess(image)[0], expected)  # prepare "resize"
    model.save_pretrained(tmp_path / "m")
    assert CapsNet.from_pretrained(tmp_path / "m").crop_from == 26
    assert CapsNet.from_pretrained(tmp_path / "m" / "model.safetensors").crop_from == 26
    assert small_model().crop_from == 0  # whole images, as every file from before crops
    for bad in (20, 5000, "26", True, 26.0):
        model.crop_from = bad
        model.save_pretrained(tmp_path / "bad")
        with pytest.raises(CapsNetError, match=r"bad/model.safetensors: the stored crop_from "
                                               r"must be 0 or a side from 21 to 4096, got "):
            CapsNet.from_pretrained(tmp_path / "bad")
        shutil.rmtree(tmp_path / "bad")


def test_a_built_model_owns_float32_copies_of_the_stored_weights() -> None:
    """The stored weights become the parameters with no random initialisation first (the
    caller's random state is left as it was): copied (the caller's tensors stay its own),
    contiguous and float32 whatever was stored, and trainable."""
    model = small_model()
    state = {name: tensor.half() for name, tensor in model.state_dict().items()}
    state["digits.weight"] = state["digits.weight"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not state["digits.weight"].is_contiguous()
    random_state = torch.random.get_rng_state()
    built = build(CapsNet, CapsNetConfig, SMALL.to_dict(), state, "m")
    assert torch.equal(torch.random.get_rng_state(), random_state)
    for name, tensor in built.state_dict().items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert torch.equal(tensor, state[name].float()), name
    assert all(p.requires_grad for p in built.parameters())
    state["digits.weight"].zero_()
    assert built.digits.weight.abs().sum() > 0


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
    (config_a, state_a, labels_a, arch_a), (config_b, state_b, labels_b, arch_b) = stored
    assert config_a == config_b and labels_a == labels_b and arch_a == arch_b == "capsnet"
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_shipped_mnist_model() -> None:
    model = CapsNet.from_pretrained("mnist")
    # The paper preset's network: the notebook's 8,215,568 and the routing bias (10 x 16)
    assert count_parameters(model) == 8_215_728 and model.config.routing_bias
    assert model.class_names == tuple("0123456789")
    size = (REPO / "src/capsnet/pretrained/mnist/model.safetensors").stat().st_size
    assert size <= 17e6
    summary = json.loads((REPO / "src/capsnet/pretrained/mnist/summary.json").read_text())
    assert summary["shipped"]["weights"] == "float16" and summary["shipped"]["test_accuracy"] > 0.99
    # A bright vertical stroke, as MNIST writes a one.
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 5:23, 13:16] = 1.0
    with torch.no_grad():
        assert model(image).predictions.item() == 1


@pytest.mark.slow
def test_predict_with_the_shipped_model_needs_no_training(tmp_path: Path) -> None:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:23, 13:16] = 255
    Image.fromarray(pixels).save(tmp_path / "one.png")
    done = subprocess.run([CAPSNET, "predict", "--model", "mnist", str(tmp_path / "one.png")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAPSNET_DATA_DIR": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'one.png'}: 1  lengths ")


# Stores each registered network, loads it back as `capsnet predict` does and predicts an
# image, routing in the CPU kernels where they build; says which of torch.compile's front end
# (torch._dynamo) and sympy, which its symbolic shapes use, were imported.
LOAD_AND_PREDICT = """
import sys, tempfile, torch
from capsnet.nn.registry import MODELS, load_model, model_config
for name, entry in MODELS.items():
    folder = tempfile.mkdtemp()
    entry.model(model_config(name)).save_pretrained(folder)
    load_model(folder).predict(torch.rand(2, 1, 28, 28))
print([module for module in ("torch._dynamo", "sympy") if module in sys.modules])
"""


def test_loading_and_predicting_leave_torch_compile_unloaded() -> None:
    """Importing torch._dynamo and sympy takes about 2 s, a third of `capsnet predict`:
    neither building a stored model (on the meta device first) nor the routing kernels load
    them."""
    done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_torch_hub_loads_the_shipped_model() -> None:
    model = torch.hub.load(str(REPO), "capsnet_mnist", source="local", pretrained=True)
    shipped = CapsNet.from_pretrained("mnist")
    for name, tensor in shipped.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    fresh = torch.hub.load(str(REPO), "capsnet_mnist", source="local", pretrained=False,
                           routing_iterations=3)
    assert fresh.config.routing_iterations == 3
    assert runpy.run_path(str(REPO / "hubconf.py"))["capsnet_mnist"] is capsnet_mnist


def test_every_kind_of_model_loads_the_same_weights_and_predictions(
        model_kinds: dict[str, str], tiny_dataset: Path) -> None:
    images = load_splits(str(tiny_dataset), val_size=40).test.images[:8].float() / 255
    shipped = CapsNet.from_pretrained("mnist")
    with torch.no_grad():
        expected = shipped(images)
    for kind, source in model_kinds.items():
        model = CapsNet.from_pretrained(source)
        assert not model.training and model.class_names == tuple("0123456789"), kind
        assert model.prepare == "mnist" and model.config == shipped.config, kind
        for name, tensor in shipped.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), f"{kind}: {name}"
        with torch.no_grad():
            out = model(images)
        assert torch.equal(out.predictions, expected.predictions), kind
        assert torch.equal(out.lengths, expected.lengths), kind


def test_what_a_model_records_about_its_data(model_kinds: dict[str, str],
                                             tiny_dataset: Path) -> None:
    """A run's settings and data set come with it; a shipped model's data set is its name;
    a save_pretrained folder records none, so a data set must be given."""
    run = load_trained(model_kinds["run folder"])
    assert run.config.dataset == str(tiny_dataset) and run.config.preset == "seed"
    assert load_trained("mnist").config.dataset == "mnist"
    with pytest.raises(CapsNetError, match="does not record the data set .* --dataset"):
        load_trained(model_kinds["save_pretrained folder"])
    given = load_trained(model_kinds["save_pretrained folder"], str(tiny_dataset), val_size=40)
    assert (given.config.dataset, given.config.val_size) == (str(tiny_dataset), 40)
    assert load_trained(model_kinds["safetensors file"], need_dataset=False).config is None


def test_a_safetensors_file_is_known_by_its_bytes(model_kinds: dict[str, str],
                                                  tmp_path: Path) -> None:
    shutil.copy(model_kinds["safetensors file"], tmp_path / "weights.bin")
    shutil.copy(model_kinds["checkpoint"], tmp_path / "weights.ckpt")
    for name in ("weights.bin", "weights.ckpt"):
        model = CapsNet.from_pretrained(tmp_path / name)
        assert model.config.num_classes == 10 and model.class_names[9] == "9"


def test_a_run_of_another_architecture_is_refused(tmp_path: Path) -> None:
    cnn = BaselineCNN(BaselineConfig(conv_channels=(4,), hidden=(8,)))
    save_checkpoint(tmp_path / "best.pt", {"architecture": ARCHITECTURE, "model": cnn.state_dict(),
                                           "model_config": cnn.config.to_dict()})
    with pytest.raises(CapsNetError, match="best.pt: holds a 'baseline-cnn' model, not a capsnet"):
        CapsNet.from_pretrained(tmp_path)


ACCEPTED = re.escape("a model is a run folder (its best.pt), a checkpoint (.pt), a save_pretrained "
                     "folder, a .safetensors file or a shipped model's name (mnist)")


def test_bad_pretrained_sources_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CapsNetError, match=f"nothing: no such file or folder, nor a shipped "
                                           f"model; {ACCEPTED}"):
        CapsNet.from_pretrained(tmp_path / "nothing")
    with pytest.raises(CapsNetError, match=f"a folder without a model .*; {ACCEPTED}"):
        CapsNet.from_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model at all")
    with pytest.raises(CapsNetError, match=f"neither a checkpoint nor a safetensors file; "
                                           f"{ACCEPTED}"):
        CapsNet.from_pretrained(tmp_path / "notes.txt")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(CapsNetError, match="x.safetensors: not a valid safetensors file"):
        CapsNet.from_pretrained(tmp_path / "x.safetensors")
    with pytest.raises(CapsNetError, match="mnist: no such file or folder"):
        CapsNet.from_pretrained(Path("mnist"))  # a path, never a name


def test_version(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("capsnet ")
