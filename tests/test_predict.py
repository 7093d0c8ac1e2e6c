"""Prediction as a user meets it: ``model.preprocess`` / ``model.predict`` from Python on any
kind of image, the none-of-these answer, and ``capsnet predict`` on many files at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from capsnet import CapsNet, load_model
from capsnet.cli import main
from capsnet.errors import CapsNetError
from capsnet.nn.prediction import PRESENT, predictions


@pytest.fixture(scope="module")
def model() -> CapsNet:
    return CapsNet.from_pretrained("mnist")


def drawn_seven(size: int = 280) -> Image.Image:
    """A thick dark 7 on white paper, as a person would draw it."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    s = size / 28
    draw.line([(7 * s, 7 * s), (21 * s, 7 * s), (12 * s, 23 * s)], fill=0, width=int(2.5 * s))
    return image


def test_none_of_these_when_no_capsule_reaches_one_half() -> None:
    lengths = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.49, 0.1], [0.5, 0.2, 0.1]])
    first, second, third = predictions(lengths, ("a", "b", "c"))
    assert (first.label, first.index) == ("b", 1)
    assert (second.label, second.index) == (None, None)
    assert second.confidence == pytest.approx(0.49) and PRESENT == 0.5
    assert third.label == "a"  # exactly one half counts as present
    assert second.top(2) == [("b", pytest.approx(0.49)), ("a", pytest.approx(0.3))]
    assert json.loads(json.dumps(second.to_dict(top_k=1)))["class"] is None


def test_damaged_outputs_are_refused_not_answered() -> None:
    with pytest.raises(CapsNetError, match="not finite"):
        predictions(torch.tensor([[float("nan"), 0.2]]), ("a", "b"))


def test_every_kind_of_image_is_prepared_alike(model: CapsNet, tmp_path: Path) -> None:
    image = drawn_seven()
    path = tmp_path / "seven.png"
    image.save(path)
    pixels = np.array(image)
    kinds = [str(path), path, image, pixels, pixels.astype(np.float32) / 255,
             torch.from_numpy(pixels), torch.from_numpy(pixels).float()[None] / 255]
    batches = [model.preprocess(kind) for kind in kinds]
    for batch in batches:
        assert batch.shape == (1, 1, 28, 28) and batch.dtype == torch.float32
        torch.testing.assert_close(batch, batches[0], atol=1e-6, rtol=0)
    assert model.preprocess(kinds).shape == (len(kinds), 1, 28, 28)


def test_predict_reads_a_drawn_digit_with_its_class_name(model: CapsNet) -> None:
    [answer] = model.predict(drawn_seven())
    assert answer.label == "7" and answer.index == 7 and answer.confidence >= PRESENT
    assert list(answer.lengths) == [str(i) for i in range(10)]
    prepared = model.preprocess([drawn_seven(), drawn_seven(140)])
    assert [p.label for p in model.predict(prepared)] == ["7", "7"]


def test_noise_is_none_of_the_digits(model: CapsNet) -> None:
    noise = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    [answer] = model.predict(torch.from_numpy(noise)[None, None])  # as it is, not prepared
    assert answer.label is None and answer.confidence < PRESENT


def test_a_bad_image_from_python_is_one_line_naming_it(model: CapsNet) -> None:
    with pytest.raises(CapsNetError, match="image 1"):
        model.preprocess([drawn_seven(), np.zeros((5, 5, 7))])
    with pytest.raises(CapsNetError, match="no images"):
        model.preprocess([])


def test_load_model_loads_the_shipped_model() -> None:
    assert type(load_model("mnist")) is CapsNet


# -- the command ----------------------------------------------------------------------------

@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    drawn_seven().save(folder / "a.png")
    drawn_seven(100).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_one_bad_file_does_not_stop_the_others(images: Path, capsys) -> None:
    bad = images / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    code = main(["predict", "mnist", str(images / "a.png"), str(bad), str(images / "b.jpg")])
    out, err = capsys.readouterr()
    assert code == 2
    assert [line.split(":")[0] for line in out.splitlines()] == [
        str(images / "a.png"), str(images / "b.jpg")]
    assert err.count("\n") == 1 and str(bad) in err


def test_folders_globs_top_k_and_options_anywhere(images: Path, capsys) -> None:
    assert main(["predict", str(images / "a.png"), "--model", "mnist", str(images),
                 str(images / "*.jpg"), "--top-k", "2", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["image"]).name for r in results] == ["a.png", "a.png", "b.jpg", "b.jpg"]
    for r in results:
        assert r["class"] == "7" and r["prediction"] == 7 and len(r["top"]) == 2
        assert r["top"][0][0] == "7" and len(r["lengths"]) == 10


def test_a_pattern_or_folder_that_names_nothing_is_reported(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["predict", "mnist", str(tmp_path / "empty"), str(tmp_path / "*.png")])
    _, err = capsys.readouterr()
    assert code == 2 and "without image files" in err and "no file matches" in err


def test_the_text_output_says_none(tmp_path: Path, capsys) -> None:
    path = tmp_path / "noise.npy"
    np.save(path, np.random.default_rng(1).random((28, 28)).astype(np.float32))
    assert main(["predict", "mnist", str(path), "--no-preprocess", "--top-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: none  top ") and len(line.split("top ")[1].split()) == 6
