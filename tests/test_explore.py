"""``capsnet explore``: the JSON API against a trained model, and the page in headless Chromium.

The browser tests need the ``playwright`` Python package and a Chromium at
``$CAPSNET_CHROMIUM`` (default ``/usr/bin/chromium``, Debian's ``chromium``); they are
skipped when either is missing. Playwright never downloads a browser here.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from capsnet.cli import build_parser, main
from capsnet.training.config import make_config
from capsnet.cli.tools import run_explore
from capsnet.tools.explore import MAX_BODY_BYTES, ExploreServer, make_server
from capsnet.nn.layers import safe_norm
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.training.trainer import train
from conftest import serving
from test_folders import SHAPES, write_shapes

# Every test here uses a model trained for the module (about 25 s) or drives Chromium.
pytestmark = pytest.mark.slow

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
CHROMIUM = Path(os.environ.get("CAPSNET_CHROMIUM", "/usr/bin/chromium"))
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

BROWSER_MISSING = ("the playwright package is not installed" if sync_playwright is None else
                   f"no Chromium at {CHROMIUM} (apt-get install chromium)"
                   if not CHROMIUM.is_file() else None)
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None,
                                   reason=f"browser tests skipped: {BROWSER_MISSING}")


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(module_tmp: Callable[[str], Path], tiny_dataset: Path) -> Path:
    """A model trained to 100% on the tiny data set (about 15 s)."""
    run_dir = module_tmp("explore-run")
    config = make_config("paper", dataset=str(tiny_dataset), epochs=3, batch_size=32,
                         val_size=40, device="cpu", max_shift=0)
    summary = train(config, run_dir, show_progress=False)
    assert summary["test_accuracy"] == 1.0
    return Path(summary["checkpoint"])


@pytest.fixture(scope="module")
def server(checkpoint: Path, tiny_dataset: Path) -> Iterator[ExploreServer]:
    with serving(make_server(checkpoint, "127.0.0.1", 0, dataset=str(tiny_dataset))) as running:
        yield running


@pytest.fixture(scope="module")
def shapes(module_tmp: Callable[[str], Path]) -> Path:
    """Colour images of three shapes in class folders, with train/, val/ and test/."""
    return write_shapes(module_tmp("shapes"), {"train": 3, "val": 2, "test": 3})


@pytest.fixture(scope="module")
def shapes_server(module_tmp: Callable[[str], Path], shapes: Path
                  ) -> Iterator[ExploreServer]:
    """An untrained colour model of the shapes, prepared by resizing, with its test images:
    no capsule reaches 0.5 for any image, and every reconstruction is red."""
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(image_size=24, in_channels=3, num_classes=3))
    model.class_names, model.prepare = SHAPES, "resize"
    with torch.no_grad():  # reconstructions in red, where an untrained decoder gives gray
        model.decoder[-2].bias.copy_(torch.tensor([2.0, -2.0, -2.0]).repeat_interleave(24 * 24))
    folder = model.save_pretrained(module_tmp("shapes-model") / "shapes-model")
    with serving(make_server(folder, "127.0.0.1", 0, dataset=str(shapes))) as running:
        yield running


@pytest.fixture(scope="module")
def server_without_data(checkpoint: Path, module_tmp: Callable[[str], Path]
                        ) -> Iterator[ExploreServer]:
    missing = module_tmp("no-data") / "missing"
    with serving(make_server(checkpoint, "127.0.0.1", 0, dataset=str(missing))) as running:
        yield running


def request(server: ExploreServer, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """``(status, decoded JSON)`` of one request; ``body`` is JSON-encoded unless bytes."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(data)
    finally:
        connection.close()


def blank(size: int = 28) -> list[list[float]]:
    return [[0.0] * size for _ in range(size)]


def bar_image(size: int = 28, row: int = 10) -> list[list[float]]:
    image = np.zeros((size, size))
    image[row:row + 3, 6:size - 6] = 1.0
    return image.tolist()


# -- API --------------------------------------------------------------------------------------

def test_info_describes_the_model(server: ExploreServer) -> None:
    status, info = request(server, "GET", "/api/info")
    assert status == 200
    assert info["classes"] == 10 and info["digit_dim"] == 16
    assert (info["primary_grid"], info["primary_maps"], info["image_size"]) == (6, 32, 28)
    assert info["class_names"] == [str(i) for i in range(10)]


