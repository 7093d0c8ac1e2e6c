"""What every experiment is: a name, its own settings dataclass (each field a flag, as
:class:`~capsnet.training.config.TrainConfig`'s are), the training defaults it changes, and a
``run`` that trains its tasks with the one :class:`~capsnet.training.trainer.Trainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

VAL_SEED = 1_000_001  # generated evaluation sets are the same in every run, whatever --seed
TEST_SEED = 2_017_000
# An experiment makes its own input (digits placed, shifted and overlaid on a canvas): a
# preset's crops, turns and augmentation are replaced, and asking for them is refused.
OWN_INPUT = {"crop": 0, "rotation": 0.0, "augment": "shift"}


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    settings: type  # a settings dataclass (capsnet.utils.settings)
    # (config, settings, run_dir, *, data_dir, resume, from_best, show_progress), called
    # while the command holds run_dir (Run.training_here: locked, checked, train.pid)
    run: Callable[..., dict[str, Any]]
    report: Callable[[dict[str, Any]], str]  # summary -> lines for the terminal
    train_defaults: dict[str, Any] = field(default_factory=dict)  # on top of the preset
    networks: tuple[str, ...] = ()  # the --network values it can train; (): every one
