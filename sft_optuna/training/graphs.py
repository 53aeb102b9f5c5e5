"""A training step captured once in a CUDA graph and replayed: one launch instead of a few hundred.

A ResNet-18 step on 256 images of 64 px takes 7.6-9.0 ms on an H200 however little it computes: the GPU waits
for Python to launch each of its kernels (``docs/benchmarks.md``). Captured in a CUDA graph, the forward pass, the
loss (mixup's two-label form included), the backward pass and a fused optimizer step are replayed by one call.

What stays outside the graph: the batch's augmentation (a handful of kernels on the device, whose random draws
come from the trainer's own generator) and the copy of its result into the graph's static input; the learning
rate, a device tensor per parameter group that the schedule fills between replays (no re-capture); the EMA.
A graph is captured per training phase (the linear probe of ``freeze_epochs`` and full fine-tuning train
different parameters) after a few eager warm-up steps, which are real steps of the trial: a graphed run follows
the eager one's trajectory, within bf16 rounding. A capture that fails leaves the trial eager, with one log line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["WARMUP_STEPS", "GraphedStep", "float_learning_rates", "graphs_enabled", "tensor_learning_rates"]

log = logging.getLogger(__name__)

WARMUP_STEPS = 3
"""Eager steps on a side stream before a capture: cuDNN picks its algorithms and the allocator settles (the
PyTorch docs' whole-network capture does the same); they are real steps of the trial."""


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """``train.cuda_graph`` on this device: ``auto`` and ``on`` graph on CUDA; anything else runs eagerly (a CPU
    worker of a study that asks for graphs trains as before)."""
    return setting in ("auto", "on") and device.type == "cuda"


class GraphedStep:
    """Training steps of one model and optimizer, replayed from a CUDA graph per phase.

    ``step(x, y_a, y_b, lam, phase)`` trains one batch and returns (loss, logits) tensors that stay valid until
    the next step (the graph's static outputs).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        label_smoothing: float,
    ) -> None:
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.label_smoothing = label_smoothing
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.warm: dict[Any, int] = {}
        self.failed = False

    def _loss(self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor) -> Any:
        with self.autocast():
            logits = self.model(x)
            ls = self.label_smoothing
            loss = lam * F.cross_entropy(logits, y_a, label_smoothing=ls) + (1 - lam) * F.cross_entropy(
                logits, y_b, label_smoothing=ls
            )
        return loss, logits

    def _eager(
        self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._loss(x, y_a, y_b, lam)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def step(
        self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, phase: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step: eager while warming up (or after a failed capture), then replayed."""
        if self.failed:
            return self._eager(x, y_a, y_b, lam)
        key = (phase, tuple(x.shape))
        if key in self.graphs:
            graph, io = self.graphs[key]
            for name, value in (("x", x), ("y_a", y_a), ("y_b", y_b), ("lam", lam)):
                io[name].copy_(value, non_blocking=True)
            graph.replay()
            return io["loss"], io["logits"]
        done = self.warm.get(key, 0)
        if done < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(x, y_a, y_b, lam)
            torch.cuda.current_stream().wait_stream(side)
            self.warm[key] = done + 1
            return out
        try:
            self.graphs[key] = self._capture(x, y_a, y_b, lam)
        except RuntimeError as exc:  # an op that cannot be captured, a driver without graphs, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("CUDA graph capture failed (%s); this trial trains eagerly", first[:200])
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            return self._eager(x, y_a, y_b, lam)
        return self.step(x, y_a, y_b, lam, phase)  # the captured graph trains this batch

    def _capture(
        self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor
    ) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        io = {"x": x.clone(), "y_a": y_a.clone(), "y_b": y_b.clone(), "lam": lam.clone()}
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        with torch.cuda.graph(graph):
            loss, logits = self._loss(io["x"], io["y_a"], io["y_b"], io["lam"])
            loss.backward()
            self.optimizer.step()
        io["loss"], io["logits"] = loss.detach(), logits.detach()
        return graph, io


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each parameter group's learning rate as a device tensor, which a captured fused step reads at every
    replay (a float would be baked into the graph); the schedule fills it in place between replays. The group's
    ``initial_lr`` stays a float, so that the schedule's arithmetic stays on the host (no sync per step)."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if torch.is_tensor(group.get("initial_lr")):
            group["initial_lr"] = float(group["initial_lr"])
        group.setdefault("initial_lr", lr)
        group["lr"] = torch.tensor(lr, device=device)


def float_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with float learning rates (a checkpoint resumes on any device, graphed or not)."""
    groups = [
        {k: (float(v) if k in ("lr", "initial_lr") and torch.is_tensor(v) else v) for k, v in g.items()}
        for g in state["param_groups"]
    ]
    return {**state, "param_groups": groups}