def test_a_colour_model_speaks_its_class_names(shapes_server: ExploreServer) -> None:
    status, info = request(shapes_server, "GET", "/api/info")
    assert status == 200 and info["class_names"] == list(SHAPES)
    assert (info["prepare"], info["present"], info["in_channels"]) == ("resize", 0.5, 3)
    assert not info["shipped"] and info["checkpoint"].endswith("shapes-model")
    status, sample = request(shapes_server, "GET", "/api/sample?index=4")
    assert status == 200 and sample["label_name"] == SHAPES[sample["label"]]
    image = np.asarray(sample["image"])
    assert image.shape == (3, 24, 24) and not np.allclose(image[0], image[1])  # in colour
    status, result = request(shapes_server, "POST", "/api/predict", {"image": sample["image"]})
    assert status == 200 and result["input"] == sample["image"]
    assert np.asarray(result["reconstruction"]).shape == (3, 24, 24)
    assert result["class_name"] == SHAPES[result["prediction"]]
    assert result["none"] is True and max(result["lengths"]) < 0.5
    pixels = image.ravel().tolist()  # the same image as a flat list of its three channels
    _, flat = request(shapes_server, "POST", "/api/predict", {"pixels": pixels})
    assert flat["lengths"] == result["lengths"]


def test_a_drawing_is_resized_for_a_model_that_resizes(shapes_server: ExploreServer) -> None:
    drawing = np.zeros((48, 48))
    drawing[:12, :12] = 1.0  # a square in the top left corner stays there: not centred
    status, result = request(shapes_server, "POST", "/api/predict",
                             {"image": drawing.tolist(), "preprocess": True})
    assert status == 200
    seen = np.asarray(result["input"])
    assert seen.shape == (3, 24, 24) and np.array_equal(seen[0], seen[2])  # gray in colour
    assert seen[0, :5, :5].min() > 0.9 and seen[0, 8:, 8:].max() < 0.1


@pytest.mark.parametrize("body, message", [
    ({"image": [blank(24)] * 2}, "image has 2 channels (CxHxW); the model takes 3"),
    ({"image": [blank(24)] * 3, "preprocess": True}, "preprocess takes a one-channel drawing"),
    ({"image": [blank(24), blank(24), blank(20)]}, "channels must all have the same size"),
    ({"image": [blank(24), blank(24), [[0.5, "x"]]]}, "image channel 2 must hold only numbers"),
    ({"pixels": [0.0] * (2 * 24 * 24)}, "pixels must hold 24x24 = 576 or 3x24x24 = 1728"),
])
def test_bad_colour_images_get_400(shapes_server: ExploreServer, body: Any,
                                   message: str) -> None:
    status, answer = request(shapes_server, "POST", "/api/predict", body)
    assert status == 400 and message in answer["error"]


def test_info_tells_a_shipped_model(tmp_path: Path) -> None:
    server = make_server("mnist", "127.0.0.1", 0, dataset=str(tmp_path / "missing"))
    try:
        info = server.explorer.info()
        assert info["shipped"] and info["prepare"] == "mnist"
        assert info["class_names"] == [str(i) for i in range(10)]
    finally:
        server.server_close()


def test_predict_matches_the_model(server: ExploreServer) -> None:
    image = np.asarray(bar_image())
    status, result = request(server, "POST", "/api/predict", {"image": image.tolist()})
    assert status == 200
    model = server.explorer.model
    with torch.no_grad():
        caps, coupling = model.capsules(torch.tensor(image, dtype=torch.float32)[None, None])
    lengths = safe_norm(caps)[0]
    winner = int(lengths.argmax())
    assert result["prediction"] == result["capsule"] == winner
    np.testing.assert_allclose(result["lengths"], lengths, atol=1e-4)
    np.testing.assert_allclose(result["pose"], caps[0, winner], atol=1e-4)
    assert np.asarray(result["reconstruction"]).shape == (28, 28)
    # coupling: (map, row, col) of the primary capsules, ordered (row, col, map) in the model
    heat = np.asarray(result["coupling"])
    assert heat.shape == (32, 6, 6)
    expected = coupling[0, :, winner].view(6, 6, 32)
    np.testing.assert_allclose(heat[5, 2, 3], expected[2, 3, 5], atol=1e-4)
    np.testing.assert_allclose(heat.transpose(1, 2, 0), expected, atol=1e-4)


