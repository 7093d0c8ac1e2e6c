"""CUDA graphs in training: copies of each replay's outputs, one capture per batch shape, the
same steps as the eager loop, and the settings that cannot have them."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.cli import main
from capsnet.errors import CapsNetError
from capsnet.training.config import epoch_seed, make_config, resume_config
from capsnet.training.graphs import GraphedStep, set_learning_rate
from capsnet.training.task import Classification
from capsnet.training.trainer import Trainer, make_optimizer


class StandInGraph:
    """A CUDA graph's contract on a CPU. ``capture`` returns the outputs of one call of ``fn``
    (a real capture runs nothing; GraphedStep undoes what this call changed); ``replay``
    writes the next call's outputs into those same tensors, as a real replay does."""

    def capture(self, fn):
        self.fn, self.outputs = fn, fn()
        return self.outputs

    def replay(self) -> None:
        for static, fresh in zip(self.outputs, self.fn()):
            if isinstance(static, Tensor):
                static.copy_(fresh)


def regression():
    """A linear model, its Adam and its whole training step; the same weights every call."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def step(batch):
        inputs, targets = batch
        loss = F.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), len(targets)

    return model, optimizer, step


def data(sizes):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=generator), torch.randn(n, 1, generator=generator))
            for n in sizes]


def test_each_replays_outputs_are_copied_out() -> None:
    batches = data([4, 4, 4])
    _, _, eager_step = regression()
    expected = [eager_step(batch)[0] for batch in batches]
    model, optimizer, step = regression()
    graphed = GraphedStep(step, model, optimizer, StandInGraph)
    losses, kept = [], []  # kept: what a loop holding the graph's own outputs would have
    for batch in batches:
        losses.append(graphed(batch)[0])
        (captured,) = graphed.captured.values()
        kept.append(captured.outputs[0])
    assert losses == expected and len(set(expected)) == 3
    assert all(loss == expected[-1] for loss in kept)  # each replay overwrote the last


def test_each_batch_shape_is_captured_once() -> None:
    sizes = [4, 4, 2, 4, 2]
    batches = data(sizes)
    eager_model, _, eager_step = regression()
    expected = [eager_step(batch) for batch in batches]
    made = []

    def new_graph() -> StandInGraph:
        made.append(StandInGraph())
        return made[-1]

    model, optimizer, step = regression()
    graphed = GraphedStep(step, model, optimizer, new_graph)
    assert [graphed(batch) for batch in batches] == expected
    assert len(made) == len(graphed.captured) == 2
    assert [count for _, count in expected] == sizes
    for graphed_weight, eager_weight in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(graphed_weight, eager_weight)


def test_adam_state_moves_between_runs_with_and_without_graphs() -> None:
    model = nn.Linear(3, 1)
    cpu = torch.device("cpu")
    plain = make_optimizer(model.parameters(), 1e-3, cpu)
    model(torch.ones(4, 3)).sum().backward()
    plain.step()
    graphed = make_optimizer(model.parameters(), 1e-3, cpu, plain.state_dict(), capturable=True)
    group = graphed.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], Tensor)
    schedule_reads = group["lr"]
    set_learning_rate(graphed, 5e-4)
    assert group["lr"] is schedule_reads and float(schedule_reads) == pytest.approx(5e-4)
    resumed = make_optimizer(model.parameters(), 1e-3, cpu, graphed.state_dict())
    assert not resumed.param_groups[0]["capturable"]
    assert resumed.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert float(resumed.state[model.weight]["step"]) == 1


def tiny_config(tiny_dataset: Path, **overrides):
    # 100 training images in batches of 40: two shapes, 40 and 20
    return make_config("seed", **{"dataset": str(tiny_dataset), "epochs": 1, "batch_size": 40,
                                  "train_limit": 100, "val_size": 40, "device": "cpu",
                                  "compile": "off", **overrides})


def test_a_graphed_trainer_trains_as_the_eager_one(tiny_dataset: Path, tmp_path: Path,
                                                    one_thread) -> None:
    config = tiny_config(tiny_dataset)
    eager = Trainer(Classification.from_config(config), tmp_path / "eager", show_progress=False)
    graphed = Trainer(Classification.from_config(config), tmp_path / "graphed",
                      show_progress=False)
    graphed.graphed = GraphedStep(graphed.optimize, graphed.model, graphed.optimizer,
                                  StandInGraph)
    stats = [trainer.train_epoch(0, threading.Event()) for trainer in (eager, graphed)]
    assert stats[0]["loss"] == stats[1]["loss"]  # the mean: not the last loss three times
    assert stats[0]["accuracy"] == stats[1]["accuracy"]
    assert len(graphed.graphed.captured) == 2 and graphed.progress.step == 3
    weights = graphed.model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in eager.model.state_dict().items())


def first_steps(config, run_dir: Path, epochs: int = 2) -> tuple[Tensor, dict, Trainer]:
    """Losses of the first ``epochs`` epochs' steps, the weights before them, the trainer."""
    trainer = Trainer(Classification.from_config(config), run_dir, show_progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.train_step(batch).loss for epoch in range(epochs)
              for batch in trainer.task.batches(epoch_seed(config, epoch), 0, trainer.device,
                                                trainer.world)]
    return torch.stack(losses).cpu(), before, trainer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, compile_setting, loss_rtol, update_rtol",
                         [("fp32", "off", 1e-4, 0.01), ("bf16", "off", 1e-2, 0.05),
                          ("fp32", "on", 1e-4, 0.01)])
