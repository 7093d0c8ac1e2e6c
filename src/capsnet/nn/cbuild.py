"""Building and loading the library's C kernels (``routing_kernel.c``, ``em_kernel.c``),
and declaring the torch operators that call them. A kernel is built with the system's C
compiler (``$CC``, else gcc or cc; torch.compile needs one on a CPU too), once per source,
CPU kind and set of compile-time sizes, into ``$XDG_CACHE_HOME/capsnet/kernels``. A cached
library that does not load or lacks the kernel's functions is built again; when none
builds, the caller routes in torch."""

from __future__ import annotations

import _ctypes  # dlclose: ctypes itself never unloads a library
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..errors import CapsNetError
from ..utils.files import cache_root

# The "capsnet" namespace of torch operators (torch.ops.capsnet)
OPERATORS = torch.library.Library("capsnet", "FRAGMENT")

ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
             "AVX2": ["-mavx2", "-mfma"]}

class Build(NamedTuple):
    """One way to build a kernel: the source text it compiles, read once so that the library
    and the version it reports come from the same text, with compiler flags, libraries and
    the cached file."""
    text: bytes
    flags: list[str]
    libraries: list[str]
    target: Path


class Library(ctypes.CDLL):
    """A loaded kernel and ``version``, the name and hash of the source it was built from
    (:func:`source_version`), which bench and training records keep."""

    def __init__(self, path: Path, version: str) -> None:
        super().__init__(str(path))
        self.version = version


def builds(source: Path, name: str, defines: list[str], isa: str | None = None) -> list[Build]:
    """The ways to build ``source`` with ``defines`` for the instruction set ``isa`` (this
    CPU's by default; a name torch's ``get_cpu_capability`` gives), best first; each cached
    file is named by ``name``, the instruction set and a hash of the source and flags."""
    isa = isa or torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-fassociative-math", "-fno-signed-zeros", *ISA_FLAGS.get(isa, []), *defines]
    text = source.read_bytes()
    found = []
    # glibc's vector expf (libmvec) where the system has it, else the scalar one
    for extra, libraries in ((["-DVECTOR_EXP"], ["-lmvec", "-lm"]), ([], ["-lm"])):
        key = hashlib.sha256(text + " ".join(flags + extra + libraries).encode()).hexdigest()
        target = cache_root() / "kernels" / f"{name}-{isa.lower()}-{key[:16]}.so"
        found.append(Build(text, flags + extra, libraries, target))
    return found


def load(source: Path, candidates: Callable[[], list[Build]],
         declare: Callable[[Library], Library], what: str) -> Library | None:
    """The first of the ``candidates`` builds of ``source`` that loads with the functions
    ``declare`` names, built on first use; None, with a warning that ``what`` runs in torch,
    when none does."""
    error = ""
    try:
        found = candidates()
    except CapsNetError as exc:  # no cache folder to build in (a bad HOME): route in torch
        found, error = [], str(exc)
    for build in found:
        version = source_version(source.stem, build.text)
        lib, error = _load(build.target, version, declare) if build.target.exists() else (None, "")
        if lib is None:  # not built yet, or left broken (an earlier compiler's): built once
            error = _compile(source.name, build) or ""
            if not error:
                lib, error = _load(build.target, version, declare)
        if lib is not None:
            return lib
    warnings.warn(f"capsnet: {what} runs in torch, its CPU kernel did not build ({error})",
                  stacklevel=3)
    return None


def _compile(name: str, build: Build) -> str | None:
    """Compile ``build``'s text, as a file called ``name``, into its target; what went wrong
    when it fails."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return "no C compiler found (set CC)"
    try:
        build.target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=build.target.parent) as scratch:
            source, built = Path(scratch) / name, Path(scratch) / build.target.name
            source.write_bytes(build.text)  # the text hashed, whatever the file holds now
            run = subprocess.run([compiler, *build.flags, str(source), "-o", str(built),
                                  *build.libraries], capture_output=True, text=True)
            if run.returncode != 0:
                return (run.stderr.strip().splitlines() or ["failed"])[-1]
            os.replace(built, build.target)  # whole or not at all, for processes building at once
    except OSError as exc:
        return f"{exc.filename or compiler}: {exc.strerror or exc}"
    return None


def _load(target: Path, version: str, declare: Callable[[Library], Library]
          ) -> tuple[Library | None, str]:
    """The library in ``target`` with its functions declared, or None and why not."""
    try:
        lib = Library(target, version)
    except OSError as exc:
        return None, str(exc)
    try:
        return declare(lib), ""
    except AttributeError as exc:  # a library, but without the kernel's functions
        _ctypes.dlclose(lib._handle)  # else loading the rebuilt file would return this one
        return None, str(exc)


def source_version(name: str, text: bytes) -> str:
    """A kernel's name and a hash of its source text: which code routed, as bench and
    training records keep it (``em_kernel-1a2b3c4d5e6f``)."""
    return f"{name}-{hashlib.sha256(text).hexdigest()[:12]}"


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def operator(name: str) -> Callable[[Callable[..., Any]], torch._ops.OpOverload]:
    """Declare the torch operator ``capsnet::name`` with the decorated function as its CPU
    kernel and its schema read from the function's annotations; returns the operator (with
    the function's docstring), to which torch.library adds a fake kernel, other devices'
    kernels and a backward.

    torch.library.custom_op does the same but wraps every kernel in torch._dynamo.disable,
    which imports torch._dynamo on the first call: about 1.5 s of every process that routes
    (``capsnet predict``, ``evaluate``). Nothing needs that wrapper here: a compiled model
    calls the operator from its graph through the fake kernel and never traces this one.
    """
    def declare(kernel: Callable[..., Any]) -> torch._ops.OpOverload:
        OPERATORS.define(torch.library.infer_schema(kernel, mutates_args=(), op_name=name))
        OPERATORS.impl(name, kernel, "CPU")
        op = getattr(torch.ops.capsnet, name).default
        op.__doc__ = kernel.__doc__
        return op
    return declare
