"""The one training loop: epochs with validation, best and last checkpoints, exact resume,
Ctrl-C, ``torchrun``, NaN checks, logs, and a test of the best checkpoint at the end. What
is trained comes from a :class:`~capsnet.training.task.Task`; every file of the run folder
is read and written through its :class:`~capsnet.training.run.Run`.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ..errors import CapsNetError
from ..nn.base import CapsuleModel
from ..utils.device import (autocast, compile_options, device_name, resolve_device,
                            resolved_precision)
from ..utils.distributed import all_reduce_sum, any_rank, init_world, per_rank_batch, shutdown
from .average import WeightAverage
from .checkpoint import Progress, load_checkpoint, model_from_checkpoint, progress_of
from .config import COMPILE_AFTER_STEPS, TrainConfig, epoch_seed, learning_rate, resume_config
from .graphs import GraphedStep, check_graphs_possible, set_learning_rate
from .run import MetricsLog, Run
from .task import Classification, Step, Task

LOG_EVERY = 20  # steps between progress updates (each costs one host synchronisation)


class TrainingInterrupted(CapsNetError):
    """Ctrl-C during training; a resumable checkpoint was saved."""


@contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """Turn Ctrl-C into an event checked between steps, so a step is never cut in half."""
    requested = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        requested.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Deterministic algorithms, when ``on``, for the time of the block; then the process's
    own setting again (the switch is process-wide)."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class RandomStream:
    """The run's own random numbers, seeded as ``torch.manual_seed(seed)`` would seed them.

    Weight initialisation and dropout draw from PyTorch's global generators (``nn.Dropout``
    takes no ``torch.Generator``), so the run keeps their states and swaps them in only while
    it works (``with stream.active():``): the draws are those of a seeded process, and the
    caller's generators are as they were afterwards. Checkpoints keep the CPU state; a
    resumed run on a GPU restarts the device's stream from the seed.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.states = [torch.Generator(d).manual_seed(seed).get_state()
                       for d in (torch.device("cpu"), *self.devices)]
        self.inside = False

    def restore(self, state: Any, source: str) -> None:
        """Continue the CPU stream a checkpoint saved (None: keep the seeded one)."""
        if state is None:
            return
        try:
            torch.Generator().set_state(state)
        except (TypeError, RuntimeError):
            raise CapsNetError(f"{source}: the saved random state is malformed") from None
        self.states[0] = state

    def cpu_state(self) -> torch.Tensor:
        return torch.get_rng_state() if self.inside else self.states[0]

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.states[0])
            for device, state in zip(self.devices, self.states[1:]):
                torch.cuda.set_rng_state(state, device)
            self.inside = True
            try:
                yield
            finally:
                self.inside = False
                self.states = [torch.get_rng_state(),
                               *(torch.cuda.get_rng_state(d) for d in self.devices)]


def make_optimizer(parameters: Iterator[torch.nn.Parameter], lr: float, device: torch.device,
                   state: dict[str, Any] | None = None, capturable: bool = False
                   ) -> torch.optim.Adam:
    """Adam, continuing from a saved optimizer ``state`` when given.

    On a CPU it is fused: one pass over each weight per step instead of seven operations
    (training at batch 64 about 0.025 closer to the convolutions' rate, docs/PERFORMANCE.md).
    ``capturable`` (CUDA graphs, capsnet.training.graphs) keeps the step counts and the
    learning rate in tensors on the device, which a captured step reads at each replay.
    Which kernel runs is this machine's choice, not the saved state's.
    """
    fused = device.type == "cpu"

    def rate(value: float | torch.Tensor) -> float | torch.Tensor:
        return torch.tensor(float(value), device=device) if capturable else float(value)

    optimizer = torch.optim.Adam(parameters, lr=rate(lr), fused=fused, capturable=capturable)
    if state is not None:
        # load_state_dict puts the step counts where the groups it is given ask for them
        groups = [{**group, "fused": fused, "foreach": None, "capturable": capturable,
                   "lr": rate(group["lr"])} for group in state["param_groups"]]
        optimizer.load_state_dict({**state, "param_groups": groups})
    return optimizer


