"""``capsnet bench``: how fast the model trains and infers, as a ratio to what its two
convolutions alone reach in the same process.

Absolute images/s say little across machines; the convolutions (conv1 and the primary-capsule
convolution, with their backward and Adam) are the floor that no capsule code can beat, so
each rate is reported beside the floor's and as a ratio to it. The model's steps and the
floor's are timed in turns, so that a busy machine slows both alike; the first call of a
compiled model (its compilation) is timed apart and never counted as throughput. Peak memory
is the process's (RSS on a CPU, allocated memory on a GPU). Batches that would not fit in
memory and step counts past their bounds are refused before anything is allocated.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

import torch

from ..nn.losses import capsule_loss
from ..nn.model import CapsNet, CapsNetConfig
from ..training.config import TrainConfig, make_config
from ..training.task import Classification
from ..training.trainer import Trainer, make_optimizer
from ..utils.device import autocast, compile_options, device_name
from ..utils.memory import FLOAT, capsnet_image_bytes, capsnet_state_bytes, check_memory
from ..utils.settings import check_value

MAX_WARMUP = 100  # untimed steps before measuring
MAX_REPEATS = 1_000  # timed steps: their median has long settled by then


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(step: Callable[[], Any], device: torch.device) -> float:
    began = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - began


def rates_in_turns(model_step: Callable[[], Any], floor_step: Callable[[], Any], batch: int,
                   device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median images/s of ``model_step`` and of ``floor_step``, timed one after the other."""
    for _ in range(warmup):
        model_step()
        floor_step()
    synchronize(device)
    model_times, floor_times = [], []
    for _ in range(repeats):
        model_times.append(timed(model_step, device))
        floor_times.append(timed(floor_step, device))
    return batch / statistics.median(model_times), batch / statistics.median(floor_times)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor | None, precision: str = "fp32") -> None:
    """One training step of the model on ``images`` and ``labels``, or with ``labels=None``
    of its convolutions alone (on the mean square of their output)."""
    with autocast(images.device, precision):
        if labels is None:
            loss = model(images).float().square().mean()
        else:
            out = model(images, labels)
            loss, _, _ = capsule_loss(out.lengths.float(), out.reconstructions.float(), images,
                                      labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def convolutions(model: CapsNet) -> torch.nn.Sequential:
    """The floor: the model's own two convolutions (sharing the weights costs no memory)."""
    return torch.nn.Sequential(model.conv1, torch.nn.ReLU(), model.primary.conv, torch.nn.ReLU())


def steps(device: torch.device, precision: str, compile_model: bool, routing_iterations: int,
          train_batch: int, infer_batch: int, cuda_graphs: bool = False
          ) -> tuple[dict[str, Callable[[], Any]], str]:
    """The training and inference steps of the model and of its two convolutions alone, and
    where the model routes (``"kernel"``: capsnet's CPU kernel, or ``"torch"``);
    ``cuda_graphs`` compiles in torch's reduce-overhead mode (CUDA graphs on a GPU)."""
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(routing_iterations=routing_iterations)).to(device)
    convs = convolutions(model)
    if compile_model or cuda_graphs:
        model.compile(options=compile_options(device, cuda_graphs))
    model_adam = make_optimizer(model.parameters(), 1e-3, device)
    convs_adam = make_optimizer(convs.parameters(), 1e-3, device)
    images = torch.rand(train_batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (train_batch,), device=device)
    test_images = torch.rand(infer_batch, 1, 28, 28, device=device)

    def train() -> None:
        train_step(model, model_adam, images, labels, precision)

    def train_convs() -> None:
        train_step(convs, convs_adam, images, None, precision)

    def infer() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(test_images)

    def infer_convs() -> None:
        with torch.inference_mode(), autocast(device, precision):
            convs(test_images)

    u = torch.empty(1, model.config.primary_caps, model.config.primary_dim, device=device)
    routing = "kernel" if model.digits.in_kernel(u) else "torch"
    return ({"train": train, "train_convs": train_convs, "infer": infer,
             "infer_convs": infer_convs}, routing)


