"""Training: epochs with validation, best and last checkpoints, exact resume, a test at the end.

A run directory holds::

    config.json      the resolved TrainConfig and model config
    metrics.jsonl    one JSON line per epoch (TensorBoard event files too, when installed)
    last.pt          the latest state, enough to resume exactly
    best.pt          the weights with the lowest validation loss
    summary.json     test results of best.pt, wall time and speed
"""

from __future__ import annotations

import json
import math
import platform
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import RESUME_MAY_CHANGE, TrainConfig, learning_rate
from ..data import Split, Splits, batches, load_splits, num_batches
from ..utils.distributed import all_reduce_sum, any_rank, init_world, per_rank_batch, shutdown
from ..errors import CapsNetError
from .evaluate import Evaluation, autocast, evaluate, resolve_device
from ..utils.files import atomic_write_bytes
from ..nn.losses import capsule_loss
from ..nn.model import CapsNet, CapsNetConfig

LOG_EVERY = 20  # steps between progress updates (each costs one host synchronisation)


class TrainingInterrupted(CapsNetError):
    """Ctrl-C during training; a resumable checkpoint was saved."""


def write_json(path: Path, data: Any) -> None:
    with reporting_write_errors(path):
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


@contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError (disk full, read-only folder) while writing ``path`` into one line."""
    try:
        yield
    except OSError as exc:
        raise CapsNetError(f"could not write {path}: {exc.strerror or exc}; the checkpoints in "
                           f"{path.parent} were left as they were") from None


def epoch_of(line: str) -> float:
    """Epoch of a metrics.jsonl line; infinity for a line torn by a crash (so it is dropped)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def model_config_for(config: TrainConfig, splits: Splits) -> CapsNetConfig:
    """The architecture for ``config``'s routing on ``splits``' image size, channels and classes."""
    return CapsNetConfig(image_size=splits.image_size, in_channels=splits.in_channels,
                         num_classes=splits.num_classes,
                         routing_iterations=config.routing_iterations, init=config.init,
                         primary_style=config.primary_style, routing_bias=config.routing_bias)


def epoch_seed(config: TrainConfig, epoch: int) -> int:
    """Seed of epoch ``epoch``'s order and shifts, so any epoch can be replayed on resume."""
    return config.seed * 1_000_003 + epoch


