"""``capsnet explore``: a local web page to draw an image of a class and watch its capsules.

``capsnet explore MODEL`` loads the model on the CPU and serves a page (plain HTML,
CSS and JavaScript from ``explore_static/``; nothing is fetched from elsewhere) with a
canvas to draw on, the length of each class's capsule, the reconstruction of the longest or
chosen capsule with one slider per pose dimension, and the coupling coefficients of that
capsule over the primary capsules. Classes are called by the model's class names; where no
capsule is as long as ``present`` (0.5) the image holds none of them.

JSON API (every response is JSON; errors are ``{"error": "message"}``). An *image* is
image_size x image_size numbers in [0, 1] (lists of rows) for a model of one channel, and
in_channels such planes (channels x rows x columns) for others:

``GET /api/info``
    ``{"checkpoint", "shipped", "dataset", "classes", "class_names", "prepare", "present",
    "image_size", "in_channels", "digit_dim", "primary_grid", "primary_maps",
    "offset_limit", "max_side"}``: ``checkpoint`` is the model as given (``shipped``: the
    name of a model shipped with capsnet), ``dataset`` the data set of the test images
    (null: none), ``prepare`` how the model's images were prepared ("mnist": digits centred
    as MNIST's; "resize": whole images resized).

``POST /api/predict`` with a JSON object body (at most 1 MB):

    image       HxW list of lists of numbers in [0, 1] (0 black background, 1 ink), used
                for every channel; or in_channels such planes (CxHxW)
    pixels      or: a flat row-major list of image_size * image_size numbers in [0, 1], or
                in_channels * image_size * image_size of them
    preprocess  optional bool (default false): prepare an HxW drawing of any size up to
                max_side x max_side as the model's images were: for prepare "mnist" centred
                MNIST-style (cropped to its ink, scaled into a 20/28 box, its centre of mass
                moved to the middle), for "resize" resized. Without it the image must be
                image_size x image_size.
    capsule     optional int in [0, classes): the capsule to decode (default: the longest)
    offsets     optional list of digit_dim numbers in [-offset_limit, offset_limit], added
                to that capsule's pose before decoding (the notebook's tweaks)

    -> ``{"prediction": int, "class_name": str, "none": bool, "lengths": [classes floats],
    "capsule": int, "pose": [digit_dim floats, before offsets],
    "reconstruction": an image, "input": the image the network saw,
    "coupling": primary_maps x primary_grid x primary_grid floats}``: ``prediction`` and
    ``class_name`` are the longest capsule's, ``none`` is true when its length is under
    ``present`` (the image holds none of the classes); ``coupling`` holds the last routing
    iteration's coupling coefficients c_ij of every primary capsule i (map, row, column)
    to the decoded capsule j.

``GET /api/sample[?index=N]``
    A test image of the checkpoint's data set (random without ``index``):
    ``{"image": an image, "label": int, "label_name", "index", "count"}``; 503 with a
    message when the data set cannot be loaded.

Malformed JSON, unknown keys, wrong shapes or types, NaN or infinite numbers, values out of
range and bodies over 1 MB get a 400 with a message; an unexpected failure gets a 500 with
a message, and the server keeps serving. A request whose ``Host`` header does not name the
server (see :class:`ExploreServer`) gets a 403: a page elsewhere that resolves its own name
to this machine (DNS rebinding) is not answered.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from ..utils.digits import mnist_normalise
from ..utils.images import centre_crop
from ..errors import CapsNetError, error_line
from ..nn.base import CapsuleModel
from ..nn.layers import safe_norm
from ..nn.model import CapsNet
from ..nn.prediction import PRESENT, predictions
from ..nn.pretrained import SHIPPED, architecture_of
from ..training.checkpoint import load_trained
from ..training.config import TrainConfig, splits_for
from ..training.task import check_fits

MAX_BODY_BYTES = 1_000_000
MAX_DISCARD_BYTES = 16_000_000  # refused bodies up to this size are read and dropped
MAX_SIDE = 512  # largest accepted image side when preprocessing
OFFSET_LIMIT = 1.0  # the page's sliders span -0.5 .. +0.5
PREDICT_KEYS = {"image", "pixels", "preprocess", "capsule", "offsets"}
STATIC_FILES = {  # URL path -> (file in explore_static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/explore.css": ("explore.css", "text/css; charset=utf-8"),
    "/explore.js": ("explore.js", "text/javascript; charset=utf-8"),
}
GET_PATHS = {"/api/info", "/api/sample"}
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")  # always this machine: never rebound
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}"
                       r"[a-z0-9_])?)*", re.IGNORECASE | re.ASCII)
LISTEN_BACKLOG = 128  # connections held until accepted (http.server's 5 lost some of 50)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


# ---------------------------------------------------------------------------------------
# Images


def centre_digit(image: np.ndarray, size: int) -> np.ndarray:
    """MNIST-style centring of a drawn ``image`` (H, W) in [0, 1] into ``(size, size)``
    float32, as ``capsnet predict`` does for image files (see :mod:`capsnet.images`):
    cropped to the ink, scaled into the 20/28 box, centred by mass. Blank stays blank."""
    try:
        centred = mnist_normalise(image.astype(np.float64), size, Path("drawing"))
    except CapsNetError:  # no ink stands out from the background
        centred = np.zeros((size, size))
    return centred.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Request validation


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; NaN and Infinity literals are refused."""
    def refuse_constant(name: str) -> None:
        raise ApiError(f"{name} is not allowed: numbers must be finite")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise ApiError("request body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # also integers of over 4300 digits
        raise ApiError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    return body


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_array(values: Any, name: str, low: float, high: float) -> np.ndarray:
    """Flat list of numbers -> float32 array; refuse other types, NaN/Inf, out of range."""
    if not isinstance(values, list) or not values:
        raise ApiError(f"{name} must be a non-empty list of numbers")
    if not all(is_number(v) for v in values):
        raise ApiError(f"{name} must hold only numbers")
    try:
        array = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an integer too large for a float
        raise ApiError(f"{name} must hold finite numbers (no NaN or infinity)") from None
    if not np.isfinite(array).all():
        raise ApiError(f"{name} must hold finite numbers (no NaN or infinity)")
    if array.min() < low or array.max() > high:
        raise ApiError(f"{name} values must be in [{low:g}, {high:g}], "
                       f"got {array.min():g} .. {array.max():g}")
    return array.astype(np.float32)


def image_array(body: dict[str, Any], size: int, channels: int) -> np.ndarray:
    """The image of a predict request, from ``image`` or ``pixels``: (H, W) for every channel,
    or (channels, H, W)."""
    if ("image" in body) == ("pixels" in body):
        raise ApiError('give exactly one of "image" (HxW list of lists) or "pixels" (flat list)')
    if "pixels" in body:
        return pixel_array(body["pixels"], size, channels)
    rows = body["image"]
    if not is_planes(rows):
        return plane_array(rows, "image")
    if len(rows) != channels:
        raise ApiError(f"image has {len(rows)} channels (CxHxW); the model takes {channels}")
    planes = [plane_array(plane, f"image channel {c}") for c, plane in enumerate(rows)]
    if len({plane.shape for plane in planes}) > 1:
        raise ApiError("image channels must all have the same size")
    return np.stack(planes)


def pixel_array(values: Any, size: int, channels: int) -> np.ndarray:
    """A flat ``pixels`` list as (size, size), or (channels, size, size)."""
    pixels = number_array(values, "pixels", 0.0, 1.0)
    if pixels.size == size * size:
        return pixels.reshape(size, size)
    if channels > 1 and pixels.size == channels * size * size:
        return pixels.reshape(channels, size, size)
    colour = f" or {channels}x{size}x{size} = {channels * size * size}" if channels > 1 else ""
    raise ApiError(f"pixels must hold {size}x{size} = {size * size}{colour} numbers, "
                   f"got {pixels.size}")


def is_planes(rows: Any) -> bool:
    """Whether ``rows`` nests three deep (channels of rows), by its first element."""
    return (isinstance(rows, list) and bool(rows) and isinstance(rows[0], list)
            and bool(rows[0]) and isinstance(rows[0][0], list))


def plane_array(rows: Any, name: str) -> np.ndarray:
    """An (H, W) plane from a list of rows of numbers in [0, 1]; ``name`` for messages."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ApiError(f"{name} must be a non-empty list of rows (lists of numbers)")
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ApiError(f"{name} rows must all have the same length")
    if len(rows) > MAX_SIDE or width > MAX_SIDE:
        raise ApiError(f"{name} is {len(rows)}x{width}; at most {MAX_SIDE}x{MAX_SIDE}")
    flat = [v for r in rows for v in r]
    return number_array(flat, name, 0.0, 1.0).reshape(len(rows), width)


def optional_capsule(body: dict[str, Any], classes: int) -> int | None:
    capsule = body.get("capsule")
    if capsule is None:
        return None
    if not isinstance(capsule, int) or isinstance(capsule, bool):
        raise ApiError(f"capsule must be an integer in [0, {classes - 1}] or null")
    if not 0 <= capsule < classes:
        raise ApiError(f"capsule {capsule} out of range [0, {classes - 1}]")
    return capsule


def optional_offsets(body: dict[str, Any], dim: int) -> np.ndarray:
    offsets = body.get("offsets")
    if offsets is None:
        return np.zeros(dim, dtype=np.float32)
    array = number_array(offsets, "offsets", -OFFSET_LIMIT, OFFSET_LIMIT)
    if array.size != dim:
        raise ApiError(f"offsets must hold {dim} numbers, got {array.size}")
    return array


def rounded(array: np.ndarray | torch.Tensor, digits: int = 4) -> list:
    """Nested lists of ``array`` rounded to ``digits`` decimals, for compact JSON."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.round(array.astype(np.float64), digits).tolist()


def picture(image: np.ndarray | torch.Tensor) -> list:
    """An image ``(channels, h, w)`` as the API gives one: one channel as HxW, more as CxHxW."""
    return rounded(image[0] if image.shape[0] == 1 else image, 3)


# ---------------------------------------------------------------------------------------
# The model and the data set behind the API


class SampleSource:
    """Test images of a data set, loaded once in the background on first use."""

    def __init__(self, config: TrainConfig | None, data_dir: str | None, model: CapsNet) -> None:
        self.config, self.data_dir, self.model = config, data_dir, model
        self.dataset = config.dataset if config is not None else None
        self.lock = threading.Lock()
        self.loaded = False
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.error: str | None = None

    def start(self) -> None:
        """Begin loading in a thread of its own so the first request does not wait long.
        Not a daemon: a Ctrl-C during the loading lets it end before the interpreter
        shuts down, as torch work in a thread still running then can abort the process."""
        threading.Thread(target=self.load, name="capsnet-explore-data").start()

    def load(self) -> None:
        with self.lock:
            if self.loaded:
                return
            try:
                self.images, self.labels = self._read()
            except CapsNetError as exc:
                self.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - any failure just disables samples
                self.error = error_line(exc)
            self.loaded = True

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dataset:
            raise CapsNetError("the checkpoint names no data set; start explore with --dataset")
        splits = splits_for(self.config, self.data_dir)
        check_fits(self.model.config, self.dataset, splits.image_size, splits.in_channels,
                   splits.num_classes)
        return splits.test.images, splits.test.labels

    def sample(self, index: int | None) -> tuple[int, np.ndarray, int, int]:
        """``(index, image (C, H, W) float32, label, count)``; random ``index`` if None."""
        self.load()
        if self.images is None or self.labels is None:
            raise ApiError(f"no test images: {self.error}", HTTPStatus.SERVICE_UNAVAILABLE)
        count = len(self.labels)
        if index is None:
            index = random.randrange(count)
        elif not 0 <= index < count:
            raise ApiError(f"index {index} out of range [0, {count - 1}]")
        image = self.images[index].float().div(255.0).numpy()
        return index, image, int(self.labels[index]), count


@dataclass
class Explorer:
    """The model, its class names and test images, and the API's operations."""

    model: CapsNet
    class_names: tuple[str, ...]
    samples: SampleSource
    checkpoint: str = ""
    dataset: str | None = None
    shipped: bool = False  # checkpoint names a model shipped with capsnet

    def __post_init__(self) -> None:
        self.lock = threading.Lock()  # one forward pass at a time

    def info(self) -> dict[str, Any]:
        c = self.model.config
        return {"checkpoint": self.checkpoint, "shipped": self.shipped, "dataset": self.dataset,
                "classes": c.num_classes, "class_names": list(self.class_names),
                "prepare": self.model.prepare, "present": PRESENT,
                "image_size": c.image_size, "in_channels": c.in_channels,
                "digit_dim": c.digit_dim, "primary_grid": c.primary_grid,
                "primary_maps": c.primary_maps, "offset_limit": OFFSET_LIMIT,
                "max_side": MAX_SIDE}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a predict request (see the module docstring) and answer it."""
        config = self.model.config
        unknown = sorted(set(body) - PREDICT_KEYS)
        if unknown:
            raise ApiError(f"unknown keys: {', '.join(unknown)} "
                           f"(allowed: {', '.join(sorted(PREDICT_KEYS))})")
        preprocess = body.get("preprocess", False)
        if not isinstance(preprocess, bool):
            raise ApiError("preprocess must be true or false")
        image = image_array(body, config.image_size, config.in_channels)
        if preprocess:
            image = self.prepared(image)
        elif image.shape[-2:] != (config.image_size, config.image_size):
            raise ApiError(f"image must be {config.image_size}x{config.image_size} without "
                           f"preprocess, got {image.shape[-2]}x{image.shape[-1]}")
        capsule = optional_capsule(body, config.num_classes)
        offsets = optional_offsets(body, config.digit_dim)
        return self.run(image, capsule, offsets)

    def prepared(self, drawing: np.ndarray) -> np.ndarray:
        """An (H, W) ``drawing`` prepared as the model's images were: centred MNIST-style, or
        (prepare "resize") resized; cut to the centre window for a model trained on crops."""
        if drawing.ndim != 2:
            raise ApiError("preprocess takes a one-channel drawing (HxW)")
        size = self.model.crop_from or self.model.config.image_size
        if self.model.prepare == "mnist":
            return centre_crop(centre_digit(drawing, size), self.model.config.image_size)
        return self.model.prepare_image(drawing, preprocess=False, name="drawing")[0]

    def run(self, image: np.ndarray, capsule: int | None, offsets: np.ndarray) -> dict[str, Any]:
        """Forward ``image`` ((size, size) for every channel, or (channels, size, size)), decode
        ``capsule`` (default: the longest) + offsets."""
        config = self.model.config
        batch = torch.from_numpy(image).expand(1, config.in_channels, *image.shape[-2:])
        with self.lock, torch.no_grad():
            digit_caps, coupling = self.model.capsules(batch.contiguous())
            lengths = safe_norm(digit_caps)[0]
            prediction = int(lengths.argmax())
            chosen = prediction if capsule is None else capsule
            tweaked = digit_caps.clone()
            tweaked[0, chosen] += torch.from_numpy(offsets)
            reconstruction = self.model.reconstruct(tweaked, torch.tensor([chosen]))
        grid, maps = config.primary_grid, config.primary_maps
        heat = coupling[0, :, chosen].view(grid, grid, maps).permute(2, 0, 1)  # (map, row, col)
        found = predictions(lengths[None], self.class_names)[0]
        return {"prediction": prediction, "class_name": self.class_names[prediction],
                "none": found.label is None, "lengths": rounded(lengths, 5), "capsule": chosen,
                "pose": rounded(digit_caps[0, chosen], 5),
                "reconstruction": picture(reconstruction[0]), "input": picture(batch[0]),
                "coupling": rounded(heat, 5)}

    def sample(self, query: dict[str, list[str]]) -> dict[str, Any]:
        """A test image (random, or ``?index=N``) with its label."""
        index = None
        if "index" in query:
            try:
                index = int(query["index"][-1])
            except ValueError:
                raise ApiError(f"index must be an integer, got {query['index'][-1]!r}") from None
        index, image, label, count = self.samples.sample(index)
        return {"image": picture(image), "label": label,
                "label_name": self.class_names[label] if label < len(self.class_names) else str(label),
                "index": index, "count": count}


# ---------------------------------------------------------------------------------------
# HTTP


def checked_host(host: str, flag: str) -> str:
    """``host``, an IP address (IPv6 with or without brackets) or an ASCII host name, as a
    socket takes it; one :class:`CapsNetError` line otherwise."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if len(bare) > 253 or not HOST_NAME.fullmatch(bare):
        raise CapsNetError(f"{flag} {host!r}: not an IP address or a host name (ASCII letters, "
                           f"digits, '-' and '.')")
    return bare


def host_name(host: str) -> str:
    """``host`` as a ``Host`` header names it: lower case, an IPv6 address in brackets, and an
    IPv4 address that a dual-stack socket shows mapped into IPv6 as itself."""
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return host.lower()
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"[{address}]" if address.version == 6 else str(address)


def host_headers(names: Iterable[str], port: int) -> set[str]:
    """The ``Host`` headers naming ``names`` at ``port`` (browsers leave out port 80)."""
    named = {host_name(name) for name in names}
    return {f"{name}:{port}" for name in named} | (named if port == 80 else set())


class Handler(BaseHTTPRequestHandler):
    """Static files and the JSON API of an :class:`ExploreServer`."""

    server: "ExploreServer"
    server_version = "capsnet-explore"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stall (idle keep-alive, a body that never comes)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.handle_safely(self.route_get)

    def do_HEAD(self) -> None:  # noqa: N802
        self.handle_safely(self.route_get)

    def do_POST(self) -> None:  # noqa: N802
        self.handle_safely(self.route_post)

    def do_PUT(self) -> None:  # noqa: N802
        self.handle_safely(self.refuse_method)

    do_DELETE = do_PATCH = do_PUT

    def handle_safely(self, route: Any) -> None:
        """Run ``route``; turn :class:`ApiError` into its status and anything else into 500."""
        try:
            self.check_host()
            route()
        except ApiError as exc:
            self.send_json({"error": str(exc)}, exc.status)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            print(f"capsnet explore: {self.command} {self.path[:200]!r} failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            try:
                self.send_json({"error": f"internal error: {type(exc).__name__}: {exc}"},
                               HTTPStatus.INTERNAL_SERVER_ERROR)
            except OSError:
                self.close_connection = True

    def check_host(self) -> None:
        """Answer only requests addressed to this server by a name it knows, so that a web
        page elsewhere cannot reach it through DNS rebinding (its own name, resolved to this
        machine, in the ``Host`` header)."""
        host = (self.headers.get("Host") or "").strip().lower()
        arrived = host_headers([self.connection.getsockname()[0]], self.server.server_address[1])
        if host not in self.server.allowed_hosts | arrived:
            self.close_connection = True
            raise ApiError("this server answers only requests for "
                           + ", ".join(sorted(self.server.allowed_hosts))
                           + " and the address they come in on (capsnet explore --allow-host "
                             "NAME adds a name)", HTTPStatus.FORBIDDEN)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a bad request line, an unknown method) as JSON too."""
        self.close_connection = True
        try:
            self.send_json({"error": message or HTTPStatus(code).phrase}, code)
        except OSError:
            pass

    def route_get(self) -> None:
        url = urlsplit(self.path)
        explorer = self.server.explorer
        if url.path in STATIC_FILES:
            self.send_static(*STATIC_FILES[url.path])
        elif url.path == "/api/info":
            self.send_json(explorer.info())
        elif url.path == "/api/sample":
            self.send_json(explorer.sample(parse_qs(url.query)))
        elif url.path == "/api/predict":
            self.refuse_method()
        else:
            raise ApiError(f"not found: {url.path}", HTTPStatus.NOT_FOUND)

    def route_post(self) -> None:
        path = urlsplit(self.path).path
        if path != "/api/predict":
            if path in STATIC_FILES or path in GET_PATHS:
                self.refuse_method()
            self.close_connection = True  # the body is left unread
            raise ApiError(f"not found: {path}", HTTPStatus.NOT_FOUND)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self.close_connection = True
            raise ApiError("send the request as Content-Type: application/json",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        self.send_json(self.server.explorer.predict(parse_body(self.read_body())))

    def refuse_method(self) -> None:
        self.close_connection = True  # any request body is left unread
        raise ApiError(f"method {self.command} not allowed here", HTTPStatus.METHOD_NOT_ALLOWED)

    def read_body(self) -> bytes:
        """The request body; refuse missing, chunked or oversized bodies before reading."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError("chunked bodies are not supported; send Content-Length")
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise ApiError("missing or bad Content-Length")
        if length > MAX_BODY_BYTES:
            self.discard_body(length)
            raise ApiError(f"request body of {length} bytes is over the limit of "
                           f"{MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def discard_body(self, length: int) -> None:
        """Read and drop a refused body of up to :data:`MAX_DISCARD_BYTES` so that the client
        sees the answer (closing on unread data resets the connection); close on bigger ones."""
        if length > MAX_DISCARD_BYTES:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)

    def send_static(self, name: str, content_type: str) -> None:
        data = resources.files("capsnet.tools").joinpath("explore_static", name).read_bytes()
        self.send_bytes(data, content_type, HTTPStatus.OK)

    def send_json(self, data: Any, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        self.send_bytes(body, "application/json", status)

    def send_bytes(self, body: bytes, content_type: str, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        if self.server.verbose:
            super().log_message(format, *args)


class ExploreServer(ThreadingHTTPServer):
    """A threading HTTP server that answers with :class:`Handler` for ``explorer``.

    It answers requests whose ``Host`` names it, with its port: the address it listens on
    (as given and as bound), localhost, 127.0.0.1, [::1], the address a request comes in on
    (on 0.0.0.0 or ::, one of this machine's), and the ``names`` it is given.
    """

    # Not daemons: server_close() waits for every request thread, so none is still in torch
    # when the interpreter shuts down (a thread that takes the GIL back from torch code then
    # aborts the process: "terminate called without an active exception").
    daemon_threads = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], explorer: Explorer, verbose: bool = False,
                 names: Iterable[str] = ()) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.explorer = explorer
        self.verbose = verbose
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, Handler)
        host, port = self.server_address[:2]
        self.allowed_hosts = host_headers({host, address[0], *LOCAL_NAMES, *names}, port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening, end idle connections (a keep-alive client would hold its thread
        for ``Handler.timeout``) and wait for the requests being answered."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up is not an error; anything else is one line on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        print(f"capsnet explore: request from {client_address[0]} failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"


def check_explorable(model: CapsuleModel, source: str | Path) -> None:
    """Refuse a model the page cannot show: it shows vector class capsules with their
    coupling over a grid of primary capsules and a decoder's reconstruction (CapsNet and
    Efficient-CapsNet have them; EM capsules have matrices and no couplings)."""
    sizes = ("digit_dim", "primary_grid", "primary_maps")
    if not (model.reconstructs and all(hasattr(model.config, name) for name in sizes)):
        raise CapsNetError(f"{source}: explore shows vector capsules, their couplings and "
                           f"a decoder's reconstructions, which this {architecture_of(model)} "
                           f"model does not have (evaluate, predict and figures take it)")


def make_server(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
                dataset: str | None = None, data_dir: str | None = None,
                verbose: bool = False, allow_hosts: Iterable[str] = ()) -> ExploreServer:
    """Load ``model`` (anything CapsNet.from_pretrained takes) and bind a server (not yet
    serving) on ``host:port`` (0: any port) that also answers requests for ``allow_hosts``.

    Test images come from ``dataset`` (default: the one the model was trained on, when it
    records it).
    """
    host = checked_host(host, "--host")
    names = [checked_host(name, "--allow-host") for name in allow_hosts]
    trained = load_trained(model, dataset, need_dataset=False)
    check_explorable(trained.model, model)
    config = trained.config
    samples = SampleSource(config, data_dir, trained.model)
    explorer = Explorer(trained.model, trained.model.class_names, samples, str(model),
                        config.dataset if config is not None else None,
                        shipped=isinstance(model, str) and model in SHIPPED)
    try:
        server = ExploreServer((host, port), explorer, verbose, names)
    except OSError as exc:
        raise CapsNetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    samples.start()
    return server