class Trainer:
    """Owns the model, optimiser and progress of one run of ``task``; :meth:`fit` runs it.

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt`` (``from_best``:
    from its ``best.pt``, the old last.pt renamed aside); the task's config may differ from
    the run's only where :func:`~capsnet.training.config.resume_config` allows.
    ``init_from`` starts a new run from a checkpoint's weights and optimizer state.
    Process-wide state is left as it was found: see :meth:`fit`.
    """

    def __init__(self, task: Task, run_dir: str | Path, *, resume: bool = False,
                 from_best: bool = False, init_from: str | Path | None = None,
                 show_progress: bool = True) -> None:
        self.task, self.config = task, task.config
        self.init_from = None if resume or init_from is None else Path(init_from)
        config = self.config
        self.device = resolve_device(config.device)
        self.world = init_world(self.device.type)
        self.run = Run(run_dir, main=self.world.is_main)
        payload = self.run.resume_point(from_best) if resume else None
        if payload is None:
            self.run.check_new()
        else:
            self.check_resumable(payload)
            if from_best:
                self.run.set_last_aside()
        if config.cuda_graphs:
            check_graphs_possible(self.device, self.world.distributed)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        per_rank_batch(config.batch_size, self.world)
        self.show_bar = show_progress and self.world.is_main
        self.total_steps = task.num_batches(self.world) * config.epochs  # what schedules span
        task.to(self.device)
        self.rng = RandomStream(config.seed, self.device)
        self.progress = Progress(best=-math.inf if task.higher_is_better else math.inf,
                                 init_from=str(self.init_from) if self.init_from else None)
        start = payload or (load_checkpoint(self.init_from) if self.init_from else None)
        source = f"--resume {self.run.folder}" if payload else f"--init-from {self.init_from}"
        if payload is not None and config.ema_decay and "training_weights" not in payload:
            raise CapsNetError(f"{source}: {self.run.checkpoint(from_best)} has no "
                               f"training_weights beside the averaged ones, so training cannot "
                               f"resume from it")
        with self.rng.active():  # the weights are the first draws of the run's stream
            self.model = task.build_model()
            if start is not None:
                self.model = self.model_from(trained_weights(start), source)
        if payload is not None:
            self.progress = progress_of(payload, self.run.checkpoint(from_best))
            self.rng.restore(payload.get("rng_state"), str(self.run.folder))
        self.wall_before = self.progress.wall_seconds  # earlier calls of this run
        self.began = time.perf_counter()
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), config.lr, self.device,
                                        start.get("optimizer") if start is not None else None,
                                        capturable=config.cuda_graphs)
        # Built once the weights are on the device, before compiling: the average holds
        # views of them. A resumed run continues its own average.
        self.average = (WeightAverage(self.model, config.ema_decay,
                                      payload["model"] if payload is not None else None,
                                      warmup=config.ema_warmup)
                        if config.ema_decay else None)
        self.log: MetricsLog | None = None  # set while fit() runs
        self.first_step_seconds: float | None = None
        self.first_step_images = 0
        self.compiled = self.should_compile()
        if self.compiled:  # in place: the weights and the state-dict keys stay as they are
            options = compile_options(self.device)
            self.model.compile(options=options)
            if self.average is not None:  # what validation measures
                self.average.model.compile(options=options)
        self.step_model = self.model
        if self.world.distributed:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.graphed = (GraphedStep(self.optimize, self.model, self.optimizer)
                        if config.cuda_graphs else None)

    def should_compile(self) -> bool:
        """``compile`` on, or auto and this call trains at least COMPILE_AFTER_STEPS steps."""
        if self.config.compile != "auto":
            return self.config.compile == "on"
        steps = self.task.num_batches(self.world) * (self.config.epochs - self.progress.epoch)
        return steps - self.progress.batch >= COMPILE_AFTER_STEPS

    def check_resumable(self, payload: dict[str, Any]) -> None:
        """Refuse to resume a run with other settings, or one of another task."""
        saved = TrainConfig.from_dict(payload["train_config"])
        resume_config(saved, self.config.to_dict())
        trained = payload.get("task", {"name": "classification"})
        if trained != self.task.describe():
            raise CapsNetError(f"--resume {self.run.folder}: that run trained "
                               f"{json.dumps(trained)}, not {json.dumps(self.task.describe())}")

    def model_from(self, payload: dict[str, Any], source: str) -> torch.nn.Module:
        model = model_from_checkpoint(payload, source, self.task.architecture)
        self.task.check_model(model, self.model.config, source)
        return model

    def best_model(self) -> torch.nn.Module:
        """The model of the run's best.pt, on the training device."""
        return self.model_from(self.run.load_best(), str(self.run.best)).to(self.device)

    # -- checkpoints ---------------------------------------------------------------------

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What validation measures and checkpoints keep as the model: the weights'
        average with ``ema_decay``, else the trained weights."""
        return self.model if self.average is None else self.average.model

    def payload(self) -> dict[str, Any]:
        averaged = {} if self.average is None else {"training_weights": self.model.state_dict()}
        return {"architecture": self.task.architecture,
                "model_config": self.model.config.to_dict(), "train_config": self.config.to_dict(),
                "task": self.task.describe(), **self.task.labels(),
                "model": self.evaluated_model.state_dict(), **averaged,
                "optimizer": self.optimizer.state_dict(), "progress": self.progress.to_dict(),
                "rng_state": self.rng.cpu_state()}

    def save(self, best: bool = False) -> Path:
        """Write last.pt (``best``: best.pt) through the run."""
        self.progress.wall_seconds = self.wall_seconds()
        return self.run.save(self.payload(), best=best)

    # -- training ------------------------------------------------------------------------

    def train_step(self, batch: Any) -> Step:
        """One optimiser step; returns the (detached) loss and the number correct, on device."""
        set_learning_rate(self.optimizer, learning_rate(self.config, self.progress.step))
        self.task.schedule(self.progress.step, self.total_steps)
        step = (self.graphed or self.optimize)(batch)
        if self.average is not None:
            self.average.update(self.progress.step)
        self.progress.step += 1
        return step

    def optimize(self, batch: Any) -> Step:
        """Forward under autocast, backward and Adam: what a CUDA graph holds of a step."""
        with autocast(self.device, self.config.precision):
            step = self.task.step(self.step_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        self.optimizer.step()
        return step._replace(loss=step.loss.detach())

    def train_epoch(self, epoch: int, stop: threading.Event) -> dict[str, float]:
        """Train one epoch from ``progress.batch``; returns the epoch's loss, accuracy and
        images (a resumed epoch's included) and the images and seconds of this call."""
        n_batches = self.task.num_batches(self.world)
        progress = self.progress
        start = progress.batch
        bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   disable=not self.show_bar, leave=False, dynamic_ncols=True)
        # A run stopped inside this epoch saved what its steps had summed so far.
        losses = [torch.tensor(v, device=self.device) for v in progress.epoch_losses]
        checked = len(losses)  # losses[:checked] are known to be finite
        correct = torch.tensor(progress.epoch_correct, device=self.device)
        seen = progress.epoch_seen
        progress.epoch_losses, progress.epoch_correct, progress.epoch_seen = (), 0, 0
        new_images, began = 0, time.perf_counter()
        curve = CurvePoints(self, epoch, n_batches, len(losses), int(correct), seen)
        batch_iter = self.task.batches(epoch_seed(self.config, epoch), start, self.device,
                                       self.world)
        for index, batch in enumerate(batch_iter, start=start):
            if self.first_step_seconds is None:  # compiles, when compiled: timed apart
                step = self.timed_first_step(batch)
            else:
                step = self.train_step(batch)
            losses.append(step.loss)
            correct += step.correct
            seen += step.count
            new_images += step.count
            progress.batch = index + 1
            curve.after_step(losses, correct, seen)
            at_log_point = len(losses) % LOG_EVERY == 0 or index + 1 == n_batches
            if at_log_point:
                self.check_finite(losses, checked)
                checked = len(losses)
                elapsed = time.perf_counter() - began
                bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                acc=f"{correct.item() / seen:.4f}",
                                img_s=f"{new_images * self.world.world_size / elapsed:.0f}")
                bar.update(index + 1 - bar.n)
                # Ranks agree on stopping only here, so all stop after the same step.
                if any_rank(stop.is_set(), self.world, self.device):
                    stop.set()
            if stop.is_set() and (at_log_point or not self.world.distributed):
                break
        bar.close()
        self.check_finite(losses, checked)
        if stop.is_set() and progress.batch < n_batches:  # resumable inside the epoch
            progress.epoch_losses = tuple(loss.item() for loss in losses)
            progress.epoch_correct, progress.epoch_seen = int(correct), seen
        seconds = time.perf_counter() - began
        totals = torch.stack([torch.stack(losses).sum() if losses else torch.zeros((), device=self.device),
                              correct.float(), torch.tensor(float(seen), device=self.device),
                              torch.tensor(float(len(losses)), device=self.device),
                              torch.tensor(float(new_images), device=self.device)])
        loss_sum, n_correct, n_seen, n_steps, n_new = all_reduce_sum(totals, self.world).tolist()
        return {"loss": loss_sum / n_steps if n_steps else math.nan,
                "accuracy": n_correct / max(n_seen, 1), "epoch_images": int(n_seen),
                "images": int(n_new), "seconds": seconds}

    def timed_first_step(self, batch: Any) -> Step:
        """The first step of this call, timed on its own: it holds the compilation."""
        began = time.perf_counter()
        step = self.train_step(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.first_step_seconds = time.perf_counter() - began
        self.first_step_images = step.count * self.world.world_size
        return step

    def check_finite(self, losses: list[torch.Tensor], start: int = 0) -> None:
        """Stop with the first step whose loss is not finite; its weights are never saved.
        Only ``losses[start:]`` are checked (one host synchronisation for all of them)."""
        if len(losses) <= start:
            return
        finite = torch.isfinite(torch.stack(losses[start:]))
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0, 0])
            step = self.progress.step - len(losses) + bad + 1
            raise CapsNetError(f"loss became {losses[bad].item()} at step {step}; training stopped "
                               f"and the checkpoints in {self.run.folder} were left as they were")

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``, then test the best checkpoint; returns the summary.
        The deterministic-algorithms switch (``config.deterministic``) and the random
        generators hold the run's settings only while it runs, and the process's own after
        it, also when it fails."""
        with deterministic_algorithms(self.config.deterministic), self.rng.active():
            return self.train_and_test()

    def train_and_test(self) -> dict[str, Any]:
        config, progress = self.config, self.progress
        self.run.write_config({
            "train": config.to_dict(), "model": self.model.config.to_dict(),
            "architecture": self.task.architecture, "task": self.task.describe(),
            "world_size": self.world.world_size, "init_from": progress.init_from})
        log = self.log = self.run.metrics_log(progress.step)
        train_seconds, train_images, epochs_run = 0.0, 0, 0
        began = self.began = time.perf_counter()
        self.cut_short = None
        try:
            with stop_on_sigint() as stop:
                for epoch in range(progress.epoch, config.epochs):
                    self.cut_short = self.stop_reason(epoch, epochs_run,
                                                      time.perf_counter() - began)
                    if self.cut_short:
                        break
                    stats = self.train_epoch(epoch, stop)
                    epochs_run += 1
                    train_seconds += stats["seconds"]
                    train_images += stats["images"]
                    # Ctrl-C in an epoch's last step stops after its validation and save,
                    # in the next step: a checkpoint never holds a trained-out epoch.
                    if stop.is_set() and progress.batch < self.task.num_batches(self.world):
                        saved = self.save()
                        raise TrainingInterrupted(
                            f"interrupted in epoch {epoch + 1} after step {progress.step}; "
                            f"saved {saved}; continue with: "
                            f"{self.task.resume_command(self.run.folder)}")
                    self.end_epoch(epoch, stats)
        finally:
            if log is not None:
                log.close()
            self.log = None
        return self.finish(self.wall_seconds(), train_images, train_seconds)

    def wall_seconds(self) -> float:
        """Seconds this run has taken in all its calls (earlier ones as their last save said)."""
        return self.wall_before + time.perf_counter() - self.began

    def stop_reason(self, epoch: int, epochs_run: int, elapsed: float) -> str | None:
        """Why no epoch starts after ``epoch``: the last validation accuracy reached
        ``stop_at`` (in this call or the one resumed), or one more epoch would end past the
        time limit. None: go on."""
        config, accuracy = self.config, self.progress.val_accuracy
        done = f"stopped after epoch {epoch} of {config.epochs}"
        if config.stop_at and isinstance(accuracy, float) and accuracy >= config.stop_at:
            return (f"validation accuracy {accuracy:.2%} reached the stop at "
                    f"{config.stop_at:.2%}: {done}")
        if epochs_run and self.out_of_time(elapsed, epochs_run):
            return f"time limit of {config.time_limit:g} s: {done}"
        return None

    def out_of_time(self, elapsed: float, epochs_run: int) -> bool:
        """Whether one more epoch, as long as the average so far, would end past the time
        limit (all ranks decide together)."""
        limit = self.config.time_limit
        late = bool(limit) and elapsed + elapsed / epochs_run > limit
        return any_rank(late, self.world, self.device)

    def improves(self, value: float) -> bool:
        best = self.progress.best
        return value > best if self.task.higher_is_better else value < best

    def end_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        val = self.task.validate(self.evaluated_model, self.device, self.world)
        improved = self.improves(val[self.task.best_metric])
        progress = self.progress
        # val_accuracy: what stop_at compares, also after a resume
        progress.epoch, progress.batch, progress.val_accuracy = epoch + 1, 0, val.get("accuracy")
        if improved:
            progress.best = val[self.task.best_metric]
        record = {"epoch": epoch + 1, "step": progress.step,
                  "lr": learning_rate(self.config, progress.step),
                  "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                  **{f"val_{name}": value for name, value in val.items()},
                  "images": stats["epoch_images"],  # the rate is this call's only
                  "images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
                  "epoch_seconds": stats["seconds"], "wall_seconds": self.wall_seconds(),
                  "unix_time": time.time(),  # when written: status times the epoch after it
                  "improved": improved}
        if self.log is not None:
            self.log.write(record)
        if improved:
            self.save(best=True)
        self.save()
        if self.world.is_main:  # --no-progress hides the bars, not this line
            shown = " ".join(f"{name} {value:.5g}" for name, value in val.items())
            tqdm.write(f"epoch {epoch + 1}: train loss {stats['loss']:.5f} acc "
                       f"{stats['accuracy']:.4f} | val {shown}{' (best)' if improved else ''} | "
                       f"{record['images_per_s']:.0f} img/s")

    def routing_kernel(self) -> str | None:
        """The fused operators the model routed in (see CapsuleModel.routing_kernel); None
        for torch, and for a model without capsules (an experiment's baseline CNN)."""
        if isinstance(self.model, CapsuleModel):
            return self.model.routing_kernel(self.device)
        return None

    def finish(self, wall_seconds: float, train_images: int, train_seconds: float) -> dict[str, Any]:
        if self.world.distributed:
            torch.distributed.barrier()  # best.pt is written by rank 0
        summary = {**self.task.test(self.best_model(), self.device, self.world),
                   f"best_val_{self.task.best_metric}": self.progress.best,
                   "epochs": self.progress.epoch, "steps": self.progress.step,
                   "wall_seconds": wall_seconds,
                   "train_images_per_s": (steady_rate(train_images - self.first_step_images,
                                                      train_seconds - (self.first_step_seconds or 0))
                                          or steady_rate(train_images, train_seconds)),
                   "compiled": self.compiled, "first_step_seconds": self.first_step_seconds,
                   "kernel": self.routing_kernel(),
                   "cut_short": self.cut_short, "device": device_name(self.device),
                   "precision": resolved_precision(self.device, self.config.precision),
                   "torch": torch.__version__, "cuda": torch.version.cuda,
                   "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20
                                          if self.device.type == "cuda" else None),
                   "date": time.strftime("%Y-%m-%d"), "checkpoint": str(self.run.best)}
        self.run.write_summary(summary)
        return summary


