"""Training settings: the one dataclass, its presets, the learning-rate schedule and the rule
for what ``--resume`` may change.

``paper`` (the default) follows Sabour et al. and, where the paper is silent, its official
code; ``seed`` is the tutorial notebook exactly; ``quick`` is the paper's model trained
briefly, for a CPU. docs/PRESETS.md gives each value's source. Every field is a command-line
flag (``--batch-size`` for ``batch_size``) that overrides the preset.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..data.augment import AUGMENTS
from ..data.folders import DEFAULT_SIZE, class_names_of, is_class_folder_data_set
from ..data.splits import Splits, load_splits, recorded_dataset
from ..errors import CapsNetError
from ..nn.losses import MARGIN_FORMS, REDUCTIONS
from ..nn.em_routing import EMCapsNetConfig
from ..nn.model import CapsNetConfig
from ..nn.registry import MODELS, model_config
from ..utils.memory import capsnet_image_bytes, capsnet_state_bytes, check_memory
from ..utils.settings import (MAX_IMAGE_SIDE, check_settings, setting, settings_from_dict, short,
                              training_fields, training_fields_of)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")
VAL_SPLITS = ("first", "last")
PRESET_NAMES = ("paper", "seed", "quick", "cifar10", "efficient", "em")
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_AFTER_STEPS = 500  # compiling costs about 20 s on a CPU and saves 15% to 30% a step
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
@training_fields_of(EMCapsNetConfig)
@training_fields_of(CapsNetConfig)
class TrainConfig:
    """Everything a training run depends on, apart from where its files go. The model's
    architecture fields a run chooses (``routing_iterations``, ``init``, ...) are declared in
    :class:`~capsnet.nn.model.CapsNetConfig` and
    :class:`~capsnet.nn.em_routing.EMCapsNetConfig` (``train=``) and come after these."""

    preset: str = setting("paper", "the preset these settings started from",
                          choices=PRESET_NAMES, flag=False)
    dataset: str = setting("mnist", "mnist, fashion-mnist, cifar10, svhn, smallnorb, or a "
                           "folder of IDX files or of class folders")
    network: str = setting("capsnet", "the network: " + "; ".join(
        f"{name}: {entry.summary}" for name, entry in MODELS.items()) + " (the architecture "
        "flags below shape the capsnet; the others take --routing-iterations where they "
        "iterate)", choices=tuple(MODELS), before="capsnet")
    epochs: int = setting(30, "passes over the training set", min=1, max=100_000, resume=True)
    batch_size: int = setting(128, "images per optimizer step (the global batch under torchrun)",
                              min=1, max=65_536)
    eval_batch_size: int = setting(500, "images per batch when validating and testing",
                                   min=1, max=65_536)
    lr: float = setting(1e-3, "Adam learning rate", gt=0, lt=1)
    lr_decay: float = setting(0.96, "multiply the learning rate by this every "
                              "--lr-decay-steps steps (continuously)", gt=0, max=1)
    lr_decay_steps: int = setting(2000, "steps per --lr-decay", min=1)
    lr_min: float = setting(0.0, "the decayed learning rate stops at this floor (0: none); at "
                            "most --lr", min=0, lt=1, before=0.0)
    warmup_steps: int = setting(0, "raise the learning rate linearly over the first N steps",
                                min=0, max=10_000_000)
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights, "
                               "moving 1 - this towards them after every step (e.g. 0.999); "
                               "validation, best.pt and the test use the average, and the "
                               "checkpoints keep the trained weights too, to resume from (0: "
                               "off)", min=0, lt=1, before=0.0)
    ema_warmup: bool = setting(True, "with --ema-decay, raise the average's decay over the "
                               "first steps as min(decay, (1 + step) / (10 + step)), so that "
                               "the average soon leaves the initial weights behind",
                               before=False)
    max_shift: int = setting(2, "random shift of each training image, in pixels, each axis "
                             "(0: none; unused with --augment efficient)", min=0, max=8)
    augment: str = setting("shift", "training images' augmentation: shift: --max-shift "
                           "pixel shifts; efficient: Efficient-CapsNet's MNIST rotations "
                           "(under 30 degrees), shifts within the frame, squeezes and erased "
                           "4x4 patches, in place of --max-shift", choices=AUGMENTS,
                           before="shift")
    none_fraction: float = setting(0.0, "add this share of the batch size to each training "
                                   "batch as images of no class (noise and flat grey, as they "
                                   "come and as predict prepares such photos), every capsule's target "
                                   "absent, so that the model answers none for them (0: off; "
                                   "the training accuracy counts a none answer to one as right)",
                                   min=0, max=1, before=0.0)
    crop: int = setting(0, "train on random crop x crop windows, evaluate on the centre one "
                        "(0: whole images)", min=0, max=MAX_IMAGE_SIDE)
    rotation: float = setting(0.0, "rotate each training image (after --crop) about its "
                              "centre by a uniform angle within this many degrees either way "
                              "(0: none; unused with --augment efficient)", min=0, max=180)
    margin_ramp_epochs: int = setting(
        0, "spread loss (EM routing): its margin rises from 0.2 to 0.9 over this many epochs "
        "(0: all of --epochs); --resume with other --epochs keeps the ramp the run began with",
        min=0, max=100_000)
    margin_loss: str = setting("paper", "paper: eq. 4; official: the official code's "
                               "(half, and a mean over classes)", choices=MARGIN_FORMS)
    reconstruction_reduction: str = setting("sum", "squared error summed over pixels (paper) "
                                            "or averaged (notebook)", choices=REDUCTIONS)
    reconstruction_weight: float = setting(0.0005, "weight of the reconstruction loss",
                                           min=0, max=1)
    val_size: int = setting(0, "training images held out for validation (class folders "
                            "without val/ or test/: as many for each, stratified by class); "
                            "0: 5,000, or for class folders a tenth of each class", min=0,
                            before=5000)
    val_split: str = setting("first", "hold out the first training images (TensorFlow's "
                             "read_data_sets, the notebook's) or the last", choices=VAL_SPLITS,
                             before="last")
    train_limit: int = setting(0, "train on the first N training images only (0: all)", min=0)
    image_size: int = setting(0, "class-folder data sets: the side images are resized to "
                              "(0: 28)", min=0, max=MAX_IMAGE_SIDE)
    channels: int = setting(0, "class-folder data sets: 1 (grayscale) or 3 (colour); 0: colour "
                            "when any image is", min=0, max=3)
    seed: int = setting(0, "random seed of the weights, the data order and the augmentation",
                        min=0, max=MAX_SEED)
    time_limit: float = setting(0.0, "seconds this call may train: no epoch starts that would end "
                                "past it (0: no limit); the summary says where it stopped",
                                min=0, resume=True)
    stop_at: float = setting(0.0, "stop after the first epoch whose validation accuracy reaches "
                             "this, e.g. 0.992 (0: off); the summary says where it stopped",
                             min=0, max=1, resume=True)
    device: str = setting("auto", "auto: CUDA when available", choices=DEVICES, resume=True)
    precision: str = setting("fp32", "bf16: autocast matmuls and convolutions to bfloat16; "
                             "auto: bf16 on a CPU with AMX, else fp32",
                             choices=PRECISIONS)
    compile: str = setting("auto", "torch.compile the model: on, off, or auto (on for runs of "
                           f"at least {COMPILE_AFTER_STEPS} steps, where the compile time "
                           "pays)", choices=COMPILE_CHOICES, resume=True)
    cuda_graphs: bool = setting(False, "replay each training step from a CUDA graph captured "
                                "once per batch shape (fewer kernel launches; CUDA only, not "
                                "under torchrun)", resume=True)
    log_every: int = setting(50, "steps between points of the training curve (loss and "
                             "accuracy of the steps since the last) in metrics.jsonl and "
                             "TensorBoard; 0: per epoch only", min=0, max=10_000_000,
                             resume=True, before=0)
    deterministic: bool = setting(False, "use only deterministic algorithms")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.lr_min > self.lr:
            raise CapsNetError(f"--lr-min {self.lr_min:g} is above --lr {self.lr:g}: the floor "
                               f"of the learning rate must not exceed it")
        if self.cuda_graphs and self.device == "cpu":
            raise CapsNetError("--cuda-graphs needs a CUDA device, not --device cpu")
        if self.none_fraction and MODELS[self.network].loss == "spread":
            raise CapsNetError(f"--none-fraction needs the margin loss; {self.network}'s spread "
                               f"loss has no answer for an image of no class")
        if self.margin_ramp_epochs and MODELS[self.network].loss != "spread":
            raise CapsNetError(f"--margin-ramp-epochs ramps the spread loss's margin; "
                               f"{self.network} trains with the margin loss")
        if self.cuda_graphs and MODELS[self.network].loss == "spread":
            raise CapsNetError(f"--cuda-graphs cannot replay {self.network}'s spread loss, "
                               f"whose margin changes every step")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "TrainConfig":
        """Settings from stored ``data`` (a checkpoint, config.json): checked as flags are.
        ``compile`` was true or false before it could be ``auto``."""
        if isinstance(data, dict) and isinstance(data.get("compile"), bool):
            data = {**data, "compile": "on" if data["compile"] else "off"}
        return settings_from_dict(cls, data, "training settings")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "seed": dict(epochs=10, batch_size=50, routing_iterations=2, lr_decay=1.0, max_shift=0,
                 reconstruction_reduction="mean", init="glorot", primary_style="notebook",
                 routing_bias=False),
    # 99% on a 2-core CPU in under five minutes: the notebook's network and losses (which
    # learn fastest in a first epoch), one pass over all 55,000 images, bf16 where the CPU
    # has AMX (docs/PRESETS.md gives each choice's measured effect).
    "quick": dict(epochs=1, batch_size=50, routing_iterations=2, lr_decay=1.0, max_shift=0,
                  reconstruction_reduction="mean", init="glorot", primary_style="notebook",
                  routing_bias=False, precision="auto"),
    # The paper's section 7 on CIFAR-10: 24x24 crops, 64 primary capsule maps, a
    # none-of-the-above capsule in the routing softmax, 3 iterations (its 10.6% error is an
    # ensemble of 7 such models).
    "cifar10": dict(dataset="cifar10", crop=24, max_shift=0, primary_maps=64,
                    leaky_routing=True),
    # Efficient-CapsNet's MNIST recipe (its official code's config.json): batch 16, Adam at
    # 5e-4 decayed by 0.97 an epoch (3,438 steps of 16 of 55,000 images), 150 epochs, the
    # reconstruction as 0.392 x the mean squared error (= 0.0005 x the sum), the learning
    # rate's floor of 5e-5 (utils/tools.py), and its augmentation (utils/pre_process_mnist.py:
    # rotations, shifts within the frame, squeezes, erased patches), which replaces the
    # pixel shifts (max_shift 0 says so).
    "efficient": dict(network="efficient-capsnet", batch_size=16, lr=5e-4, lr_decay=0.97,
                      lr_decay_steps=3438, lr_min=5e-5, epochs=150, augment="efficient",
                      max_shift=0),
    # Matrix capsules with EM routing, the network of the paper's Figure 1 (its 0.44% MNIST
    # error): the spread loss (margin 0.2 to 0.9 over the run), no decoder, batch 64 (the
    # authors' on OpenReview); 2 iterations rather than the paper's "normally 3" and Adam at
    # 1e-2, as yl-1993/Matrix-Capsules-EM-PyTorch found best on MNIST; they learn far
    # faster here (80.51% after 150 steps against 14.89%, docs/PRESETS.md). The input is
    # the authors' released code's for MNIST (google-research/capsule_em, mnist_record.py):
    # random 24x24 crops turned by up to 15 degrees, the centre crop to test, no shifts.
    # 60 epochs with the learning rate falling tenfold over them (0.9 every 2,360 steps of
    # the 51,600 that 55,000 images make at 64 a step) and averaged weights: the best of the
    # schedules measured (docs/RESULTS.md). The rest is the paper preset's.
    "em": dict(network="em-capsnet", batch_size=64, reconstruction_weight=0.0,
               routing_iterations=2, lr=1e-2, crop=24, max_shift=0, rotation=15.0,
               epochs=60, lr_decay=0.9, lr_decay_steps=2360, ema_decay=0.999),
}
assert tuple(PRESETS) == PRESET_NAMES


def make_config(preset: str = "paper", *, defaults: Mapping[str, Any] | None = None,
                **overrides: Any) -> TrainConfig:
    """The ``preset``'s settings, then ``defaults`` (an experiment's), then ``overrides``
    (``None`` values are ignored) on top; a data set folder becomes an absolute path, so the
    run can be used from anywhere."""
    if preset not in PRESETS:
        raise CapsNetError(f"unknown preset {short(preset)}; choose one of {', '.join(PRESETS)}")
    base = {**PRESETS[preset], **(defaults or {})}
    settings = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CapsNetError(f"unknown training settings: {', '.join(unknown)}")
    if isinstance(settings.get("dataset"), str):
        settings["dataset"] = recorded_dataset(settings["dataset"])
    config = replace(TrainConfig(preset=preset), **settings)
    refuse_unused(config, replace(TrainConfig(preset=preset), **base), overrides)
    if is_class_folder_data_set(config.dataset):
        # The images' size is the run's choice here: a model too large for it is refused
        # before any image is read (with the fewest channels the images could have).
        model_config_for(config, config.crop or config.image_size or DEFAULT_SIZE,
                         config.channels or 1, len(class_names_of(Path(config.dataset))))
    return config


def unused_settings(config: TrainConfig) -> dict[str, str]:
    """The settings that ``config``'s network, loss, augmentation and schedule never read,
    each with the reason."""
    entry = MODELS[config.network]
    own = {f.name: f.default for f in fields(entry.config)}
    networks: dict[str, list[str]] = {}  # the networks each training field of a model shapes
    for name, other in MODELS.items():
        for f in training_fields(other.config):
            networks.setdefault(f.name, []).append(name)
    unused = {field_name: f"{config.network} does not use it (a setting of --network "
                          f"{' or '.join(names)})"
              for field_name, names in networks.items() if field_name not in own}
    if "routing_iterations" not in own:
        unused["routing_iterations"] = f"{config.network} routes without iterations"
    if entry.loss == "spread":
        unused["margin_loss"] = f"{config.network} trains with the spread loss"
    if entry.defaults.get("decoder_hidden", own.get("decoder_hidden")) is None:
        unused.update(dict.fromkeys(("reconstruction_weight", "reconstruction_reduction"),
                                    f"{config.network} has no decoder"))
    if config.augment == "efficient":
        unused.update(dict.fromkeys(("max_shift", "rotation"),
                                    "--augment efficient draws its own shifts and rotations"))
    if config.lr_decay == 1.0:
        unused.update(dict.fromkeys(("lr_decay_steps", "lr_min"),
                                    "the learning rate does not decay (--lr-decay 1)"))
    if not config.ema_decay:
        unused["ema_warmup"] = "no weights are averaged (--ema-decay 0)"
    if is_class_folder_data_set(config.dataset):
        unused["val_split"] = "class folders hold out a share of every class"
    else:
        unused.update(dict.fromkeys(
            ("image_size", "channels"), f"only class folders (a folder with train/) are resized; "
            f"{short(config.dataset)} keeps its images as they are (--crop cuts windows of them)"))
    return unused


def refuse_unused(config: TrainConfig, preset: TrainConfig, overrides: Mapping[str, Any]) -> None:
    """Refuse an override that changes, from the ``preset``'s value, a setting ``config``
    never reads: the run would record it and train as if it were not given."""
    unused = unused_settings(config)
    for name, value in overrides.items():
        if name in unused and value is not None and value != getattr(preset, name):
            raise CapsNetError(f"{as_flag(name, value)} would change nothing: {unused[name]}")


def as_flag(name: str, value: Any) -> str:
    """The command-line flag that sets field ``name`` to ``value``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"


