"""Distributed training under torchrun on CPU (gloo): same weights as one process, failures stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from capsnet.training.checkpoint import load_checkpoint
from capsnet.data import Split, batches

TRAIN = ["train", "--val-size", "40", "--train-limit", "64", "--epochs", "2", "--batch-size", "16",
         "--max-shift", "1", "--device", "cpu", "--deterministic", "--no-progress"]


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
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same training with 1 process and with 2 processes of half the batch each."""
    root = tmp_path_factory.mktemp("dist")
    result = {}
    for nproc in (1, 2):
        run_dir = root / f"np{nproc}"
        done = torchrun(nproc, "-m", "capsnet.cli", *TRAIN, "--dataset", str(tiny_dataset),
                        "--run-dir", str(run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        result[nproc] = run_dir
    return result


def test_two_processes_match_one(runs: dict[int, Path]) -> None:
    one = load_checkpoint(runs[1] / "last.pt")["model"]
    two = load_checkpoint(runs[2] / "last.pt")["model"]
    for name in one:
        # Gradients are averaged over two half-batches instead of one batch: only the
        # order of floating-point sums differs.
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


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
