"""Hostile and careless use of the command beyond its arguments: a reader that stops
reading, a full disk behind standard output, Ctrl-C while it starts, a bad environment, odd
``explore --host`` values; a kernel library broken in the cache; forged ``Host`` headers and
many connections at once against ``capsnet explore``.

The command-line cases run the real ``capsnet`` in a subprocess and check its exit code, that
stderr is one line (or empty where the command is meant to end quietly) and no traceback."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet.errors import CapsNetError
from capsnet.nn import routing_kernel
from capsnet.nn.layers import RoutingCapsules, squash
from capsnet.tools.explore import ExploreServer, Handler, make_server
from conftest import serving

CAPSNET = str(Path(sys.executable).with_name("capsnet"))
TIMEOUT = 300  # seconds for any subprocess; the machine may be busy
COMPILER = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler")
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")


def capsnet(*args: str | bytes, stdout: int | object = subprocess.DEVNULL,
            env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.Popen:
    """The real command, started with Ctrl-C at its default (a test run in the background
    would otherwise pass on an ignored SIGINT); a crash prints every thread's stack."""
    return subprocess.Popen([CAPSNET, *args], stdout=stdout, stderr=subprocess.PIPE, cwd=cwd,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finished(process: subprocess.Popen) -> tuple[int, list[str]]:
    """Exit code and the lines of stderr, once ``process`` ends."""
    _, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, err.decode(errors="replace").splitlines()


def one_line(lines: list[str], text: str) -> None:
    assert len(lines) == 1 and lines[0].startswith("capsnet: ") and text in lines[0], lines


@pytest.fixture(scope="module")
def image(module_tmp: Callable[[str], Path]) -> Path:
    """A 28x28 PNG of a bar, for the shipped MNIST model."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:22, 12:15] = 255
    path = module_tmp("hostile-cli") / "bar.png"
    Image.fromarray(pixels).save(path)
    return path


# -- standard output ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_stops_reading_ends_the_command_quietly(image: Path,
                                                              buffered: bool) -> None:
    process = capsnet("predict", "mnist", *[str(image)] * 300, stdout=subprocess.PIPE,
                      env={"PYTHONUNBUFFERED": "" if buffered else "1"})
    process.stdout.close()  # as `| head -0` does
    assert finished(process) == (141, [])


@pytest.mark.slow
def test_help_into_a_closed_pipe_ends_quietly() -> None:
    process = capsnet("predict", "--help", stdout=subprocess.PIPE)
    process.stdout.close()
    assert finished(process) == (141, [])


@pytest.mark.slow
@needs_dev_full
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_full_disk_behind_standard_output_is_one_line(image: Path, buffered: bool) -> None:
    with open("/dev/full", "wb") as full:
        process = capsnet("predict", "mnist", str(image), stdout=full,
                          env={"PYTHONUNBUFFERED": "" if buffered else "1"})
    code, lines = finished(process)
    assert code == 2
    one_line(lines, "cannot write to standard output: No space left on device")


@pytest.mark.slow
@needs_dev_full
def test_version_onto_a_full_disk_is_one_line() -> None:
    with open("/dev/full", "wb") as full:
        code, lines = finished(capsnet("--version", stdout=full))
    assert code == 2
    one_line(lines, "cannot write to standard output")


# -- Ctrl-C while the command starts --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5, 2.5])
def test_ctrl_c_while_starting_is_one_line(image: Path, delay: float) -> None:
    """Importing torch takes seconds: Ctrl-C in them is one line and exit code 130 (or, on a
    machine fast enough, the command is done before it)."""
    process = capsnet("predict", "mnist", str(image))
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    code, lines = finished(process)
    # Done before the signal: exit 0; or, on a loaded machine, the signal lands while the
    # interpreter shuts down after the command has finished (Python restores the default
    # handler then), which ends the process by the signal and prints nothing.
    finished_first = ((0, []), (-signal.SIGINT, []))
    assert (code, lines) in ((130, ["capsnet: interrupted"]), *finished_first), (code, lines)


# -- the environment ----------------------------------------------------------------------------

@pytest.mark.slow
def test_an_unknown_routing_kernel_setting_is_refused_at_start(image: Path) -> None:
    code, lines = finished(capsnet("predict", "mnist", str(image),
                                   env={"CAPSNET_ROUTING_KERNEL": "fast"}))
    assert code == 2
    one_line(lines, "CAPSNET_ROUTING_KERNEL='fast' is not a setting; use one of on, 1, true, "
                    "off, 0, false")


@pytest.mark.parametrize("value, expected", [("off", False), ("OFF", False), ("0", False),
                                             ("false", False), ("on", True), ("1", True),
                                             ("True", True), ("", True), (None, True)])
def test_routing_kernel_settings(value: str | None, expected: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("CAPSNET_ROUTING_KERNEL", raising=False)
    else:
        monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", value)
    assert routing_kernel.enabled() is expected


@pytest.mark.parametrize("value", ["fast", "no", "offf", "2"])
def test_unknown_routing_kernel_settings_are_refused(value: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", value)
    with pytest.raises(CapsNetError, match="is not a setting; use one of on, 1, true"):
        routing_kernel.enabled()


# -- explore's --host and --allow-host --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flag, host", [
    ("--host", "héllo"), ("--host", "é" * 70), ("--host", "０.０.０.０"), ("--host", ""),
    ("--host", b"\xff"), ("--host", "a..b"), ("--host", "two words"), ("--allow-host", "ü.example"),
], ids=["accent", "long-accented", "full-width-digits", "empty", "undecodable", "empty-label",
        "space", "allow-host-accent"])
def test_bad_explore_hosts_are_one_line(flag: str, host: str | bytes) -> None:
    code, lines = finished(capsnet("explore", "mnist", "--port", "0", flag, host))
    assert code == 2
    one_line(lines, f"{flag} ")
    assert "not an IP address or a host name" in lines[0]


# -- a kernel library broken in the cache -------------------------------------------------------

KERNEL_SHAPE = (3, 5, 4)  # out_caps, out_dim, in_dim: small, and built in these tests alone


@pytest.fixture()
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private kernel cache, and no library loaded from it before the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    routing_kernel.library.cache_clear()
    yield tmp_path / "cache"
    routing_kernel.library.cache_clear()


@pytest.fixture(scope="module")
def foreign_library(module_tmp: Callable[[str], Path]) -> Path:
    """A shared library that loads but holds none of the kernel's functions."""
    folder = module_tmp("foreign")
    (folder / "foreign.c").write_text("int unrelated(void) { return 42; }\n")
    subprocess.run([COMPILER, "-shared", "-fPIC", str(folder / "foreign.c"), "-o",
                    str(folder / "foreign.so")], check=True, timeout=TIMEOUT)
    return folder / "foreign.so"


def kernel_routes() -> None:
    """Routing through the kernel agrees with routing in torch."""
    out_caps, out_dim, in_dim = KERNEL_SHAPE
    layer = RoutingCapsules(16, in_dim, out_caps, out_dim)
    u = squash(torch.randn(2, 16, in_dim))
    assert routing_kernel.supports(u, layer.weight)
    fused, _ = layer(u)
    layer.fused = False
    torch.testing.assert_close(fused, layer(u)[0])


@needs_compiler
@pytest.mark.parametrize("damage", ["not a library", "another library", "empty"])
def test_a_broken_cached_kernel_is_built_again(damage: str, kernel_cache: Path,
                                               foreign_library: Path) -> None:
    targets = [build.target for build in routing_kernel.builds(*KERNEL_SHAPE)]
    for target in targets:  # whichever the system builds: both are broken
        target.parent.mkdir(parents=True, exist_ok=True)
        if damage == "another library":
            shutil.copy(foreign_library, target)
        else:
            target.write_bytes(b"" if damage == "empty" else b"\x7fELF but no more")
    broken = [target.read_bytes() for target in targets]
    assert routing_kernel.library(*KERNEL_SHAPE) is not None
    assert [target.read_bytes() for target in targets] != broken  # rebuilt in place
    kernel_routes()


@needs_compiler
def test_a_compiler_that_makes_a_broken_library_is_tried_once(
        kernel_cache: Path, foreign_library: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls"
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\n"
                        f"echo called >> '{calls}'\n"
                        'while [ "$1" != -o ]; do shift; done\n'
                        f"cp '{foreign_library}' \"$2\"\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.warns(UserWarning, match="routing runs in torch.*undefined symbol"):
        assert routing_kernel.library(*KERNEL_SHAPE) is None
    assert len(calls.read_text().splitlines()) == len(routing_kernel.builds(*KERNEL_SHAPE))


# -- explore: Host headers and many connections -------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_dataset: Path) -> Iterator[ExploreServer]:
    with serving(make_server("mnist", "127.0.0.1", 0, dataset=str(tiny_dataset),
                             allow_hosts=["capsnet.example"])) as running:
        yield running


@pytest.fixture(scope="module")
def server_everywhere(tiny_dataset: Path) -> Iterator[ExploreServer]:
    with serving(make_server("mnist", "0.0.0.0", 0, dataset=str(tiny_dataset))) as running:
        yield running


def status(address: str, port: int, host: str | None, method: str = "GET",
           path: str = "/api/info") -> int:
    """The status of one request to ``address:port`` with ``Host: host``."""
    connection = http.client.HTTPConnection(address, port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        body = b"{}" if method == "POST" else b""
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


FORGED = ["evil.example:{port}", "evil.example", "127.0.0.1.evil.example:{port}",
          "localhost", "127.0.0.1:{other}", "capsnet.example:{other}", "[::2]:{port}", "", None]


@pytest.mark.parametrize("host", FORGED)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_forged_host_headers_are_refused(server: ExploreServer, host: str | None,
                                         method: str) -> None:
    port = server.server_address[1]
    header = None if host is None else host.format(port=port, other=port + 1)
    path = "/api/predict" if method == "POST" else "/api/info"
    assert status("127.0.0.1", port, header, method, path) == 403


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}",
                                  "[::1]:{port}", "capsnet.example:{port}"])