def resume_config(saved: TrainConfig, requested: Mapping[str, Any]) -> TrainConfig:
    """The settings of a resumed run: its own, with the ``requested`` values of the fields
    ``--resume`` may change (``epochs``, ``device``, ``compile``); a request that contradicts
    any other of its settings is refused. ``None`` values are ignored. A spread-loss run
    given other epochs keeps its margin's ramp: pinned to the epochs it had, where it ramped
    over all of them, so that the margin goes on from where it was (and the config says
    how it rose); a request that names the pinned ramp, as the resumed run's whole config
    does, agrees with it."""
    may_change = [f.name for f in fields(TrainConfig) if f.metadata["resume"]]
    epochs = requested.get("epochs")
    if (epochs is not None and epochs != saved.epochs and not saved.margin_ramp_epochs
            and MODELS[saved.network].loss == "spread"):
        saved = replace(saved, margin_ramp_epochs=saved.epochs)
    changes = {}
    for name, value in requested.items():
        if value is None or value == getattr(saved, name):
            continue
        if name not in may_change:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in may_change)
            raise CapsNetError(f"--resume keeps the run's settings: {name} is "
                               f"{short(getattr(saved, name))} there, not {short(value)} "
                               f"(only {flags} may change)")
        changes[name] = value
    return replace(saved, **changes)


