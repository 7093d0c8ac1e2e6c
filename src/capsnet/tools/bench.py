"""``capsnet bench``: throughput and memory of the default model, against the project's targets.

Times, after warm-up, a full training step (forward, loss, backward, Adam) and inference
(forward with the prediction-masked decoder) on random images, reports the median
images/s and peak memory (process RSS on CPU, allocated memory on CUDA), and optionally a
whole training epoch with the real data pipeline.
"""

from __future__ import annotations

import tempfile
import resource
import statistics
import time
from typing import Any, Callable

import torch

from ..nn.losses import capsule_loss
from ..nn.model import CapsNet, CapsNetConfig
from ..training.config import make_config
from ..training.trainer import Trainer
from ..utils.device import autocast, device_name

TARGETS = {  # images/s (train at batch 64 on CPU, 128 on GPU; inference at 256), memory, epoch
    "cpu": {"train_images_per_s": 150, "infer_images_per_s": 500, "peak_memory_mb": 1024},
    "cuda": {"train_images_per_s": 40_000, "infer_images_per_s": 150_000, "epoch_seconds": 2.0},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def median_rate(step: Callable[[], Any], batch: int, device: torch.device, warmup: int,
                repeats: int) -> float:
    """Median images/s of ``step`` over ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return batch / statistics.median(times)


def bench_model(device: torch.device, precision: str, compile_model: bool, routing_iterations: int,
                train_batch: int, infer_batch: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Training-step and inference throughput of the default 28x28 model on random data."""
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(routing_iterations=routing_iterations)).to(device)
    runner = model.compile_routing() if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(train_batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (train_batch,), device=device)

    def train_step() -> None:
        with autocast(device, precision):
            out = runner(images, labels)
        loss, _, _ = capsule_loss(out.lengths.float(), out.reconstructions.float(), images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_rate = median_rate(train_step, train_batch, device, warmup, repeats)
    train_memory = peak_memory_mb(device)
    model.eval()
    test_images = torch.rand(infer_batch, 1, 28, 28, device=device)

    def infer_step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            runner(test_images)

    infer_rate = median_rate(infer_step, infer_batch, device, warmup, repeats)
    return {"train_images_per_s": train_rate, "infer_images_per_s": infer_rate,
            "peak_memory_mb": train_memory}


def bench_convolutions(device: torch.device, precision: str, train_batch: int, infer_batch: int,
                       warmup: int, repeats: int) -> dict[str, Any]:
    """The same rates for the model's two convolutions alone (with backward and Adam):
    the part of the network that no capsule code can speed up."""
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig())
    convs = torch.nn.Sequential(model.conv1, torch.nn.ReLU(), model.primary.conv,
                                torch.nn.ReLU()).to(device)
    optimizer = torch.optim.Adam(convs.parameters(), lr=1e-3)
    images = torch.rand(train_batch, 1, 28, 28, device=device)

    def train_step() -> None:
        with autocast(device, precision):
            loss = convs(images).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    test_images = torch.rand(infer_batch, 1, 28, 28, device=device)

    def infer_step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            convs(test_images)

    return {"convs_train_images_per_s": median_rate(train_step, train_batch, device, warmup, repeats),
            "convs_infer_images_per_s": median_rate(infer_step, infer_batch, device, warmup, repeats)}


def bench_epoch(device: torch.device, precision: str, compile_model: bool, batch: int,
                data_dir: str | None) -> dict[str, Any]:
    """Wall time of one paper-preset epoch (55,000 shifted images + 5,000 validation)."""


    config = make_config("paper", epochs=1, batch_size=batch, device=device.type,
                         precision=precision, compile=compile_model)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, data_dir=data_dir, progress=False)
        began = time.perf_counter()
        stats = trainer.train_epoch(0, [False])
        trainer.evaluate(trainer.splits.val)
        synchronize(device)
        seconds = time.perf_counter() - began
    return {"epoch_seconds": seconds, "epoch_train_images_per_s": stats["images"] / stats["seconds"]}


def benchmark(device: torch.device, precision: str, compile_model: bool, routing_iterations: int,
              train_batch: int | None, infer_batch: int, warmup: int, repeats: int, *,
              epoch: bool = False, data_dir: str | None = None) -> dict[str, Any]:
    """Every measurement of ``capsnet bench`` with its settings, as one dict."""
    train_batch = train_batch or (128 if device.type == "cuda" else 64)
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "precision": precision,
        "compile": compile_model, "routing_iterations": routing_iterations,
        "train_batch": train_batch, "infer_batch": infer_batch, "date": time.strftime("%Y-%m-%d"),
    }
    result.update(bench_model(device, precision, compile_model, routing_iterations, train_batch,
                              infer_batch, warmup, repeats))
    result.update(bench_convolutions(device, precision, train_batch, infer_batch, warmup, repeats))
    if epoch:
        result.update(bench_epoch(device, precision, compile_model, 128, data_dir))
    result["targets"] = TARGETS[device.type]
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [("setting", "value", "target")]
    targets = result["targets"]
    for key, value in result.items():
        if key == "targets":
            continue
        target = targets.get(key)
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        if target is not None:
            better = value <= target if key in ("peak_memory_mb", "epoch_seconds") else value >= target
            target = f"{'<=' if key in ('peak_memory_mb', 'epoch_seconds') else '>='} {target:,} " \
                     f"({'met' if better else 'missed'})"
        rows.append((key, shown, target or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