def test_this_servers_names_are_answered(server: ExploreServer, host: str) -> None:
    port = server.server_address[1]
    assert status("127.0.0.1", port, host.format(port=port)) == 200


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("0.0.0.0:{port}", 200),
    ("evil.example:{port}", 403), ("capsnet.example:{port}", 403)])
def test_on_every_interface_this_machines_names_are_answered(
        server_everywhere: ExploreServer, host: str, expected: int) -> None:
    port = server_everywhere.server_address[1]
    assert status("127.0.0.1", port, host.format(port=port)) == expected


def outward_address() -> str | None:
    """An address of this machine other than loopback (the one its default route leaves
    from), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_on_every_interface_a_request_may_name_the_address_it_came_in_on(
        server_everywhere: ExploreServer) -> None:
    address = outward_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    port = server_everywhere.server_address[1]
    assert status(address, port, f"{address}:{port}") == 200
    assert status(address, port, f"evil.example:{port}") == 403


def test_fifty_simultaneous_connections_are_all_answered(server: ExploreServer) -> None:
    """Fifty clients connect before the server accepts any (as when they come faster than it
    accepts): the listen queue holds them all, and each gets its answer."""
    waiting = ExploreServer(("127.0.0.1", 0), server.explorer)
    port = waiting.server_address[1]
    connections: list[socket.socket] = []
    try:
        for _ in range(50):  # a full queue drops the next connection: connect times out
            connections.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        with serving(waiting):
            for connection in connections:
                connection.settimeout(TIMEOUT)
                connection.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                   f"Connection: close\r\n\r\n".encode())
            answers = [connection.makefile("rb").readline() for connection in connections]
    finally:
        for connection in connections:
            connection.close()
        waiting.server_close()
    assert answers == [b"HTTP/1.1 200 OK\r\n"] * 50


def test_closing_ends_idle_connections_and_waits_for_their_threads(
        server: ExploreServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle keep-alive client (here with no time limit on the connection) cannot hold
    the server open, and no request thread outlives server_close(): one still in torch when
    the interpreter shuts down would abort the process."""
    monkeypatch.setattr(Handler, "timeout", None)
    stopping = ExploreServer(("127.0.0.1", 0), server.explorer)
    port = stopping.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    with serving(stopping), closing(connection):
        connection.request("GET", "/api/info", headers={"Host": f"127.0.0.1:{port}"})
        assert connection.getresponse().status == 200  # the connection stays open, idle
        stopping.shutdown()
        closer = threading.Thread(target=stopping.server_close, daemon=True)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "server_close() still waits for the idle connection"
        assert not [t for t in threading.enumerate() if "process_request" in t.name]


@pytest.mark.slow
def test_explore_allow_host_in_a_real_process() -> None:
    process = capsnet("explore", "mnist", "--port", "0", "--allow-host", "capsnet.example",
                      "--dataset", "/nonexistent", stdout=subprocess.PIPE)
    try:
        line = process.stdout.readline().decode()
        assert line.startswith("capsnet explore: serving mnist at http://127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        assert status("127.0.0.1", port, f"capsnet.example:{port}") == 200
        assert status("127.0.0.1", port, f"evil.example:{port}") == 403
    finally:
        process.send_signal(signal.SIGINT)
    code, lines = finished(process)
    assert (code, lines) == (0, ["capsnet explore: stopped"])  # on failure, shows stderr too
