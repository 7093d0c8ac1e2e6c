"""``capsnet train`` and ``capsnet experiment NAME``: flags generated from the settings
dataclasses, presets applied first, ``--resume`` by one rule."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import CapsNetError
from ..experiments import EXPERIMENTS, OWN_INPUT
from ..training.config import PRESETS, TrainConfig, make_config, resume_config
from ..training.run import LOCK_FD_VARIABLE, Run
from ..training.status import last_line
from ..training.trainer import train
from ..utils.device import resolve_device
from ..utils.files import check_writable_folder
from ..utils.settings import settings_from_dict
from .args import ArgumentParser, add_settings, given_settings

DETACH_FLAGS = ("--deta", "--detac", "--detach")  # argparse takes any unambiguous prefix


def add_run_args(p: argparse.ArgumentParser, default_run_dir: str) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper: the paper and its official code (default); seed: the notebook "
                        "exactly; quick: the paper's model briefly, for a CPU; cifar10: "
                        "the paper's CIFAR-10 settings; efficient: Efficient-CapsNet's "
                        "MNIST recipe; em: EM routing's MNIST network")
    p.add_argument("--run-dir", type=Path, help=f"where checkpoints and logs go "
                   f"(default: {default_run_dir})")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--from-best", action="store_true",
                   help="with --resume: continue from best.pt instead of last.pt (which is "
                        "kept, renamed)")
    p.add_argument("--data-dir", help="folder holding the data set's IDX files "
                   "(default: $CAPSNET_DATA_DIR, then the cache, then download)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings(p, TrainConfig)


def requested_config(args: argparse.Namespace, defaults: dict[str, Any]) -> TrainConfig:
    """The preset, then ``defaults``, then the flags given; on --resume the run's own
    settings with the flags --resume may change."""
    given = given_settings(args, TrainConfig)
    if args.resume is not None:
        return resume_config(Run(args.resume).saved_config(args.from_best), given)
    return make_config(args.preset, defaults=defaults, **given)


def run_folder(args: argparse.Namespace, config: TrainConfig, default: Path) -> Path:
    """The run's folder: --resume's, or a new one that must not hold anything of a run;
    checked, with the device, before any work and before anything is written. The training
    checks the folder again once it holds its lock (:meth:`Run.claimed`)."""
    if args.from_best and args.resume is None:
        raise CapsNetError("--from-best goes with --resume RUN_DIR")
    resolve_device(config.device)
    run_dir = args.resume or args.run_dir or default
    check_writable_folder(run_dir, "run folder")
    run = Run(run_dir)
    if not run.main:  # under torchrun, rank 0 checks and holds the folder for every rank
        return run_dir
    run.check_free()
    if args.resume is None and not run.lock_passed_down():  # passed down: checked under it
        run.check_unused()
    return run_dir


# -- train ------------------------------------------------------------------------------

def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CapsNet, validate each epoch, test the best",
                       description="Train a CapsNet. A preset sets every default; flags override it.")
    add_run_args(p, "runs/<dataset>-<preset>")
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="start a new run from a checkpoint's weights and optimizer state "
                        "(the notebook's restore_checkpoint=True)")
    p.add_argument("--figures", action="store_true", help="draw the figures at the end")
    p.add_argument("--detach", action="store_true",
                   help="train in the background, in a session of its own (closing the "
                        "terminal does not stop it): output in RUN_DIR/train.log, process id "
                        "in RUN_DIR/train.pid; returns once the training has started; "
                        "capsnet status RUN_DIR shows how it is doing")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.init_from is not None and args.resume is not None:
        raise CapsNetError("--init-from starts a new run; it cannot be combined with --resume")
    config = requested_config(args, {})
    default = Path("runs") / f"{Path(config.dataset).name}-{config.preset}"
    run_dir = run_folder(args, config, default)
    if args.detach:
        return detach(args.argv, run_dir, new=args.resume is None)
    with Run(run_dir).training_here(new=args.resume is None):  # the figures too
        summary = train(config, run_dir, data_dir=args.data_dir, resume=args.resume is not None,
                        from_best=args.from_best, init_from=args.init_from,
                        show_progress=not args.no_progress)
        speed = summary["train_images_per_s"]  # None when a resumed run had nothing to train
        print(f"test accuracy {summary['test_accuracy']:.2%}, test loss "
              f"{summary['test_loss']:.5f}, {summary['wall_seconds']:.0f} s, "
              f"{'nothing left to train' if speed is None else f'{speed:.0f} images/s'} on "
              f"{summary['device']}")
        print(f"best checkpoint: {summary['checkpoint']}; summary: {Run(run_dir).summary_file}")
        if args.figures:
            from ..tools.figures import draw_figures  # matplotlib: 0.3 s other commands skip

            figures = Run(run_dir).figures
            paths = draw_figures(summary["checkpoint"], figures, data_dir=args.data_dir,
                                 run_dir=run_dir)
            print(f"figures: {figures} ({len(paths)} files)")
    return 0


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What changes when ``path`` is written again (atomically: a new inode)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def detach(argv: list[str], run_dir: Path, *, new: bool) -> int:
    """Start this training again without --detach, in a session of its own, its output in
    RUN_DIR/train.log, handing it the folder's lock (taken and checked here first, so no
    other process gets in between). Returns once it is past the checks a training makes
    before it starts (data, checkpoints: it has written config.json), or with its last line
    and exit code when it failed them, the folder left as it was."""
    run = Run(run_dir)
    with run.claimed(new=new) as lock:
        config_file, log_file = run.config_file, run.log_file
        before, log_size = file_stamp(config_file), file_size(log_file)
        command = [sys.executable, "-m", "capsnet.cli",
                   *(a for a in argv if a not in DETACH_FLAGS)]
        with open(log_file, "ab") as log:  # appended: a resumed run keeps its earlier calls
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=(lock.fd,),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          LOCK_FD_VARIABLE: str(lock.fd)})
        while child.poll() is None and file_stamp(config_file) == before:
            time.sleep(0.1)
        if child.returncode:
            run.forget_pid(child.pid)  # in case it was killed before removing it itself
            return failed_to_start(child.returncode, log_file, log_size)
        lock.hand_over()
    folder = shlex.quote(str(run_dir))
    print(f"training in the background as process {child.pid}: {run_dir}\n"
          f"  watch it:  capsnet status {folder}   (its output: {log_file})\n"
          f"  stop it:   kill -INT {child.pid}   (saves a checkpoint to resume from)\n"
          f"  resume it: capsnet train --resume {folder} --detach")
    return 0


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def failed_to_start(code: int, log_file: Path, log_size: int | None) -> int:
    """Say why a detached training stopped before it started, as it said it, and take its
    output out of the log again (the log goes when this call made it)."""
    line = None
    with contextlib.suppress(CapsNetError):
        line = last_line(log_file)
    print(line or f"capsnet: the training stopped (exit code {code})", file=sys.stderr)
    with contextlib.suppress(OSError):
        if log_size is None:
            log_file.unlink()
        else:
            os.truncate(log_file, log_size)
    return code if code > 0 else 1


# -- experiment -------------------------------------------------------------------------

def add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's experiments beyond MNIST: "
                       + ", ".join(EXPERIMENTS), description="Experiments beyond MNIST.")
    experiments = p.add_subparsers(dest="experiment", required=True, parser_class=ArgumentParser)
    for name, experiment in EXPERIMENTS.items():
        e = experiments.add_parser(name, help=experiment.description.split(":")[0],
                                   description=experiment.description)
        add_run_args(e, f"runs/{name}-<dataset>")
        add_settings(e, experiment.settings)
        e.set_defaults(run=run_experiment)


def resumed_experiment(args: argparse.Namespace, settings_class: type) -> tuple[TrainConfig, Any]:
    """The training settings and experiment settings of the run in ``args.resume`` (from its
    first checkpoint), with the flags --resume may change; other flags must agree."""
    home = Run(args.resume)
    runs = [run for run in (home, *home.parts()) if run.checkpoint(args.from_best).is_file()]
    if not runs:
        raise CapsNetError(f"--resume {args.resume}: no {home.checkpoint(args.from_best).name} "
                           f"there to resume from")
    first = runs[0].checkpoint(args.from_best)
    payload = runs[0].resume_point(args.from_best)
    task = payload.get("task")
    names = {f.name for f in fields(settings_class)}
    stored = {k: v for k, v in task.items() if k in names} if isinstance(task, dict) else task
    settings = settings_from_dict(settings_class, stored, f"{first}: experiment settings")
    for name, value in given_settings(args, settings_class).items():
        if value != getattr(settings, name):
            raise CapsNetError(f"--resume keeps the run's settings: {name} is "
                               f"{getattr(settings, name)!r} there, not {value!r}")
    config = resume_config(TrainConfig.from_dict(payload["train_config"]),
                           given_settings(args, TrainConfig))
    return config, settings


def run_experiment(args: argparse.Namespace) -> int:
    experiment = EXPERIMENTS[args.experiment]
    if args.resume is not None:
        config, settings = resumed_experiment(args, experiment.settings)
    else:
        settings = experiment.settings(**given_settings(args, experiment.settings))
        config = requested_config(args, experiment.train_defaults)
    asked = [f"--{name} {getattr(config, name)}" for name, value in OWN_INPUT.items()
             if getattr(config, name) != value]
    if asked:
        raise CapsNetError(f"experiment {args.experiment} places and shifts its digits itself; "
                           f"{' and '.join(asked)} {'is' if len(asked) == 1 else 'are'} "
                           f"for capsnet train")
    if config.none_fraction:
        raise CapsNetError(f"experiment {args.experiment} has no images of no class; "
                           f"--none-fraction is for capsnet train")
    if experiment.networks and config.network not in experiment.networks:
        raise CapsNetError(f"experiment {args.experiment} trains --network "
                           f"{' or '.join(experiment.networks)}, not {config.network}")
    default = Path("runs") / f"{args.experiment}-{Path(config.dataset).name}"
    run_dir = run_folder(args, config, default)
    with Run(run_dir).training_here(new=args.resume is None):
        summary = experiment.run(config, settings, run_dir, data_dir=args.data_dir,
                                 resume=args.resume is not None, from_best=args.from_best,
                                 show_progress=not args.no_progress)
    print(experiment.report(summary))
    print(f"summary: {Run(run_dir).summary_file}")
    return 0