def check_request(device: torch.device, routing_iterations: int, train_batch: int,
                  infer_batch: int, warmup: int, repeats: int) -> None:
    """Refuse step counts past their bounds, and batches whose model, inputs and activations
    would not fit in the device's memory, before anything is allocated."""
    check_value("--warmup", warmup, int, {"min": 0, "max": MAX_WARMUP})
    check_value("--repeats", repeats, int, {"min": 1, "max": MAX_REPEATS})
    config = CapsNetConfig(routing_iterations=routing_iterations)
    state = capsnet_state_bytes(config, training=True)
    inputs = FLOAT * config.image_pixels * train_batch  # kept while inference is timed
    check_memory(state + inputs + train_batch * capsnet_image_bytes(config, training=True),
                 f"a training batch of {train_batch:,} images", "lower --train-batch", device)
    check_memory(state + inputs + infer_batch * capsnet_image_bytes(config, training=False),
                 f"an inference batch of {infer_batch:,} images", "lower --infer-batch", device)


def bench_model(device: torch.device, precision: str, compile_model: bool, routing_iterations: int,
                train_batch: int, infer_batch: int, warmup: int, repeats: int,
                cuda_graphs: bool = False) -> dict[str, Any]:
    """Training-step and inference rates of the default 28x28 model and of its floor."""
    step, routing = steps(device, precision, compile_model, routing_iterations, train_batch,
                          infer_batch, cuda_graphs)
    first = timed(step["train"], device)  # compiles, if compiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):  # the model's training alone first: its peak memory, nothing else
        step["train"]()
    memory = peak_memory_mb(device)
    first += timed(step["infer"], device)
    train, train_floor = rates_in_turns(step["train"], step["train_convs"], train_batch, device,
                                        warmup, repeats)
    infer, infer_floor = rates_in_turns(step["infer"], step["infer_convs"], infer_batch, device,
                                        warmup, repeats)
    return {"routing": routing,
            "train_images_per_s": train, "convs_train_images_per_s": train_floor,
            "train_ratio": train / train_floor, "infer_images_per_s": infer,
            "convs_infer_images_per_s": infer_floor, "infer_ratio": infer / infer_floor,
            "peak_memory_mb": memory, "first_calls_seconds": first}


def bench_epoch(config: TrainConfig, data_dir: str | None) -> dict[str, Any]:
    """Wall time of one epoch of ``config`` with its validation (the paper preset's: 55,000
    shifted images and 5,000), after one untimed epoch that compiles, when compiled."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(Classification.from_config(config, data_dir), run_dir,
                          show_progress=False)
        for epoch in range(2):
            trainer.progress.batch = 0  # the next epoch from its first batch
            began = time.perf_counter()
            stats = trainer.train_epoch(epoch, threading.Event())
            trainer.task.validate(trainer.model, trainer.device, trainer.world)
            synchronize(trainer.device)
            seconds = time.perf_counter() - began
    return {"epoch_seconds": seconds, "epoch_images": stats["images"],
            "epoch_train_images_per_s": stats["images"] / stats["seconds"]}


def benchmark(device: torch.device, precision: str, compile_model: bool, routing_iterations: int,
              train_batch: int | None, infer_batch: int, warmup: int, repeats: int, *,
              epoch: bool = False, data_dir: str | None = None, cuda_graphs: bool = False
              ) -> dict[str, Any]:
    """Every measurement of ``capsnet bench`` with its settings, as one dict."""
    train_batch = train_batch or (128 if device.type == "cuda" else 64)
    check_request(device, routing_iterations, train_batch, infer_batch, warmup, repeats)
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "precision": precision,
        "compile": compile_model or cuda_graphs, "cuda_graphs": cuda_graphs,
        "routing_iterations": routing_iterations,
        "train_batch": train_batch, "infer_batch": infer_batch, "date": time.strftime("%Y-%m-%d"),
    }
    result.update(bench_model(device, precision, compile_model, routing_iterations, train_batch,
                              infer_batch, warmup, repeats, cuda_graphs))
    if epoch:
        config = make_config("paper", batch_size=128, device=device.type, precision=precision,
                             compile="on" if compile_model or cuda_graphs else "off")
        result.update(bench_epoch(config, data_dir))
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [(key, f"{value:,.3f}" if key.endswith("ratio") else
             f"{value:,.1f}" if isinstance(value, float) else str(value))
            for key, value in result.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)
