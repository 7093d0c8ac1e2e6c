"""Tasks: what a run trains. A task builds the model, serves the training batches, says what
one step computes, validates, names the metric that picks ``best.pt`` and tests; the
:class:`~capsnet.training.trainer.Trainer` does everything else (optimiser, learning-rate
schedule, epochs, checkpoints, exact resume, Ctrl-C, ``torchrun``, NaN checks, logs).

:class:`Classification` is the MNIST task: a CapsNet trained on labelled images, from
in-memory splits (the fast path) or any ``torch.utils.data.Dataset`` / ``DataLoader``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from ..data.batching import Source, batches, example_shape, num_batches
from ..data.none_images import run_pool
from ..data.splits import Split, Splits
from ..errors import CapsNetError
from ..nn.em_routing import spread_margin
from ..nn.losses import NO_CLASS
from ..nn.registry import MODELS
from ..nn.model import CapsNetConfig
from ..nn.prediction import PRESENT
from ..utils.distributed import World
from .checkpoint import ARCHITECTURES
from .config import TrainConfig, model_config_for, splits_for
from .evaluate import Evaluation, evaluate, network_loss, none_rate


SPREAD_MARGIN_START = spread_margin(0, 1)


class Step(NamedTuple):
    loss: Tensor     # scalar, the one to back-propagate
    correct: Tensor  # number of correct predictions in the batch, on the device
    count: int       # examples in the batch


class Task:
    """The interface the Trainer runs. Subclasses set the class attributes and implement the
    methods that raise ``NotImplementedError``."""

    name = "task"
    command = "capsnet train"  # the command that resumes a run of this task
    class_names: tuple[str, ...] = ()
    prepare = "mnist"
    crop_from = 0  # the side of the images training crops are cut from; 0: no crops
    architecture = "capsnet"  # key of capsnet.training.checkpoint.ARCHITECTURES
    best_metric = "loss"  # key of validate()'s result whose best value picks best.pt
    higher_is_better = False


    def resume_command(self, run_folder: Path) -> str:
        """The command that continues this task's run in ``run_folder``."""
        return f"{self.command} --resume {run_folder}"
    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def model_config(self) -> Any:
        """The config dataclass of the model to train."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        model_class, _ = ARCHITECTURES[self.architecture]
        return model_class(self.model_config())

    def check_model(self, model: nn.Module, expected: Any, source: str) -> None:
        """Refuse a model (from a checkpoint at ``source``) whose config is not the
        ``expected`` one, the config of the model this task built. (Not recomputed here: the
        memory check in :meth:`model_config` would then count the loaded weights twice.)"""
        if model.config != expected:
            raise CapsNetError(f"{source}: the checkpoint's model does not fit this run's data "
                               f"and settings ({describe_model(model.config)} vs "
                               f"{describe_model(expected)})")

    def to(self, device: torch.device) -> None:
        """Move data that lives with the model (on a GPU) to ``device``."""

    def num_batches(self, world: World) -> int:
        raise NotImplementedError

    def batches(self, seed: int, start: int, device: torch.device, world: World) -> Iterable[Any]:
        """The training batches of the epoch with ``seed`` from batch ``start`` on."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Any) -> Step:
        """Forward pass and loss of one training batch (the Trainer does backward and Adam)."""
        raise NotImplementedError

    def schedule(self, step: int, total_steps: int) -> None:
        """Set what changes with the optimiser step (0-based, of ``total_steps``) before
        it is taken, as the learning rate does."""

    def validate(self, model: nn.Module, device: torch.device, world: World) -> dict[str, float]:
        raise NotImplementedError

    def test(self, model: nn.Module, device: torch.device, world: World) -> dict[str, Any]:
        """Test figures of the best model, for summary.json."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What this task is, for config.json and the checkpoints (JSON-able)."""
        return {"name": self.name}

    def labels(self) -> dict[str, Any]:
        """What a trained model's outputs mean, stored with it: class names, and how to
        prepare a user's image ("mnist": centred as MNIST's digits; "resize": only resized;
        ``crop_from``: the side it is made before its centre crop, 0 for none)."""
        return {"class_names": list(self.class_names), "prepare": self.prepare,
                "crop_from": self.crop_from}


