"""Fused packs (``worker --pack K``): K trials trained as one vmapped model equal K trainers of their own."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sft_optuna.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from sft_optuna.training import packs
from sft_optuna.training.data import load_imagefolder, make_splits
from sft_optuna.training.packs import Pack, pack_key
from sft_optuna.training.trainer import Trainer

CPU = torch.device("cpu")
MODEL = ModelConfig(image_size=16)

# Members differ in everything a member keeps its own: rate, schedule, momentum, nesterov, weight decay, label
# smoothing, seed (data order and augmentation draws), mixing, epochs and backbone rate.
CONFIGS = [
    TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=1, channels_last=False, scheduler="cosine", weight_decay=5e-4),
    TrainConfig(
        epochs=1,
        batch_size=32,
        lr=0.005,
        seed=2,
        channels_last=False,
        scheduler="exponential",
        lr_decay=0.5,
        momentum=0.5,
    ),
    TrainConfig(
        epochs=2,
        batch_size=32,
        lr=0.02,
        seed=3,
        channels_last=False,
        nesterov=False,
        label_smoothing=0.1,
        backbone_lr_scale=0.5,
        augment=AugmentConfig(mixup=0.4, flip=False),
    ),
]


@pytest.fixture(scope="module")
def splits(folder_root: Path):  # type: ignore[no-untyped-def]
    return make_splits(load_imagefolder(folder_root, 16), DataConfig(val_size=40, image_size=16))


def _float64(trainer: Trainer) -> Trainer:
    """The trainer in float64. In float32 a plain CPU step and a vmapped one sum in different orders, and this
    toy problem (small batches, BatchNorm, near-chance logits) amplifies the last bits into visible differences
    within a few steps — measured against a float64 oracle, the plain step's gradients were the less accurate
    (0.4% vs 4e-6 relative error). In float64 both are exact enough that any real difference shows."""
    trainer.model.double()  # the same Parameter objects: the optimizer keeps them
    trainer.step_model = _Float64Input(trainer.model)
    return trainer


class _Float64Input(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.double())  # type: ignore[no-any-return]


def _alone(splits: Any, cfg: TrainConfig, epochs: int | None = None) -> Trainer:
    trainer = _float64(Trainer(splits, MODEL, cfg, CPU))
    for _ in range(epochs or cfg.epochs):
        trainer.run_epoch()
    return trainer


def _packed(splits: Any, configs: list[TrainConfig], epochs: list[int]) -> tuple[list[Trainer], Pack]:
    """Each config's trainer on a thread of its own, all in one pack; each runs ``epochs[i]`` epochs, then
    leaves."""
    pack = Pack()
    trainers = [_float64(Trainer(splits, MODEL, cfg, CPU, pack=pack)) for cfg in configs]
    errors: list[BaseException] = []

    def run(t: Trainer, n: int) -> None:
        try:
            for _ in range(n):
                t.run_epoch()
        except BaseException as exc:
            errors.append(exc)
        finally:
            t.close()

    threads = [threading.Thread(target=run, args=(t, n)) for t, n in zip(trainers, epochs, strict=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    return trainers, pack


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b if b[k].is_floating_point())


def _assert_same(packed: Trainer, splits: Any, cfg: TrainConfig, epochs: int | None = None) -> None:
    """``packed`` trained as a trainer of its own would have: the same learning curve, weights, BatchNorm
    statistics and optimizer state, to 1e-6."""
    alone = _alone(splits, cfg, epochs)
    assert len(packed.history) == len(alone.history)
    for p, a in zip(packed.history, alone.history, strict=True):
        assert p.train_loss == pytest.approx(a.train_loss, rel=1e-6), (p, a)
        assert p.train_acc == a.train_acc and p.val_acc == a.val_acc, (p, a)
        assert p.lr == pytest.approx(a.lr, rel=1e-12)
    mine, theirs = packed.state_dict(), alone.state_dict()
    assert _max_diff(mine["model"], theirs["model"]) < 1e-6
    for name, value in theirs["model"].items():
        if not value.is_floating_point():
            assert torch.equal(mine["model"][name], value), name  # BatchNorm's batch counts
    slots = ("exp_avg", "exp_avg_sq") if cfg.optimizer == "adamw" else ("momentum_buffer",) if cfg.momentum else ()
    for slot in slots:
        ours = {k: s[slot] for k, s in mine["optimizer"]["state"].items()}
        ref = {k: s[slot] for k, s in theirs["optimizer"]["state"].items()}
        assert ours.keys() == ref.keys()
        assert _max_diff(ours, ref) < 1e-6, slot


def test_fused_members_learn_as_trainers_of_their_own(splits) -> None:  # type: ignore[no-untyped-def]
    trainers, pack = _packed(splits, CONFIGS, [c.epochs for c in CONFIGS])
    steps = trainers[0].steps_per_epoch
    # all three stepped together for one epoch, then the two 2-epoch members for one more
    assert pack.fused_steps == 2 * steps, (pack.fused_steps, steps)
    for packed, cfg in zip(trainers, CONFIGS, strict=True):
        _assert_same(packed, splits, cfg)
    assert pack.size() == 0


def test_a_member_that_leaves_early_does_not_disturb_the_others(splits) -> None:  # type: ignore[no-untyped-def]
    # the first member stops after one of its two epochs, as a pruned trial would; the others' curves stay theirs
    trainers, _ = _packed(splits, CONFIGS, [1, 1, 2])
    assert len(trainers[0].history) == 1
    _assert_same(trainers[0], splits, CONFIGS[0], epochs=1)
    for packed, cfg in zip(trainers[1:], CONFIGS[1:], strict=True):
        _assert_same(packed, splits, cfg)


def test_adamw_members_equal_adamw_trainers(splits) -> None:  # type: ignore[no-untyped-def]
    adamw = TrainConfig(epochs=1, batch_size=32, optimizer="adamw", channels_last=False)
    configs = [
        dataclasses.replace(adamw, lr=1e-3, momentum=0.9, weight_decay=0.05, seed=1),
        dataclasses.replace(adamw, lr=3e-3, momentum=0.8, weight_decay=0.0, seed=2),
    ]
    trainers, _ = _packed(splits, configs, [1, 1])
    for packed, cfg in zip(trainers, configs, strict=True):
        _assert_same(packed, splits, cfg)


def test_a_configuration_that_cannot_be_fused_trains_alone_beside_the_pack(splits) -> None:  # type: ignore[no-untyped-def]
    solo = TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=4, freeze_epochs=1, channels_last=False)
    assert pack_key(MODEL, solo) is None
    other_shape = TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=5, channels_last=False)
    assert pack_key(MODEL, other_shape) != pack_key(MODEL, CONFIGS[0])
    configs = [CONFIGS[0], solo, other_shape]
    trainers, pack = _packed(splits, configs, [1, 2, 1])
    assert trainers[1].member is None
    # the 32-image group and the 16-image group each stepped on its own
    assert pack.fused_steps == trainers[0].steps_per_epoch + trainers[2].steps_per_epoch
    for packed, cfg in zip(trainers, configs, strict=True):
        _assert_same(packed, splits, cfg, epochs=len(packed.history))


def test_a_pack_shares_one_copy_of_the_splits_whatever_the_members_augmentation(splits) -> None:  # type: ignore[no-untyped-def]
    pack = Pack()
    a = Trainer(splits, MODEL, CONFIGS[0], CPU, pack=pack)
    b = Trainer(splits, MODEL, CONFIGS[2], CPU, pack=pack)  # mixup, no flip
    assert a.train_data.x is b.train_data.x and a.val_data.x is b.val_data.x
    assert a.train_data.aug != b.train_data.aug
    a.close()
    b.close()
    assert pack.size() == 0


def test_members_fuse_only_with_the_same_dropout_rate() -> None:
    with_dropout = TrainConfig(head_dropout=0.1)
    assert pack_key(MODEL, with_dropout) != pack_key(MODEL, TrainConfig(head_dropout=0.2))
    assert pack_key(MODEL, with_dropout) == pack_key(MODEL, TrainConfig(head_dropout=0.1, lr=0.5, seed=3))


def test_a_step_that_fails_before_it_starts_fails_every_member_and_none_waits_forever(
    splits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(group: Any, members: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, while stacking)")

    monkeypatch.setattr(packs, "_restack", no_memory)
    pack = Pack()
    trainers = [Trainer(splits, MODEL, cfg, CPU, pack=pack) for cfg in CONFIGS[:2]]
    errors: list[BaseException] = []

    def run(t: Trainer) -> None:
        try:
            t.run_epoch()
        except BaseException as exc:
            errors.append(exc)
        finally:
            t.close()

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a member waits forever"
    assert len(errors) == 2 and all(isinstance(e, torch.cuda.OutOfMemoryError) for e in errors)
    assert pack.size() == 0


def test_a_fused_step_that_does_not_fit_is_taken_in_halves_with_the_same_result(
    splits: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The device's memory is simulated (a CPU has none to run out of): any step of more than one member raises
    # CUDA's out-of-memory error, after it moved the BatchNorm statistics, as a real one in the backward would.
    real = packs._gradients
    sizes: list[int] = []

    def small_memory(group: Any, stack: Any, inputs: Any, start: int, stop: int) -> Any:
        sizes.append(stop - start)
        out = real(group, stack, inputs, start, stop)
        if stop - start > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    monkeypatch.setattr(packs, "_gradients", small_memory)
    trainers, _ = _packed(splits, CONFIGS[:2], [1, 1])
    assert "a fused step of 2 trials did not fit in device memory: stepping 1 at a time" in caplog.text
    assert sizes[:3] == [2, 1, 1] and set(sizes[3:]) == {1}  # halved once, then kept
    for packed, cfg in zip(trainers, CONFIGS[:2], strict=True):
        _assert_same(packed, splits, cfg, epochs=1)