def test_predict_flat_pixels_capsule_and_offsets(server: ExploreServer) -> None:
    pixels = np.asarray(bar_image()).ravel().tolist()
    _, plain = request(server, "POST", "/api/predict", {"pixels": pixels, "capsule": 7})
    assert plain["capsule"] == 7
    offsets = [0.0] * 16
    offsets[3] = 0.5
    _, tweaked = request(server, "POST", "/api/predict",
                         {"pixels": pixels, "capsule": 7, "offsets": offsets})
    assert tweaked["pose"] == plain["pose"] and tweaked["lengths"] == plain["lengths"]
    assert tweaked["reconstruction"] != plain["reconstruction"]


def test_predict_centres_a_drawing_of_any_size(server: ExploreServer) -> None:
    drawing = np.zeros((90, 120))
    drawing[10:80, 100:110] = 1.0  # a tall bar in a corner
    status, result = request(server, "POST", "/api/predict",
                             {"image": drawing.tolist(), "preprocess": True})
    assert status == 200
    seen = np.asarray(result["input"])
    assert seen.shape == (28, 28) and seen.max() > 0.9
    rows, cols = np.nonzero(seen > 0.5)
    assert abs(rows.mean() - 13.5) < 1.5 and abs(cols.mean() - 13.5) < 1.5
    status, result = request(server, "POST", "/api/predict",
                             {"image": blank(50), "preprocess": True})
    assert status == 200 and np.asarray(result["input"]).max() == 0


def test_sample_has_its_label_predicted(server: ExploreServer) -> None:
    for index in (0, 7, 59):
        status, sample = request(server, "GET", f"/api/sample?index={index}")
        assert status == 200 and sample["index"] == index and sample["count"] == 60
        _, result = request(server, "POST", "/api/predict", {"image": sample["image"]})
        assert result["prediction"] == sample["label"]
    status, sample = request(server, "GET", "/api/sample")
    assert status == 200 and 0 <= sample["index"] < 60


BAD_BODIES = {
    "malformed JSON": b'{"image": [[0.5,',
    "not UTF-8": b'{"image": "\xff"}',
    "not an object": [1, 2],
    "no image": {},
    "image and pixels": {"image": blank(), "pixels": [0.0] * 784},
    "unknown key": {"image": blank(), "colour": "red"},
    "image not a list": {"image": "digit"},
    "ragged rows": {"image": [[0.0] * 28] * 27 + [[0.0] * 27]},
    "wrong size without preprocess": {"image": blank(20)},
    "too large": {"image": blank(600), "preprocess": True},
    "string pixel": {"pixels": ["0.5"] * 784},
    "boolean pixel": {"pixels": [True] * 784},
    "nested too deep": {"image": [[[0.0]] * 28] * 28},
    "NaN": b'{"pixels": [NaN]}',
    "Infinity": b'{"image": [[Infinity]]}',
    "overflowing number": ('{"pixels": [1e999' + ", 0" * 783 + "]}").encode(),
    "huge integer": {"pixels": [10 ** 400] + [0] * 783},
    "integer of 5000 digits": ('{"pixels": [' + "9" * 5000 + "]}").encode(),
    "pixel above 1": {"pixels": [2.0] * 784},
    "negative pixel": {"pixels": [-0.1] * 784},
    "short pixels": {"pixels": [0.0] * 783},
    "capsule out of range": {"image": blank(), "capsule": 10},
    "negative capsule": {"image": blank(), "capsule": -1},
    "capsule not an int": {"image": blank(), "capsule": 1.5},
    "capsule a boolean": {"image": blank(), "capsule": True},
    "offsets too short": {"image": blank(), "offsets": [0.0] * 15},
    "offset out of range": {"image": blank(), "offsets": [5.0] * 16},
    "offsets not a list": {"image": blank(), "offsets": 0.1},
    "preprocess not a bool": {"image": blank(), "preprocess": "yes"},
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_predict_requests_get_400(server: ExploreServer, body: Any) -> None:
    status, answer = request(server, "POST", "/api/predict", body)
    assert status == 400
    assert isinstance(answer["error"], str) and answer["error"]
    assert request(server, "GET", "/api/info")[0] == 200


def test_oversized_body_is_refused_unread(server: ExploreServer) -> None:
    body = b" " * (MAX_BODY_BYTES + 1)
    status, answer = request(server, "POST", "/api/predict", body)
    assert status == 400 and "limit" in answer["error"]
    host, port = server.server_address[:2]  # a huge claimed length is refused before reading
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10 ** 12))
    connection.endheaders()
    assert connection.getresponse().status == 400
    connection.close()