class MetricsLog:
    """Appends one JSON line per epoch; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, keep_epochs: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        # After a resume, drop lines of epochs the checkpoint does not contain.
        if self.path.exists():
            lines = [line for line in self.path.read_text(errors="replace").splitlines()
                     if line.strip() and epoch_of(line) <= keep_epochs]
            with reporting_write_errors(self.path):
                atomic_write_bytes(self.path, "".join(line + "\n" for line in lines).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with reporting_write_errors(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def stop_on_sigint() -> Iterator[list[bool]]:
    """Turn Ctrl-C into a flag checked between steps, so a step is never cut in half."""
    requested = [False]

    def handler(signum: int, frame: Any) -> None:
        requested[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Owns the model, optimiser and progress of one run; :meth:`fit` runs it to the end."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, *, data_dir: str | None = None,
                 resume: bool = False, init_from: str | Path | None = None,
                 progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.init_from = None if resume or init_from is None else Path(init_from)
        payload = None
        if resume:
            payload = load_checkpoint(self.run_dir / "last.pt", resumable=True)
            saved = TrainConfig.from_dict(payload["train_config"])
            # The run keeps its own settings; only how long and where it runs may change.
            config = TrainConfig.from_dict({**saved.to_dict(), **{
                name: getattr(config, name) for name in RESUME_MAY_CHANGE}})
        self.config = config
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = resolve_device(config.device)
        self.world = init_world(self.device.type)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        per_rank_batch(config.batch_size, self.world)
        self.progress_bar = progress and self.world.is_main
        self.splits = load_splits(config.dataset, data_dir, config.val_size, config.val_split)
        if config.train_limit:
            train = self.splits.train
            self.splits.train = Split(train.images[:config.train_limit],
                                      train.labels[:config.train_limit])
        if self.device.type == "cuda":  # the whole data set lives on the GPU
            self.splits.train, self.splits.val = (self.splits.train.to(self.device),
                                                  self.splits.val.to(self.device))
        torch.manual_seed(config.seed)
        start = load_checkpoint(self.init_from) if self.init_from else None
        if payload is None:
            self.model = CapsNet(model_config_for(config, self.splits))
            self.progress = {"epoch": 0, "batch": 0, "step": 0, "best_val_loss": math.inf}
            if start is not None:
                self.warm_start(start)
        else:
            self.model = model_from_checkpoint(payload, str(self.run_dir / "last.pt"))
            if self.model.config != model_config_for(config, self.splits):
                raise CapsNetError(f"{self.run_dir}: the checkpoint's model does not fit data set "
                                   f"{config.dataset!r}")
            self.progress = dict(payload["progress"])
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        if payload is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        elif start is not None and "optimizer" in start:
            self.optimizer.load_state_dict(start["optimizer"])
        if config.compile:
            self.model.compile_routing()
        self.step_model = self.model
        if self.world.distributed:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def warm_start(self, start: dict[str, Any]) -> None:
        """Take the weights of checkpoint ``start`` (its Adam state follows in __init__), as
        the notebook's ``restore_checkpoint=True`` does; epochs and best loss start afresh."""
        model = model_from_checkpoint(start, str(self.init_from))
        if model.config != self.model.config:
            raise CapsNetError(f"--init-from {self.init_from}: its model differs from this run's "
                               f"(use the preset and flags it was trained with)")
        self.model = model

    # -- checkpoints ---------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        return {"model_config": self.model.config.to_dict(), "train_config": self.config.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": dict(self.progress)}

    def save(self, name: str) -> Path:
        """Write checkpoint ``name``; only the main process writes files."""
        path = self.run_dir / name
        if self.world.is_main:
            save_checkpoint(path, self.payload())
        return path

    # -- training ------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the loss and the number of correct predictions, on device."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.progress["step"])
        with autocast(self.device, self.config.precision):
            out = self.step_model(images, labels)
        loss, _, _ = capsule_loss(out.lengths.float(), out.reconstructions.float(), images, labels,
                                  self.config.reconstruction_weight,
                                  self.config.reconstruction_reduction, self.config.margin_loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress["step"] += 1
        return loss.detach(), (out.predictions == labels).sum()

    def train_epoch(self, epoch: int, stop: list[bool]) -> dict[str, float]:
        """Train one epoch from ``progress["batch"]``; returns loss, accuracy, images and seconds."""
        config, train = self.config, self.splits.train
        n_batches = num_batches(len(train), config.batch_size, self.world.world_size)
        start = self.progress["batch"]
        bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not self.progress_bar, leave=False, dynamic_ncols=True)
        losses: list[torch.Tensor] = []
        checked = 0  # losses[:checked] are known to be finite
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, began = 0, time.perf_counter()
        batch_iter = batches(train, config.batch_size, seed=epoch_seed(config, epoch),
                             max_shift=config.max_shift, start=start, device=self.device,
                             rank=self.world.rank, world_size=self.world.world_size)
        for index, (images, labels) in enumerate(batch_iter, start=start):
            loss, n_correct = self.train_step(images, labels)
            losses.append(loss)
            correct += n_correct
            seen += len(labels)
            self.progress["batch"] = index + 1
            at_log_point = len(losses) % LOG_EVERY == 0 or index + 1 == n_batches
            if at_log_point:
                self.check_finite(losses, checked)
                checked = len(losses)
                elapsed = time.perf_counter() - began
                bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                acc=f"{correct.item() / seen:.4f}",
                                img_s=f"{seen * self.world.world_size / elapsed:.0f}")
                bar.update(index + 1 - bar.n)
                # Ranks agree on stopping only here, so all stop after the same step.
                stop[0] = any_rank(stop[0], self.world, self.device)
            if stop[0] and (at_log_point or not self.world.distributed):
                break
        bar.close()
        self.check_finite(losses, checked)
        seconds = time.perf_counter() - began
        totals = torch.stack([torch.stack(losses).sum() if losses else torch.zeros((), device=self.device),
                              correct.float(), torch.tensor(float(seen), device=self.device),
                              torch.tensor(float(len(losses)), device=self.device)])
        loss_sum, n_correct, n_seen, n_steps = all_reduce_sum(totals, self.world).tolist()
        return {"loss": loss_sum / n_steps if n_steps else math.nan,
                "accuracy": n_correct / max(n_seen, 1), "images": int(n_seen), "seconds": seconds}

    def check_finite(self, losses: list[torch.Tensor], start: int = 0) -> None:
        """Stop with the first step whose loss is not finite; its weights are never saved.
        Only ``losses[start:]`` are checked (one host synchronisation for all of them)."""
        if len(losses) <= start:
            return
        finite = torch.isfinite(torch.stack(losses[start:]))
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0, 0])
            step = self.progress["step"] - len(losses) + bad + 1
            raise CapsNetError(f"loss became {losses[bad].item()} at step {step}; training stopped "
                               f"and the checkpoints in {self.run_dir} were left as they were")

    def evaluate(self, split: Split, model: CapsNet | None = None) -> Evaluation:
        return evaluate(model or self.model, split, batch_size=self.config.eval_batch_size,
                        device=self.device, reconstruction_weight=self.config.reconstruction_weight,
                        reduction=self.config.reconstruction_reduction,
                        margin_form=self.config.margin_loss,
                        precision=self.config.precision, world=self.world)

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``, then test the best checkpoint; returns the summary."""
        config = self.config
        log = None
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", {
                "train": config.to_dict(), "model": self.model.config.to_dict(),
                "world_size": self.world.world_size,
                "init_from": str(self.init_from) if self.init_from else None})
            log = MetricsLog(self.run_dir, self.progress["epoch"])
        train_seconds, train_images = 0.0, 0
        began = time.perf_counter()
        try:
            with stop_on_sigint() as stop:
                for epoch in range(self.progress["epoch"], config.epochs):
                    stats = self.train_epoch(epoch, stop)
                    train_seconds += stats["seconds"]
                    train_images += stats["images"]
                    # Ctrl-C in an epoch's last step stops after its validation and save,
                    # in the next step: a checkpoint never holds a trained-out epoch.
                    if stop[0] and self.progress["batch"] < num_batches(
                            len(self.splits.train), config.batch_size, self.world.world_size):
                        self.save("last.pt")
                        raise TrainingInterrupted(
                            f"interrupted in epoch {epoch + 1} after step {self.progress['step']}; "
                            f"saved {self.run_dir / 'last.pt'}; continue with: "
                            f"capsnet train --resume {self.run_dir}")
                    self.end_epoch(epoch, stats, log)
        finally:
            if log is not None:
                log.close()
        return self.finish(time.perf_counter() - began, train_images, train_seconds)

    def end_epoch(self, epoch: int, stats: dict[str, float], log: MetricsLog | None) -> None:
        val = self.evaluate(self.splits.val)
        improved = val.loss < self.progress["best_val_loss"]
        self.progress.update(epoch=epoch + 1, batch=0)
        if improved:
            self.progress["best_val_loss"] = val.loss
        record = {"epoch": epoch + 1, "step": self.progress["step"],
                  "lr": learning_rate(self.config, self.progress["step"]),
                  "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                  "val_loss": val.loss, "val_accuracy": val.accuracy,
                  "images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
                  "epoch_seconds": stats["seconds"], "improved": improved}
        if log is not None:
            log.write(record)
        if improved:
            self.save("best.pt")
        self.save("last.pt")
        if self.progress_bar:
            tqdm.write(f"epoch {epoch + 1}: train loss {stats['loss']:.5f} acc "
                       f"{stats['accuracy']:.4f} | val loss {val.loss:.5f} acc {val.accuracy:.4f}"
                       f"{' (best)' if improved else ''} | {record['images_per_s']:.0f} img/s")

    def finish(self, wall_seconds: float, train_images: int, train_seconds: float) -> dict[str, Any]:
        best = self.run_dir / "best.pt"
        if self.world.distributed:
            torch.distributed.barrier()  # best.pt is written by rank 0
        model = model_from_checkpoint(load_checkpoint(best), str(best)).to(self.device)
        test = self.evaluate(self.splits.test, model)
        summary = {"test_accuracy": test.accuracy, "test_loss": test.loss,
                   "best_val_loss": self.progress["best_val_loss"], "epochs": self.progress["epoch"],
                   "steps": self.progress["step"], "wall_seconds": wall_seconds,
                   "train_images_per_s": train_images / train_seconds if train_seconds else None,
                   "device": device_name(self.device), "torch": torch.__version__,
                   "checkpoint": str(best)}
        if self.world.is_main:
            write_json(self.run_dir / "summary.json", summary)
        return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def train(config: TrainConfig, run_dir: str | Path, *, data_dir: str | None = None,
          resume: bool = False, init_from: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in ``run_dir`` and return its summary; see :class:`Trainer`."""
    try:
        return Trainer(config, run_dir, data_dir=data_dir, resume=resume, init_from=init_from,
                       progress=progress).fit()
    finally:
        shutdown()
