"""``capsnet bench``: how fast a registered network trains and infers, as a ratio to what
its convolutions alone reach in the same process.

Absolute images/s say little across machines; the network's own convolutional layers up to
its capsules (its ``convolutions()``, with their backward and Adam) are the floor that no
capsule code can beat, so each rate is reported beside the floor's and as a ratio to it. The
model's steps and the floor's are timed in turns, so that a busy machine slows both alike;
the first call of a compiled model (its compilation) is timed apart and never counted as
throughput. Peak memory is the process's (RSS on a CPU, allocated memory on a GPU). Batches
that would not fit in memory and step counts past their bounds are refused before anything
is allocated.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import threading
import time
from dataclasses import fields
from typing import Any, Callable

import torch

from ..errors import CapsNetError
from ..nn.registry import MODELS, model_config
from ..training.config import TrainConfig, make_config
from ..training.evaluate import SPREAD_MARGIN_END, network_loss
from ..training.task import Classification
from ..training.trainer import Trainer, make_optimizer
from ..utils.device import autocast, compile_options, device_name
from ..utils.memory import FLOAT, capsnet_image_bytes, capsnet_state_bytes, check_memory
from ..utils.settings import check_value

MAX_WARMUP = 100  # untimed steps before measuring
MAX_REPEATS = 1_000  # timed steps: their median has long settled by then
ROUTING_ITERATIONS = 3  # the papers', for networks that iterate, unless told otherwise
SPREAD_MARGIN = SPREAD_MARGIN_END  # fixed, where training raises it: the same arithmetic
RECONSTRUCTION_WEIGHT = 0.0005  # the paper's, as capsule_loss's


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


def floor_loss(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean square of the floor's output, or the sum of its outputs' (EM's two): a loss
    that reaches every weight of the floor."""
    outputs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().square().mean() for o in outputs)  # type: ignore[return-value]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor | None, precision: str = "fp32", loss: str = "margin"
               ) -> None:
    """One training step of the model on ``images`` and ``labels`` with its ``loss`` kind,
    or with ``labels=None`` of its floor alone (see :func:`floor_loss`)."""
    with autocast(images.device, precision):
        value = (floor_loss(model(images)) if labels is None else
                 network_loss(model(images, labels), images, labels, loss,
                              SPREAD_MARGIN, RECONSTRUCTION_WEIGHT)[0])
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()


def infer_step(model: torch.nn.Module, images: torch.Tensor, precision: str
               ) -> Callable[[], None]:
    """Inference of ``model`` on ``images`` in eval mode: batch norm (Efficient-CapsNet's)
    then uses its running statistics, as a trained model predicts."""
    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast(images.device, precision):
            model(images)
        model.train()
    return infer


def bench_config(network: str, routing_iterations: int | None, image_size: int | None = None
                 ) -> Any:
    """The config of ``network`` at its variant's sizes (``image_size``: another side of the
    images, as a run on crops has), with ``routing_iterations`` (None:
    :data:`ROUTING_ITERATIONS`) where it iterates; refused for a network that does not."""
    sizes = {} if image_size is None else {"image_size": image_size}
    if "routing_iterations" in {f.name for f in fields(MODELS[network].config)}:
        iterations = ROUTING_ITERATIONS if routing_iterations is None else routing_iterations
        return model_config(network, routing_iterations=iterations, **sizes)
    if routing_iterations is not None:
        raise CapsNetError(f"--routing-iterations: {network} routes in one pass, without "
                           f"iterations; drop the flag")
    return model_config(network, **sizes)


def routing(kernel: str | None) -> str:
    """Where a model routes, from its :meth:`routing_kernel`: ``"kernel"`` (one of capsnet's
    fused operators) or ``"torch"``."""
    return "kernel" if kernel else "torch"