class Classification(Task):
    """A CapsNet learning the classes of images.

    ``train``, ``val`` and ``test`` are :class:`Split` s (uint8 tensors, cut into batches on
    the device they live on) or any ``Dataset`` of ``(image, label)`` (image ``(C, H, W)``,
    uint8 or float in [0, 1]) or a ``DataLoader`` over one (its workers and collate function
    are used; the order is the task's own, so resume stays exact). Square images.
    """

    name = "classification"

    def __init__(self, config: TrainConfig, train: Source, val: Source, test: Source, *,
                 num_classes: int, class_names: tuple[str, ...] | None = None,
                 prepare: str = "resize") -> None:
        super().__init__(config)
        self.train, self.val, self.test_set = train, val, test
        self.num_classes = num_classes
        self.class_names = class_names or tuple(str(i) for i in range(num_classes))
        self.prepare = prepare
        channels, height, width = example_shape(train)
        if height != width:
            raise CapsNetError(f"images must be square, got {height}x{width}")
        if config.crop > height:
            raise CapsNetError(f"--crop {config.crop} is larger than the {height}x{height} images")
        self.image_size, self.in_channels = config.crop or height, channels
        self.crop_from = height if config.crop else 0
        self.margin = SPREAD_MARGIN_START
        # images of no class, drawn into every training batch (--none-fraction)
        self.none_pool = (run_pool(self.image_size, channels, config.seed, prepare == "mnist",
                                   "train", self.crop_from) if config.none_fraction else None)

    @classmethod
    def from_config(cls, config: TrainConfig, data_dir: str | None = None) -> "Classification":
        """The task of ``config.dataset`` (a registered name or a folder of IDX files), split
        as the config says and cut to ``train_limit``."""
        return cls.from_splits(config, splits_for(config, data_dir))

    @classmethod
    def from_splits(cls, config: TrainConfig, splits: Splits) -> "Classification":
        return cls(config, splits.train.first(config.train_limit), splits.val, splits.test,
                   num_classes=splits.num_classes, class_names=splits.class_names,
                   prepare=splits.prepare)

    @property
    def architecture(self) -> str:  # type: ignore[override]
        return MODELS[self.config.network].architecture

    @property
    def loss_kind(self) -> str:
        return MODELS[self.config.network].loss

    @property
    def best_metric(self) -> str:  # type: ignore[override]
        # class activations are not capsule lengths: pick best.pt by accuracy for them
        return "accuracy" if self.loss_kind == "spread" else "loss"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.best_metric == "accuracy"

    def model_config(self) -> CapsNetConfig:
        return model_config_for(self.config, self.image_size, self.in_channels,
                                self.num_classes)

    def to(self, device: torch.device) -> None:
        if device.type == "cuda":  # the whole data set lives on the GPU
            self.train, self.val, self.test_set = (
                s.to(device) if isinstance(s, Split) else s
                for s in (self.train, self.val, self.test_set))
            if self.none_pool is not None:
                self.none_pool = self.none_pool.to(device)

    def num_batches(self, world: World) -> int:
        return num_batches(len(self.train), self.config.batch_size, world.world_size)

    def batches(self, seed: int, start: int, device: torch.device, world: World
                ) -> Iterable[tuple[Tensor, Tensor]]:
        labelled = batches(self.train, self.config.batch_size, seed=seed,
                           max_shift=self.config.max_shift, augment=self.config.augment,
                           crop=self.config.crop, rotation=self.config.rotation,
                           start=start, device=device, rank=world.rank,
                           world_size=world.world_size)
        if self.none_pool is None:
            return labelled
        return self.with_none_images(labelled, seed, start, device, world)

    def with_none_images(self, labelled: Iterable[tuple[Tensor, Tensor]], seed: int, start: int,
                         device: torch.device, world: World) -> Iterable[tuple[Tensor, Tensor]]:
        """Each batch with images of no class (label ``NO_CLASS``) after its own: which ones
        is drawn for the whole pass from ``seed``, as the order is, so a resumed pass adds
        the same ones."""
        per_rank = max(1, round(self.config.batch_size // world.world_size
                                * self.config.none_fraction))
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(self.none_pool), (self.num_batches(world), world.world_size,
                                                    per_rank), generator=generator)
        picks = picks[:, world.rank].to(self.none_pool.device)  # (batches, per_rank)
        no_class = torch.full((per_rank,), NO_CLASS, device=device)
        for index, (images, labels) in enumerate(labelled, start=start):
            extra = self.none_pool[picks[index]]
            extra = extra.to(device, non_blocking=True).float().div_(255.0)
            yield torch.cat([images, extra]), torch.cat([labels, no_class])

    def schedule(self, step: int, total_steps: int) -> None:
        if self.loss_kind == "spread":  # the paper: from 0.2 up to 0.9 during training
            ramp_epochs = self.config.margin_ramp_epochs or self.config.epochs
            self.margin = spread_margin(step, total_steps * ramp_epochs // self.config.epochs)

    def loss(self, out: Any, images: Tensor, labels: Tensor) -> Tensor:
        loss, _, _ = network_loss(out, images, labels, self.loss_kind, self.margin,
                                  self.config.reconstruction_weight,
                                  self.config.reconstruction_reduction, self.config.margin_loss,
                                  no_class=self.none_pool is not None)
        return loss

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Step:
        images, labels = batch
        if self.none_pool is None:
            out = model(images, labels)
            return Step(self.loss(out, images, labels), (out.predictions == labels).sum(),
                        len(labels))
        out = model(images, labels.clamp(min=0))  # what no-class rows reconstruct is not used
        answered_none = out.lengths.max(dim=1).values < PRESENT
        correct = torch.where(labels == NO_CLASS, answered_none, out.predictions == labels)
        return Step(self.loss(out, images, labels), correct.sum(), len(labels))

    def evaluation(self, model: nn.Module, source: Source, device: torch.device,
                   world: World) -> Evaluation:
        config = self.config
        return evaluate(model, source, batch_size=config.eval_batch_size, device=device,
                        reconstruction_weight=config.reconstruction_weight,
                        reduction=config.reconstruction_reduction,
                        margin_form=config.margin_loss, loss_kind=self.loss_kind,
                        precision=config.precision, world=world, crop=config.crop,
                        batch_flag="--eval-batch-size")

    def validate(self, model: nn.Module, device: torch.device, world: World) -> dict[str, float]:
        result = self.evaluation(model, self.val, device, world)
        return {"loss": result.loss, "accuracy": result.accuracy}

    def test(self, model: nn.Module, device: torch.device, world: World) -> dict[str, Any]:
        result = self.evaluation(model, self.test_set, device, world)
        figures = {"test_accuracy": result.accuracy, "test_loss": result.loss}
        if self.none_pool is not None:  # images of no class the run never trained on
            unseen = run_pool(self.image_size, self.in_channels, self.config.seed,
                              self.prepare == "mnist", "test", self.crop_from)
            figures["test_none_rate"] = none_rate(
                model, unseen, batch_size=self.config.eval_batch_size, device=device,
                precision=self.config.precision, world=world)
        return figures


def check_fits(config: Any, dataset: str, image_size: int, in_channels: int,
               num_classes: int) -> None:
    """Refuse a model (its ``config``) that cannot take ``dataset``'s images and classes."""
    if (config.image_size, config.in_channels, config.num_classes) != (
            image_size, in_channels, num_classes):
        raise CapsNetError(
            f"the checkpoint's model takes {describe_model(config)}; {dataset} has "
            f"{in_channels}x{image_size}x{image_size} images, {num_classes} classes")


def describe_model(config: Any) -> str:
    """Geometry of a model config, for messages: ``1x28x28 images, 10 classes``."""
    return (f"{config.in_channels}x{config.image_size}x{config.image_size} images, "
            f"{config.num_classes} classes")