class ModelSizes(CapsNetConfig):
    """A CapsNetConfig's sizes before its checks, whose refusal of weights too large for
    this machine cannot say which setting to lower."""

    def __post_init__(self) -> None:
        pass  # the sizes only: CapsNetConfig checks the model that is built


def model_config_for(config: TrainConfig, image_size: int, in_channels: int,
                     num_classes: int) -> Any:
    """The config of ``config.network`` on data of this shape, refused when training it would
    not fit in memory (see :func:`check_training_memory`). A CapsNet has the architecture
    ``config`` chose (CapsNetConfig's ``train=`` fields); another model has its variant's
    values, ``routing_iterations`` where it routes iteratively, and the training fields its
    config declares (``train=``)."""
    shape = dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    if config.network != "capsnet":
        model_fields = MODELS[config.network].config
        chosen = [f.name for f in training_fields(model_fields)]
        if "routing_iterations" in {f.name for f in fields(model_fields)}:
            chosen.append("routing_iterations")
        shape.update({name: getattr(config, name) for name in chosen})
        model = model_config(config.network, **shape)
        check_training_memory(config, model)
        return model
    chosen = {f.name: getattr(config, f.name) for f in training_fields(CapsNetConfig)}
    check_training_memory(config, ModelSizes(**shape, **chosen))
    return CapsNetConfig(**shape, **chosen)


