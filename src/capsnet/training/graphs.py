"""Training steps replayed from CUDA graphs (``--cuda-graphs``).

A CapsNet step launches many small kernels (routing iterations, Adam over each weight); a
CUDA graph records them once and replays them with one launch. The whole step is
captured, forward, backward and Adam, once per batch shape, on static buffers each batch is
copied into. What that asks of the rest of the loop:

- Adam is ``capturable`` and its learning rate a device tensor set in place before each
  replay (:func:`set_learning_rate`), so the schedule still applies;
- autocast is entered inside the step, so its cache of cast weights lives within one capture;
- a replay overwrites the previous one's outputs, so :class:`GraphedStep` returns copies.

The graph is injected (anything with ``capture(fn)`` and ``replay()``), so the copying and
the per-shape captures are tested on a CPU with a stand-in that reruns ``fn``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..errors import CapsNetError


class CUDAGraph:
    """A CUDA graph behind ``capture(fn)`` / ``replay()``."""

    warmup = 3  # calls before capture, as in PyTorch's whole-network capture example

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record one call of ``fn`` (nothing runs) and return its outputs, which each replay
        rewrites. Warm-up calls on a side stream first, as capture requires: lazy
        initialisations (Adam's state, cuBLAS workspaces) must not happen inside it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class Captured(NamedTuple):
    graph: Any               # a CUDAGraph, or a stand-in with the same two methods
    batch: Sequence[Tensor]  # the static inputs the graph reads
    outputs: Sequence[Any]   # the static outputs each replay rewrites


class GraphedStep:
    """``step(batch)`` run by replaying a graph captured for the batch's shapes.

    ``step`` is a whole training step of ``model`` and ``optimizer`` on ``batch`` (a tuple or
    NamedTuple of tensors); it returns a tuple (or NamedTuple) of tensors and of values fixed
    by the shapes (an example count).
    """

    def __init__(self, step: Callable[[Any], Sequence[Any]], model: nn.Module,
                 optimizer: torch.optim.Optimizer, new_graph: Callable[[], Any] = CUDAGraph
                 ) -> None:
        self.step, self.model, self.optimizer, self.new_graph = step, model, optimizer, new_graph
        self.captured: dict[tuple, Captured] = {}

    def __call__(self, batch: Sequence[Tensor]) -> Sequence[Any]:
        shapes = tuple((t.shape, t.dtype, t.device) for t in batch)
        if shapes not in self.captured:
            # A capture of its own, not an eager step, for a new shape: the last, smaller batch
            # of an epoch recurs every epoch, and each graph's own memory pool keeps its
            # replays from overwriting another graph's tensors.
            self.captured[shapes] = self.capture(batch)
        graph, static_batch, outputs = self.captured[shapes]
        for static, tensor in zip(static_batch, batch):
            static.copy_(tensor)
        graph.replay()
        # The next replay overwrites these: without copies every kept loss would be the last.
        return like(outputs, [v.clone() if isinstance(v, Tensor) else v for v in outputs])

    def capture(self, batch: Sequence[Tensor]) -> Captured:
        static_batch = like(batch, [t.clone() for t in batch])
        graph = self.new_graph()
        with unchanged(self.model, self.optimizer):  # warm-up steps must not train
            outputs = graph.capture(lambda: self.step(static_batch))
        return Captured(graph, static_batch, outputs)


def like(container: Sequence[Any], values: list[Any]) -> Sequence[Any]:
    """``values`` in a container of ``container``'s type (tuple, list or NamedTuple)."""
    return container._make(values) if hasattr(container, "_make") else type(container)(values)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors a training step changes: weights, buffers and the optimizer's state."""
    return [*model.parameters(), *model.buffers(),
            *(v for state in optimizer.state.values() for v in state.values()
              if isinstance(v, Tensor))]


@contextmanager
def unchanged(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo the steps run inside, in place (a graph keeps the tensors it captured).
    Optimizer state first made inside is zeroed: that is Adam's state before any step."""
    before = training_state(model, optimizer)
    saved = [t.detach().clone() for t in before]
    yield
    known = {id(t) for t in before}  # ``before`` keeps them alive: no id is reused
    with torch.no_grad():
        for tensor, value in zip(before, saved):
            tensor.copy_(value)
        for tensor in training_state(model, optimizer):
            if id(tensor) not in known:
                tensor.zero_()


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    """Set every group's learning rate; a tensor one (capturable Adam's) in place, since a
    captured step reads that very tensor at each replay."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def check_graphs_possible(device: torch.device, distributed: bool) -> None:
    """Refuse ``--cuda-graphs`` where it cannot run (``--device cpu`` is refused with the
    settings; this is what only the machine and the launch can tell)."""
    if device.type != "cuda":
        raise CapsNetError("--cuda-graphs needs a CUDA device; --device auto found none on "
                           "this machine")
    if distributed:
        raise CapsNetError("--cuda-graphs is not supported under torchrun (the all-reduce of "
                           "DistributedDataParallel is not captured); train without it")