def test_methods_paths_and_query_errors(server: ExploreServer) -> None:
    assert request(server, "GET", "/api/predict")[0] == 405
    assert request(server, "PUT", "/api/predict", {"image": blank()})[0] == 405
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "POST", "/api/other", {})[0] == 404
    assert request(server, "GET", "/api/sample?index=abc")[0] == 400
    assert request(server, "GET", "/api/sample?index=60")[0] == 400
    assert request(server, "GET", "/api/info")[0] == 200


def test_unexpected_errors_are_500_and_the_server_survives(
        server: ExploreServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(server.explorer, "run", broken)
    status, answer = request(server, "POST", "/api/predict", {"image": blank()})
    assert status == 500 and "boom" in answer["error"]
    monkeypatch.undo()
    assert request(server, "POST", "/api/predict", {"image": blank()})[0] == 200


def test_missing_data_set_gives_503_with_a_message(server_without_data: ExploreServer) -> None:
    status, answer = request(server_without_data, "GET", "/api/sample")
    assert status == 503 and "missing" in answer["error"]
    assert request(server_without_data, "POST", "/api/predict", {"image": blank()})[0] == 200


def test_static_files_are_served_with_a_strict_policy(server: ExploreServer) -> None:
    host, port = server.server_address[:2]
    for path, kind in (("/", "text/html"), ("/explore.js", "text/javascript"),
                       ("/explore.css", "text/css")):
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200 and response.getheader("Content-Type").startswith(kind)
        assert "default-src 'self'" in response.getheader("Content-Security-Policy")
        assert "http://" not in text and "https://" not in text  # nothing from elsewhere
        connection.close()


def test_cli_registers_explore(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["explore", str(checkpoint), "--port", "0"])
    assert args.run is run_explore and args.host == "127.0.0.1" and args.port == 0
    assert main(["explore", str(checkpoint), "--port", "70000"]) == 2
    assert main(["explore", str(checkpoint.parent / "nothing.pt")]) == 2
    assert "nothing.pt: no such file or folder" in capsys.readouterr().err


# -- the page in Chromium -----------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def open_page(browser: "Browser", server: ExploreServer) -> tuple["Page", list[str], list[str]]:
    """A page on ``server``, with the URLs it requested and the errors it logged."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    urls: list[str] = []
    errors: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='true']", timeout=10_000)
    return page, urls, errors


def wait_idle(page: "Page", after: int) -> int:
    """Wait until more than ``after`` results were drawn and no request is in flight."""
    page.wait_for_function(
        "(after) => Number(document.body.dataset.updates || 0) > after && "
        "document.body.dataset.busy === 'false'", arg=after, timeout=10_000)
    return int(page.evaluate("Number(document.body.dataset.updates)"))


def draw_stroke(page: "Page") -> None:
    box = page.locator("#pad").bounding_box()
    x, top, bottom = box["x"] + box["width"] * 0.55, box["y"] + 40, box["y"] + box["height"] - 40
    page.mouse.move(x, top)
    page.mouse.down()
    page.mouse.move(x, bottom, steps=8)
    page.mouse.up()


def canvas_pixels(page: "Page", selector: str) -> list[int]:
    return page.evaluate("(s) => { const c = document.querySelector(s); return Array.from("
                         "c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }",
                         selector)


@needs_browser
def test_drawing_shows_a_prediction(browser: "Browser", server: ExploreServer) -> None:
    page, urls, errors = open_page(browser, server)
    assert page.locator("#draw-title").inner_text() == "Draw a digit"
    header = page.locator("#model-info").inner_text()
    assert header.startswith(f"model {server.explorer.checkpoint} · test images from "
                             f"{Path(server.explorer.dataset).name} · 10 classes")
    assert page.locator("#bars .bar").count() == 10
    assert page.locator("#sliders input[type=range]").count() == 16
    assert page.locator("#tiles canvas").count() == 32
    draw_stroke(page)
    wait_idle(page, 0)
    assert page.locator("#prediction").get_attribute("data-class") in [str(i) for i in range(10)]
    widths = page.eval_on_selector_all("#bars .fill", "els => els.map(e => e.style.width)")
    assert all(w.endswith("%") for w in widths)
    assert page.locator("#bars .bar.winner").count() == 1
    assert max(canvas_pixels(page, "#coupling-mean")) > 0
    assert all(url.startswith(server.url) for url in urls), urls  # works offline
    assert errors == []
    page.close()


@needs_browser
def test_dragging_a_slider_changes_the_reconstruction(browser: "Browser",
                                                      server: ExploreServer) -> None:
    page, _, errors = open_page(browser, server)
    draw_stroke(page)
    updates = wait_idle(page, 0)
    before = canvas_pixels(page, "#reconstruction")
    slider = page.locator("#sliders input[data-dim='4']").bounding_box()
    y = slider["y"] + slider["height"] / 2
    page.mouse.move(slider["x"] + slider["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(slider["x"] + slider["width"] - 1, y, steps=5)
    page.mouse.up()
    wait_idle(page, updates)
    assert float(page.locator("#sliders input[data-dim='4']").input_value()) > 0.4
    assert canvas_pixels(page, "#reconstruction") != before
    page.locator("#bars .bar[data-class='3']").click()  # decode another capsule
    page.wait_for_function("() => document.querySelector('#capsule-name').textContent === '3'")
    assert errors == []
    page.close()


def pixels_rgb(page: "Page", selector: str) -> np.ndarray:
    return np.asarray(canvas_pixels(page, selector)).reshape(-1, 4)[:, :3]


@needs_browser
def test_the_page_of_a_colour_model_names_its_classes(browser: "Browser", shapes: Path,
                                                      shapes_server: ExploreServer) -> None:
    page, _, errors = open_page(browser, shapes_server)
    assert page.locator("#draw-title").inner_text() == "Draw one of: circle, square, triangle"
    assert page.locator("#model-info").inner_text() == (
        f"model {shapes_server.explorer.checkpoint} · test images from {shapes.name} · "
        f"3 classes · 4×4×32 primary capsules")
    names = page.eval_on_selector_all("#bars .name", "els => els.map(e => e.textContent)")
    assert names == list(SHAPES)
    page.locator("#sample").click()
    page.wait_for_selector("#pad[data-label]")
    updates = wait_idle(page, 0)
    label = SHAPES[int(page.locator("#pad").get_attribute("data-label"))]
    assert f"label {label}" in page.locator("#message").inner_text()
    longest = SHAPES[int(page.locator("#prediction").get_attribute("data-class"))]
    assert page.locator("#prediction").inner_text() == "none of these"
    assert f"No capsule reaches 0.5; the longest is {longest}, 0." in \
        page.locator("#verdict").inner_text()
    for canvas in ("#input", "#reconstruction"):  # in colour
        rgb = pixels_rgb(page, canvas)
        assert len(rgb) == 24 * 24 and (rgb[:, 0] != rgb[:, 1]).any(), canvas
    page.locator("#clear").click()
    draw_stroke(page)
    wait_idle(page, updates)
    rgb = pixels_rgb(page, "#input")  # a drawing is gray in every channel
    assert rgb.max() > 0 and (rgb == rgb[:, :1]).all()
    assert errors == []
    page.close()


def set_slider(page: "Page", dim: int, value: float) -> None:
    page.eval_on_selector(f"#sliders input[data-dim='{dim}']",
                          "(s, v) => { s.value = v; s.dispatchEvent(new Event('input')); }",
                          str(value))


def choose_and_shift(page: "Page", updates: int) -> int:
    """Decode another capsule than the winner, with pose dimension 4 shifted."""
    winner = int(page.locator("#prediction").get_attribute("data-class"))
    other = str((winner + 1) % 10)
    page.locator(f"#bars .bar[data-class='{other}']").click()
    page.wait_for_function("(c) => document.querySelector('#capsule-name').textContent === c",
                           arg=other)
    set_slider(page, 4, 0.3)
    updates = wait_idle(page, updates)
    assert page.locator("#sliders input[data-dim='4']").input_value() == "0.3"
    return updates


def assert_fresh(page: "Page") -> None:
    """The winner decoded, every offset 0."""
    winner = page.locator("#prediction").get_attribute("data-class")
    assert page.locator("#capsule-name").inner_text() == winner
    assert page.locator("#follow").is_disabled()
    values = page.eval_on_selector_all("#sliders input", "els => els.map(e => e.value)")
    assert values == ["0"] * 16
    shown = page.eval_on_selector_all("#sliders output", "els => els.map(e => e.textContent)")
    assert shown == ["0.00"] * 16


@needs_browser
def test_a_new_image_starts_from_the_winner_without_offsets(browser: "Browser",
                                                            server: ExploreServer) -> None:
    page, _, errors = open_page(browser, server)
    draw_stroke(page)
    updates = choose_and_shift(page, wait_idle(page, 0))
    page.locator("#sample").click()  # a test image
    page.wait_for_selector("#pad[data-label]")
    updates = wait_idle(page, updates)
    assert_fresh(page)
    updates = choose_and_shift(page, updates)
    page.locator("#clear").click()  # a new drawing
    draw_stroke(page)
    wait_idle(page, updates)
    assert_fresh(page)
    assert errors == []
    page.close()


@needs_browser
def test_a_test_image_gets_its_label(browser: "Browser", server: ExploreServer) -> None:
    page, _, errors = open_page(browser, server)
    page.locator("#sample").click()
    page.wait_for_selector("#pad[data-label]")
    wait_idle(page, 0)
    label = page.locator("#pad").get_attribute("data-label")
    assert page.locator("#prediction").get_attribute("data-class") == label
    assert f"label {label}" in page.locator("#message").inner_text()
    page.locator("#clear").click()
    assert page.locator("#prediction").inner_text() == "–"
    assert errors == []
    page.close()


@needs_browser
def test_missing_data_set_shows_a_message(browser: "Browser",
                                          server_without_data: ExploreServer) -> None:
    page, _, _ = open_page(browser, server_without_data)
    page.locator("#sample").click()
    page.wait_for_selector("#message.error")
    assert "No test image" in page.locator("#message").inner_text()
    draw_stroke(page)  # drawing still works
    wait_idle(page, 0)
    page.close()


@pytest.mark.parametrize("host", ["evil.example:8000", "attacker.test", "127.0.0.1:1", ""])
def test_requests_for_another_host_are_refused(server: ExploreServer, host: str) -> None:
    """DNS rebinding: a page on another site that resolves its name to 127.0.0.1 sends its
    own name as Host."""
    for method, path, body in (("GET", "/api/info", None), ("POST", "/api/predict", {})):
        status, data = request(server, method, path, body, headers={"Host": host})
        assert status == 403 and "answers only requests for" in data["error"]
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert request(server, "GET", "/api/info", headers={"Host": host})[0] == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_predict_takes_json_only(server: ExploreServer, content_type: str | None) -> None:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request("POST", "/api/predict", body=json.dumps({"pixels": blank()}),
                       headers=headers)
    response = connection.getresponse()
    assert response.status == 415 and response.getheader("Content-Type") == "application/json"
    assert "application/json" in json.loads(response.read())["error"]
    connection.close()


@pytest.mark.parametrize("request_line", [b"BREW /api/info HTTP/1.1", b"GARBAGE", b"GET / HTTP/9.9"])
def test_http_errors_are_json(server: ExploreServer, request_line: bytes) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer.startswith(b"HTTP/"):
        head, _, answer = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head
    # (an unparsable request line gets an HTTP/0.9 answer: the body alone)
    assert "error" in json.loads(answer)


def test_a_client_that_hangs_up_leaves_no_traceback(server: ExploreServer, capfd) -> None:
    host, port = server.server_address[:2]
    body = json.dumps({"pixels": blank()}).encode()
    for _ in range(5):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (port, len(body)) + body)  # and reset before the answer
    assert request(server, "GET", "/api/info")[0] == 200  # still serving
    assert "Traceback" not in capfd.readouterr().err