def test_cuda_graphs_train_as_the_loop_without_them(tiny_dataset: Path, tmp_path: Path,
                                                    precision: str, compile_setting: str,
                                                    loss_rtol: float, update_rtol: float) -> None:
    config = tiny_config(tiny_dataset, device="cuda", precision=precision,
                         compile=compile_setting)
    losses, before, eager = first_steps(config, tmp_path / "eager")
    graph_losses, graph_before, graphed = first_steps(replace(config, cuda_graphs=True),
                                                      tmp_path / "graphed")
    assert len(graphed.graphed.captured) == 2  # batches of 40 and 20, each replayed again
    assert all(torch.equal(v, graph_before[k]) for k, v in before.items())
    torch.testing.assert_close(graph_losses, losses, rtol=loss_rtol, atol=1e-6)
    # Adam's first updates are about lr * sign(gradient): a gradient near zero may flip with
    # summation order, so the updates are compared as a whole.
    after, graph_after = eager.model.state_dict(), graphed.model.state_dict()
    for name, start in before.items():
        update, graph_update = after[name] - start, graph_after[name] - start
        assert (graph_update - update).norm() <= update_rtol * update.norm(), name


def test_cuda_graphs_on_the_cpu_are_refused_in_one_line(tiny_dataset: Path, tmp_path: Path,
                                                         capsys) -> None:
    code = main(["train", "--cuda-graphs", "--device", "cpu", "--dataset", str(tiny_dataset),
                 "--run-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == "capsnet: --cuda-graphs needs a CUDA device, not --device cpu\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_graphs_where_auto_finds_no_gpu_are_refused(tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset, device="auto", cuda_graphs=True)
    with pytest.raises(CapsNetError, match="--cuda-graphs needs a CUDA device; --device auto "
                                           "found none"):
        Trainer(Classification.from_config(config), tmp_path / "run", show_progress=False)


def test_resume_may_turn_cuda_graphs_off_to_move_to_the_cpu() -> None:
    saved = make_config("seed", device="cuda", cuda_graphs=True)
    assert not resume_config(saved, {"device": "cpu", "cuda_graphs": False}).cuda_graphs
    with pytest.raises(CapsNetError, match="--cuda-graphs needs a CUDA device, not --device cpu"):
        resume_config(saved, {"device": "cpu"})