def check_training_memory(config: TrainConfig, model: Any) -> None:
    """Refuse, before anything is allocated, training a model of these sizes as ``config``
    says when its weights, their gradients, Adam's moments and the weight average
    (``--ema-decay``), with a training batch (its images of no class too) or an evaluation
    batch (each rank's share under torchrun), would not fit in the memory of the device it
    would run on."""
    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    state = capsnet_state_bytes(model, training=True, averaged=bool(config.ema_decay))
    images = f"{model.in_channels}x{model.image_size}x{model.image_size} images"
    network = "a CapsNet" if config.network == "capsnet" else config.network
    resizable = "--image-size, --crop" if is_class_folder_data_set(config.dataset) else "--crop"
    smaller = (f"train on smaller images ({resizable})"
               + (" or with fewer --primary-maps" if config.network == "capsnet" else ""))
    check_memory(state, f"training {network} for {images} and {model.num_classes} classes "
                 f"({model.parameter_count:,} parameters)", smaller, device)
    eval_batch = min(config.eval_batch_size, config.val_size or config.eval_batch_size)
    for training, what, flag, batch in ((True, "a training", "--batch-size", config.batch_size),
                                        (False, "an evaluation", "--eval-batch-size", eval_batch)):
        share = -(-batch // ranks)
        no_class = (max(1, round(share * config.none_fraction))  # as the task adds them
                    if training and config.none_fraction else 0)
        rows = f"{share:,} {images}" + (f" and {no_class:,} of no class" if no_class else "")
        per_image = capsnet_image_bytes(model, training, device)
        check_memory(state + (share + no_class) * per_image, f"{what} batch of {rows}",
                     f"lower {flag}", device)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): the official code's exponential
    decay down to ``lr_min``, times a linear warmup over the first ``warmup_steps`` steps
    when there is one."""
    rate = max(config.lr * config.lr_decay ** (step / config.lr_decay_steps), config.lr_min)
    if config.warmup_steps:
        rate *= min(1.0, (step + 1) / config.warmup_steps)
    return rate


def epoch_seed(config: TrainConfig, epoch: int) -> int:
    """Seed of epoch ``epoch``'s order and shifts, so any epoch can be replayed on resume."""
    return config.seed * 1_000_003 + epoch


def splits_for(config: TrainConfig, data_dir: str | None = None) -> Splits:
    """The data set of ``config``, split and prepared as it says (``val_size`` 0: the data
    set's default)."""
    return load_splits(config.dataset, data_dir, config.val_size or None, config.val_split,
                       config.image_size, config.channels)