class CurvePoints:
    """The training curve: every ``log_every`` steps, the mean loss and the accuracy of the
    steps since the last point, at the global step and the epoch as a fraction, in
    metrics.jsonl (beside the per-epoch records) and TensorBoard. Reading them costs one
    host synchronisation per point."""

    def __init__(self, trainer: "Trainer", epoch: int, n_batches: int, steps: int,
                 correct: int, seen: int) -> None:
        self.trainer, self.epoch, self.n_batches = trainer, epoch, n_batches
        self.since = (steps, correct, seen)  # the epoch's sums at the last point

    def after_step(self, losses: list[torch.Tensor], correct: torch.Tensor, seen: int) -> None:
        trainer = self.trainer
        every, step = trainer.config.log_every, trainer.progress.step
        if not every or step % every:
            return
        first, correct_before, seen_before = self.since
        window = torch.stack([torch.stack(losses[first:]).sum(), correct.float() - correct_before,
                              torch.tensor(float(seen - seen_before), device=correct.device),
                              torch.tensor(float(len(losses) - first), device=correct.device)])
        loss_sum, n_correct, n_seen, n_steps = all_reduce_sum(window, trainer.world).tolist()
        self.since = (len(losses), int(correct), seen)
        if trainer.log is not None:
            trainer.log.write({"step": step,
                               "epoch": self.epoch + trainer.progress.batch / self.n_batches,
                               "lr": learning_rate(trainer.config, step - 1),
                               "train_loss": loss_sum / n_steps,
                               "train_accuracy": n_correct / max(n_seen, 1),
                               "unix_time": time.time()})  # status: speed within an epoch


def trained_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint with the weights training continues from as its model: those of the
    optimiser (``training_weights``) where the model holds their average."""
    if "training_weights" not in payload:
        return payload
    return {**payload, "model": payload["training_weights"]}


def steady_rate(images: int, seconds: float) -> float | None:
    """Images per second (after the first step, which compiles when compiled; an epoch of
    one step is timed with it)."""
    return images / seconds if images > 0 and seconds > 0 else None


def train(config: TrainConfig, run_dir: str | Path, *, data_dir: str | None = None,
          resume: bool = False, from_best: bool = False, init_from: str | Path | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a CapsNet on ``config.dataset`` in ``run_dir``; returns the summary."""
    try:
        task = Classification.from_config(config, data_dir)
        return Trainer(task, run_dir, resume=resume, from_best=from_best, init_from=init_from,
                       show_progress=show_progress).fit()
    finally:
        shutdown()