def steps(device: torch.device, precision: str, compile_model: bool, network: str, config: Any,
          train_batch: int, infer_batch: int, cuda_graphs: bool = False
          ) -> tuple[dict[str, Callable[[], Any]], str | None]:
    """The training and inference steps of ``network`` built from ``config`` and of its
    convolutions alone, and the fused operators it routes in (None: torch; see
    :meth:`~capsnet.nn.base.CapsuleModel.routing_kernel`); ``cuda_graphs`` compiles
    in torch's reduce-overhead mode (CUDA graphs on a GPU)."""
    torch.manual_seed(0)
    entry = MODELS[network]
    model = entry.model(config).to(device)
    convs = model.convolutions()
    if compile_model or cuda_graphs:
        model.compile(options=compile_options(device, cuda_graphs))
    model_adam = make_optimizer(model.parameters(), 1e-3, device)
    convs_adam = make_optimizer(convs.parameters(), 1e-3, device)
    shape = (config.in_channels, config.image_size, config.image_size)
    images = torch.rand(train_batch, *shape, device=device)
    labels = torch.randint(0, config.num_classes, (train_batch,), device=device)
    test_images = torch.rand(infer_batch, *shape, device=device)

    def train() -> None:
        train_step(model, model_adam, images, labels, precision, entry.loss)

    def train_convs() -> None:
        train_step(convs, convs_adam, images, None, precision)

    return ({"train": train, "train_convs": train_convs,
             "infer": infer_step(model, test_images, precision),
             "infer_convs": infer_step(convs, test_images, precision)},
            model.routing_kernel(device))


def check_request(device: torch.device, config: Any, train_batch: int, infer_batch: int,
                  warmup: int, repeats: int) -> None:
    """Refuse step counts past their bounds, and batches whose model (of ``config``), inputs
    and activations would not fit in the device's memory, before anything is allocated."""
    check_value("--warmup", warmup, int, {"min": 0, "max": MAX_WARMUP})
    check_value("--repeats", repeats, int, {"min": 1, "max": MAX_REPEATS})
    state = capsnet_state_bytes(config, training=True)
    inputs = FLOAT * config.image_pixels * train_batch  # kept while inference is timed
    training, inference = (capsnet_image_bytes(config, kind, device) for kind in (True, False))
    check_memory(state + inputs + train_batch * training,
                 f"a training batch of {train_batch:,} images", "lower --train-batch", device)
    check_memory(state + inputs + infer_batch * inference,
                 f"an inference batch of {infer_batch:,} images", "lower --infer-batch", device)


def bench_model(device: torch.device, precision: str, compile_model: bool, network: str,
                config: Any, train_batch: int, infer_batch: int, warmup: int, repeats: int,
                cuda_graphs: bool = False) -> dict[str, Any]:
    """Training-step and inference rates of ``network`` built from ``config`` and of its
    floor."""
    step, kernel = steps(device, precision, compile_model, network, config, train_batch,
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
    return {"routing": routing(kernel), "kernel": kernel,
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


def benchmark(device: torch.device, precision: str, compile_model: bool,
              routing_iterations: int | None, train_batch: int | None, infer_batch: int,
              warmup: int, repeats: int, *, epoch: bool = False, data_dir: str | None = None,
              cuda_graphs: bool = False, network: str = "capsnet",
              image_size: int | None = None) -> dict[str, Any]:
    """Every measurement of ``capsnet bench`` for ``network`` (a name of
    capsnet.nn.registry.MODELS) with its settings, as one dict; ``routing_iterations``
    None: :data:`ROUTING_ITERATIONS` where the network iterates; ``image_size`` None: the
    network's own (28)."""
    if epoch and network != "capsnet":
        raise CapsNetError(f"--epoch times the paper preset's CapsNet epoch only, not "
                           f"{network}'s; drop --epoch")
    if epoch and image_size is not None:
        raise CapsNetError("--epoch times the paper preset's epoch of 28x28 MNIST images; "
                           "drop --epoch or --image-size")
    config = bench_config(network, routing_iterations, image_size)
    train_batch = train_batch or (128 if device.type == "cuda" else 64)
    check_request(device, config, train_batch, infer_batch, warmup, repeats)
    result: dict[str, Any] = {
        "network": network, "parameters": config.parameter_count,
        "device": device_name(device), "torch": torch.__version__, "precision": precision,
        "compile": compile_model or cuda_graphs, "cuda_graphs": cuda_graphs,
        "routing_iterations": getattr(config, "routing_iterations", None),
        "image_size": config.image_size, "train_batch": train_batch, "infer_batch": infer_batch, "date": time.strftime("%Y-%m-%d"),
    }
    result.update(bench_model(device, precision, compile_model, network, config, train_batch,
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
