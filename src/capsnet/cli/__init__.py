"""The ``capsnet`` command: train, experiment, status, evaluate, predict, figures, data, bench,
export, explore.

Every problem the user can fix ends in one line on stderr and exit code 2; Ctrl-C during
training saves a resumable checkpoint and exits with 130.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ..errors import CapsNetError, error_line
from ..training.trainer import TrainingInterrupted
from ..utils.distributed import shutdown
from ..utils.version import package_version
from .args import ArgumentParser
from .tools import (add_bench, add_data, add_evaluate, add_explore, add_export, add_figures,
                    add_predict)
from .status import add_status
from .train import add_experiment, add_train

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
COMMANDS = [add_train, add_experiment, add_status, add_evaluate, add_predict, add_figures,
            add_data, add_bench, add_export, add_explore]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="capsnet", description="Capsule Networks with dynamic routing.")
    parser.add_argument("--version", action="version",
                        version=f"capsnet {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in COMMANDS:
        add(sub)
    return parser


def printable(message: str) -> str:
    """``message`` with control characters escaped (a file name may hold a newline)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --detach starts again
        return args.run(args)
    except CapsNetError as exc:
        print(f"capsnet: {printable(str(exc))}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterrupted) else EXIT_USAGE
    except KeyboardInterrupt:
        print("capsnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback on request
        if os.environ.get("CAPSNET_DEBUG"):
            raise
        print(f"capsnet: internal error, please report it: {printable(error_line(exc))} "
              f"(CAPSNET_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_BUG
    finally:
        shutdown()
