"""Training: schedules follow their formulas, a tiny run learns, resume is exact, seeds repeat."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sft_optuna.config import DataConfig, ModelConfig, TrainConfig
from sft_optuna.training.data import load_imagefolder, make_splits
from sft_optuna.training.trainer import DivergedError, Trainer, lr_factor

CPU = torch.device("cpu")
MODEL = ModelConfig(image_size=16)


@pytest.fixture(scope="module")
def splits(folder_root: Path):  # type: ignore[no-untyped-def]
    return make_splits(load_imagefolder(folder_root, 16), DataConfig(val_size=40, image_size=16))


def test_constant_exponential_and_cosine_schedules_follow_their_formulas() -> None:
    const = TrainConfig(epochs=10, scheduler="constant")
    assert lr_factor(const, 0) == lr_factor(const, 7.5) == 1.0
    expo = TrainConfig(epochs=10, scheduler="exponential", lr_decay=0.3)
    assert lr_factor(expo, 2.5) == pytest.approx(math.exp(-0.3 * 2.5))
    cos = TrainConfig(epochs=10, scheduler="cosine", lr_min_ratio=0.1)
    assert lr_factor(cos, 0) == pytest.approx(1.0)
    assert lr_factor(cos, 5) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cos, 10) == pytest.approx(0.1)


def test_warmup_is_linear_then_the_schedule_starts() -> None:
    cfg = TrainConfig(epochs=10, scheduler="cosine", warmup_epochs=2)
    assert lr_factor(cfg, 0) == 0.0 and lr_factor(cfg, 1) == pytest.approx(0.5)
    assert lr_factor(cfg, 2) == pytest.approx(1.0)
    assert lr_factor(cfg, 6) == pytest.approx(0.5)  # halfway through the 8 cosine epochs


def test_optimizer_lr_follows_the_schedule_per_step(splits) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(epochs=2, batch_size=40, lr=0.1, scheduler="exponential", lr_decay=0.5)
    trainer = Trainer(splits, MODEL, cfg, CPU)
    r = trainer.run_epoch()
    assert r.lr == pytest.approx(0.1 * math.exp(-0.5 * 1.0))


def test_tiny_model_learns_generated_data(splits) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer(splits, MODEL, TrainConfig(epochs=4, batch_size=32, lr=0.05), CPU)
    results = [trainer.run_epoch() for _ in range(4)]
    assert results[-1].val_acc >= 0.75, [r.val_acc for r in results]  # chance is 0.25
    assert results[-1].train_loss < results[0].train_loss
    assert all(r.images_per_s > 0 and r.peak_memory_mb > 0 for r in results)


def test_same_seed_gives_the_same_first_epoch_loss(splits) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=5)
    a = Trainer(splits, MODEL, cfg, CPU).run_epoch()
    b = Trainer(splits, MODEL, cfg, CPU).run_epoch()
    c = Trainer(splits, MODEL, cfg, CPU, seed=6).run_epoch()
    assert a.train_loss == b.train_loss and a.val_acc == b.val_acc
    assert c.train_loss != a.train_loss


def test_resume_from_state_dict_continues_exactly(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    straight = Trainer(splits, MODEL, cfg, CPU)
    full = [straight.run_epoch() for _ in range(3)]

    first = Trainer(splits, MODEL, cfg, CPU)
    first.run_epoch()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = Trainer(splits, MODEL, cfg, CPU)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    rest = [resumed.run_epoch() for _ in range(2)]
    assert [r.epoch for r in rest] == [2, 3]
    assert [r.train_loss for r in rest] == pytest.approx([r.train_loss for r in full[1:]], rel=1e-5)
    assert [r.val_acc for r in rest] == [r.val_acc for r in full[1:]]


def test_nan_loss_raises_diverged(splits) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer(splits, MODEL, TrainConfig(epochs=2, batch_size=32, lr=1e30, momentum=0.0), CPU)
    with pytest.raises(DivergedError, match="training loss is"):
        trainer.run_epoch()


def test_the_confusion_matrix_reuses_the_last_validation_pass_only_while_weights_are_unchanged(
    splits,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sft_optuna.training import trainer as train

    calls: list[int] = []
    real = train.predict
    monkeypatch.setattr(train, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = Trainer(splits, MODEL, TrainConfig(epochs=2, batch_size=32, lr=0.05), CPU)
    r = trainer.run_epoch()
    matrix = torch.tensor(trainer.confusion_matrix())
    assert len(calls) == 1, "the epoch's validation predictions serve the confusion matrix"
    assert int(matrix.sum()) == len(splits.val_y)
    assert float(matrix.diag().sum()) / len(splits.val_y) == pytest.approx(r.val_acc)
    trainer.train_steps(max_steps=1)  # the weights change: predictions are made again
    trainer.confusion_matrix()
    assert len(calls) == 2


def test_evaluate_is_plain_eval_mode_accuracy_without_augmentation(splits) -> None:  # type: ignore[no-untyped-def]
    # Computed by hand from model.eval() on the validation images, normalised and upsampled as in training,
    # never cropped or flipped: an evaluation that augmented (or stayed in train mode) would differ.
    from sft_optuna.training.augment import normalize
    from sft_optuna.training.trainer import predict

    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, channels_last=False)
    trainer = Trainer(splits, MODEL, cfg, CPU)
    for _ in range(4):
        trainer.run_epoch()
    model = trainer.model.eval()
    with torch.no_grad():
        x = normalize(splits.val_x, trainer.mean, trainer.std)
        x = torch.nn.functional.interpolate(x, size=MODEL.image_size, mode="bilinear", align_corners=False)
        logits = model(x)
    by_hand = (logits.argmax(1) == splits.val_y).float().mean().item()
    assert trainer.evaluate() == pytest.approx(by_hand)
    assert trainer.history[-1].val_acc == pytest.approx(by_hand)
    # the same prediction for every image (a cropped or flipped image would change some of them)
    assert torch.equal(predict(trainer.model, trainer.val_data, 7), logits.argmax(1))
    assert logits.argmax(1).unique().numel() > 1, "a model that predicts one class cannot tell"
