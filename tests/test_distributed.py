"""Distributed training under torchrun on CPU (gloo): same weights as one process, failures stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from capsnet.data import Split, batches

# 2 primary capsule maps, not 32: what is checked is how the ranks share the work
TRAIN = ["train", "--val-size", "40", "--train-limit", "64", "--epochs", "2", "--batch-size", "16",
         "--max-shift", "1", "--device", "cpu", "--deterministic", "--no-progress",
         "--primary-maps", "2"]


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_rank_shards_partition_each_global_batch() -> None:
    split = Split(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    whole = [labels for _, labels in batches(split, 8, seed=3)]
    shards = [[labels for _, labels in batches(split, 8, seed=3, rank=r, world_size=2)]
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50 // 8  # incomplete last batch dropped
    for k, (a, b) in enumerate(zip(*shards)):
        assert torch.equal(torch.cat([a, b]), whole[k])


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> dict[int, Path]:
    """The same training with 1 process and with 2 processes of half the batch each."""
    root = module_tmp("dist")
    result = {}
    for nproc in (1, 2):
        run_dir = root / f"np{nproc}"
        done = torchrun(nproc, "-m", "capsnet.cli", *TRAIN, "--dataset", str(tiny_dataset),
                        "--run-dir", str(run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        result[nproc] = run_dir
    return result


FIRST_STEP = textwrap.dedent("""
    import sys
    import torch
    from capsnet.training.config import epoch_seed, make_config
    from capsnet.training.task import Classification
    from capsnet.training.trainer import Trainer

    dataset, out, preset, network = sys.argv[1:5]
    sizes = {"primary_maps": 2} if network == "capsnet" else {}
    config = make_config(preset, network=network, dataset=dataset, val_size=40, train_limit=64,
                         batch_size=16, max_shift=1, device="cpu", deterministic=True, **sizes)
    trainer = Trainer(Classification.from_config(config), out + ".run", show_progress=False)
    batch = next(iter(trainer.task.batches(epoch_seed(config, 0), 0, trainer.device,
                                           trainer.world)))
    trainer.task.step(trainer.step_model, batch).loss.backward()  # DDP averages over ranks
    if trainer.world.is_main:
        torch.save({n: p.grad for n, p in trainer.model.named_parameters()}, out)
""")


@pytest.mark.slow
@pytest.mark.parametrize("preset, network", [("paper", "capsnet"), ("em", "em-capsnet-small")])
def test_two_processes_compute_the_gradient_of_one(tiny_dataset: Path, tmp_path: Path,
                                                   preset: str, network: str) -> None:
    """The first step's gradient: each of 2 processes takes half of the global batch of 16
    and DDP averages, which is the gradient of the mean loss over all 16 (dynamic routing's
    margin loss, EM routing's spread loss in its C kernel). Only the order of floating-point
    sums differs, so each tensor agrees to about 1e-6 of its norm on any CPU. (Weights after
    Adam steps are no fair test: Adam's first update is about lr * sign(g), so a gradient
    entry near zero can flip the sign of its update between the two runs.)"""
    script = tmp_path / "first_step.py"
    script.write_text(FIRST_STEP)
    grads = {}
    for nproc in (1, 2):
        out = tmp_path / f"grads{nproc}.pt"
        done = torchrun(nproc, str(script), str(tiny_dataset), str(out), preset, network)
        assert done.returncode == 0, done.stderr[-3000:]
        grads[nproc] = torch.load(out, weights_only=True)
    for name, one in grads[1].items():
        two = grads[2][name]
        assert one.norm() > 0, name
        relative = float((two.double() - one.double()).norm() / one.double().norm())
        assert relative < 1e-4, f"{name}: gradients differ by {relative:.2e} of their norm"


@pytest.mark.slow
def test_metrics_reduced_over_ranks(runs: dict[int, Path]) -> None:
    logs = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()]
            for n in runs}
    assert len(logs[1]) == len(logs[2]) == 2
    for a, b in zip(logs[1], logs[2]):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 40)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    summaries = [json.loads((runs[n] / "summary.json").read_text()) for n in runs]
    assert summaries[0]["test_accuracy"] == pytest.approx(summaries[1]["test_accuracy"], abs=1 / 60)
    assert not list(runs[2].glob("*.tmp"))  # only rank 0 wrote, and atomically


@pytest.mark.slow
def test_failing_rank_stops_the_run(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import torch
        from capsnet.utils.distributed import all_reduce_sum, init_world
        world = init_world("cpu")
        if world.rank == 1:
            raise SystemExit("rank 1 failed on purpose")
        all_reduce_sum(torch.ones(1), world)  # rank 0 would wait here forever alone
    """))
    done = torchrun(2, str(script), timeout=120)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads from /proc")
def test_training_leaves_no_communication_thread_running(tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    """When ``capsnet train`` returns, each rank's process group is gone with its threads: a
    gloo thread that lives into interpreter exit can abort the rank as it frees a tensor."""
    script = tmp_path / "threads.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from capsnet.cli import main

        out = Path(sys.argv[1])
        code = main(sys.argv[2:])
        names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
        (out / f"rank{os.environ['RANK']}.txt").write_text(f"{code} {sorted(names)}")
    """))
    done = torchrun(2, str(script), str(tmp_path), *TRAIN, "--dataset", str(tiny_dataset),
                    "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        code, names = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert code == "0"
        assert "gloo" not in names, f"rank {rank} still runs {names}"
