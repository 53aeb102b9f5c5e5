"""The training step in a CUDA graph (#27): the CPU path unchanged, learning rates a graph can read that a
checkpoint stores as floats, and — where CUDA is — the graphed loss curve equal to the eager one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.training.data import Splits
from sft_optuna.training.graphs import float_learning_rates, graphs_enabled, tensor_learning_rates
from sft_optuna.training.trainer import Trainer


def _splits(n: int = 512, size: int = 16, device: str = "cpu") -> Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = (torch.randint(0, 60, (n, 3, size, size), generator=gen) + (y * 50)[:, None, None, None]).to(torch.uint8)
    return Splits(x, y, x[:64], y[:64], 4)


def test_graphs_are_for_cuda_only_and_the_cpu_step_is_unchanged() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graphs_enabled("auto", cuda) and graphs_enabled("on", cuda) and not graphs_enabled("off", cuda)
    assert not graphs_enabled("on", cpu) and not graphs_enabled("auto", cpu)
    cfg = TrainConfig(epochs=1, batch_size=64, eval_batch_size=128)
    model = ModelConfig(image_size=16)
    eager = Trainer(_splits(), model, cfg, cpu, seed=1)
    asked = Trainer(_splits(), model, dataclasses.replace(cfg, cuda_graph="on"), cpu, seed=1)
    assert asked.graph is None and not asked.graphed
    assert eager.run_epoch().train_loss == asked.run_epoch().train_loss


def test_learning_rates_a_graph_reads_follow_the_schedule_and_checkpoint_as_floats() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}], momentum=0.9)
    tensor_learning_rates(opt, torch.device("cpu"))
    lr_tensors = [g["lr"] for g in opt.param_groups]
    assert all(torch.is_tensor(t) for t in lr_tensors)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    assert sched.base_lrs == [0.1, 0.01], "base rates stay floats: the schedule's arithmetic stays on the host"
    sched.step()
    sched.step()
    # filled in place: the very tensors a captured step reads hold the new rates
    assert [g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors, strict=True)] == [True, True]
    assert [float(t) for t in lr_tensors] == pytest.approx([0.025, 0.0025])
    saved = float_learning_rates(opt.state_dict())
    assert [type(g["lr"]) for g in saved["param_groups"]] == [float, float]
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([0.025, 0.0025])
    eager = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0, momentum=0.9)
    eager.load_state_dict(saved)  # a graphed trial's checkpoint resumes in an eager trainer
    assert [g["lr"] for g in eager.param_groups] == pytest.approx([0.025, 0.0025])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_the_graphed_step_follows_the_eager_loss_curve() -> None:
    device = torch.device("cuda")
    model = ModelConfig(image_size=32)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, eval_batch_size=256, precision="bf16")
    curves = {}
    for mode in ("off", "on"):
        trainer = Trainer(_splits(2048, 32), model, dataclasses.replace(cfg, cuda_graph=mode), device, seed=3)
        curves[mode] = [trainer.run_epoch().train_loss for _ in range(4)]  # 4 x 32 steps
        assert (trainer.graph is not None) == (mode == "on")
        if mode == "on":
            assert trainer.graph is not None and not trainer.graph.failed and trainer.graph.graphs
    for eager, graphed in zip(curves["off"], curves["on"], strict=True):
        assert graphed == pytest.approx(eager, rel=0.03), curves  # bf16 rounding, not another trajectory


def test_an_epochs_figures_stay_plain_data_when_learning_rates_are_tensors() -> None:
    import json

    trainer = Trainer(
        _splits(128), ModelConfig(image_size=16), TrainConfig(epochs=1, batch_size=64), torch.device("cpu")
    )
    tensor_learning_rates(trainer.optimizer, torch.device("cpu"))  # as a graphed trainer's are
    result = trainer.run_epoch()
    assert isinstance(result.lr, float)
    json.dumps(result.to_dict())  # the trial's history attribute is JSON in the storage
