"""The ``capsnet`` command: train, experiment, status, evaluate, predict, figures, data, bench,
export, explore.

Every problem the user can fix ends in one line on stderr and exit code 2; Ctrl-C exits with
130 (during training after saving a resumable checkpoint); a reader that stops reading (``|
head``) ends the command quietly with 141, as a command that SIGPIPE ends.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import IO, Any, Iterator, Sequence

EXIT_BUG = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command Ctrl-C ended
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141


def exit_interrupted(signum: int, frame: Any) -> None:
    os.write(2, b"capsnet: interrupted\n")
    os._exit(EXIT_INTERRUPTED)  # nothing is written yet that would need closing


@contextmanager
def interrupt_exits() -> Iterator[None]:
    """Ctrl-C while the command loads (torch takes seconds) ends it at once with one line,
    not a traceback; a KeyboardInterrupt raised inside an import can also be swallowed by the
    library imported, which then fails later, half loaded. Where Ctrl-C is ignored (a job
    started in the background) or is not this thread's, nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    ours = (previous not in (signal.SIG_IGN, None)
            and threading.current_thread() is threading.main_thread())
    if ours:
        signal.signal(signal.SIGINT, exit_interrupted)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


with interrupt_exits():
    from ..errors import CapsNetError, error_line
    from ..nn import routing_kernel
    from ..training.trainer import TrainingInterrupted
    from ..utils.distributed import shutdown
    from ..utils.version import package_version
    from .args import EXIT_USAGE, ArgumentParser, printable
    from .tools import (add_bench, add_data, add_evaluate, add_explore, add_export, add_figures,
                        add_predict)
    from .status import add_status
    from .train import add_experiment, add_train

COMMANDS = [add_train, add_experiment, add_status, add_evaluate, add_predict, add_figures,
            add_data, add_bench, add_export, add_explore]


class OutputError(CapsNetError):
    """Standard output cannot be written: a full disk, or a reader that has gone."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write to standard output: {exc.strerror or exc}")
        self.errno = exc.errno


class GuardedOutput:
    """``stream`` whose failing writes raise :class:`OutputError`, so that they are told from
    the failures of other files."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            raise OutputError(exc) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise OutputError(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="capsnet", description="Capsule networks with dynamic routing, "
                            "self-attention routing and EM routing.")
    parser.add_argument("--version", action="version",
                        version=f"capsnet {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in COMMANDS:
        add(sub)
    return parser


def discard(stream: IO[str]) -> None:
    """Send what is left for ``stream`` to /dev/null: the interpreter flushes it at exit and
    would report the same failure again."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def report(message: str) -> None:
    """``message`` as the command's one line on stderr; nothing when stderr is gone too."""
    try:
        print(f"capsnet: {printable(message)}", file=sys.stderr, flush=True)
    except OSError:
        discard(sys.stderr)


def check_environment() -> None:
    """Refuse a bad setting in the environment before any work starts, not at the first
    model built."""
    routing_kernel.enabled()


def run(argv: Sequence[str] | None) -> int:
    check_environment()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        inputs = getattr(args, "inputs", None)  # the command's list of inputs, if it has one
        if extra and inputs and not any(e.startswith("-") for e in extra):
            getattr(args, inputs).extend(extra)  # after an option: predict a.png --model m b.png
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit:  # --help or --version: printed, and that must have worked
        sys.stdout.flush()
        raise
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --detach starts again
    code = args.run(args)
    sys.stdout.flush()  # a full disk shows here, not in the interpreter's flush at exit
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); its exit code."""
    stdout = sys.stdout
    sys.stdout = GuardedOutput(stdout)
    try:
        return run(argv)
    except OutputError as exc:
        discard(stdout)
        if exc.errno == errno.EPIPE:  # the reader has all it wants
            return EXIT_BROKEN_PIPE
        report(str(exc))
        return EXIT_USAGE
    except CapsNetError as exc:
        report(str(exc))
        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterrupted) else EXIT_USAGE
    except KeyboardInterrupt:
        report("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback on request
        if os.environ.get("CAPSNET_DEBUG"):
            raise
        report(f"internal error, please report it: {error_line(exc)} "
               f"(CAPSNET_DEBUG=1 shows the traceback)")
        return EXIT_BUG
    finally:
        sys.stdout = stdout
        shutdown()
