"""The fine-tuning knobs act as documented and survive a checkpoint/resume mid-phase: discriminative learning
rates, the linear probe before fine-tuning (LP-FT), frozen BatchNorm, an EMA of the weights, head dropout,
mixup/CutMix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sft_optuna.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from sft_optuna.training.data import load_imagefolder, make_splits
from sft_optuna.training.trainer import Trainer, WeightEMA

CPU = torch.device("cpu")
MODEL = ModelConfig(image_size=16)
BASE = TrainConfig(epochs=3, batch_size=32, lr=0.05, eval_batch_size=256)


@pytest.fixture(scope="module")
def splits(folder_root: Path):  # type: ignore[no-untyped-def]
    return make_splits(load_imagefolder(folder_root, 16), DataConfig(val_size=40, image_size=16))


def _backbone(trainer: Trainer) -> dict[str, torch.Tensor]:
    head = trainer.model.sft_head + "."
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith(head)}


def _head(trainer: Trainer) -> torch.Tensor:
    return trainer.head.weight.detach().clone()  # type: ignore[union-attr]


def test_the_head_trains_at_lr_and_the_backbone_at_lr_times_the_scale(splits) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(BASE, backbone_lr_scale=0.1, scheduler="exponential", lr_decay=0.5)
    trainer = Trainer(splits, MODEL, cfg, CPU)
    head = {id(p) for p in trainer.head.parameters()}
    groups = trainer.optimizer.param_groups
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1, "a group is all head or all backbone"
        assert g["lr"] == pytest.approx(0.05 if in_head == {True} else 0.005)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in trainer.model.parameters()}
    r = trainer.run_epoch()
    # both follow the one schedule: after an epoch each is its base rate times exp(-0.5)
    for g in groups:
        base = 0.05 if id(g["params"][0]) in head else 0.005
        assert g["lr"] == pytest.approx(base * 0.6065306597, rel=1e-6)
    assert r.lr == pytest.approx(0.05 * 0.6065306597, rel=1e-6), "the reported rate is the head's"


def test_freeze_epochs_train_only_the_head_then_everything(splits) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer(splits, MODEL, dataclasses.replace(BASE, freeze_epochs=2), CPU)
    backbone, head = _backbone(trainer), _head(trainer)
    for _ in range(2):
        trainer.run_epoch()
        # the linear probe: weights and BatchNorm statistics of the backbone untouched, the head learning
        assert all(torch.equal(v, backbone[k]) for k, v in _backbone(trainer).items())
        assert not torch.equal(_head(trainer), head)
    trainer.run_epoch()
    changed = [k for k, v in _backbone(trainer).items() if not torch.equal(v, backbone[k])]
    assert "conv1.weight" in changed and "layer4.1.bn2.running_mean" in changed, "then full fine-tuning"


def test_frozen_batchnorm_keeps_its_running_statistics_and_trains_its_affine(splits) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer(splits, MODEL, dataclasses.replace(BASE, bn="frozen"), CPU)
    before = _backbone(trainer)
    trainer.run_epoch()
    after = _backbone(trainer)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"]), "scale and shift still train"
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_weight_ema_follows_its_warmed_up_formula() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = WeightEMA(net, decay=0.9)
    expected = {k: v.clone().float() for k, v in start.items() if v.is_floating_point()}
    for s in range(1, 40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * s)
        net.train()(torch.randn(4, 2))  # moves the BatchNorm statistics and its batch count
        ema.update(net)
        d = min(0.9, (1 + s) / (10 + s))
        for k, v in net.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v
    for k, v in ema.model.state_dict().items():
        if k in expected:
            assert torch.allclose(v, expected[k], atol=1e-5), k
        else:
            assert torch.equal(v, net.state_dict()[k]), "integer buffers are copied"


def test_validation_measures_the_ema_weights(splits) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer(splits, MODEL, dataclasses.replace(BASE, ema_decay=0.99), CPU)
    r = trainer.run_epoch()
    assert trainer.final_model is trainer.ema.model  # type: ignore[union-attr]
    from sft_optuna.training.trainer import predict

    ema_acc = float((predict(trainer.ema.model, trainer.val_data, 256) == trainer.val_data.y).float().mean())  # type: ignore[union-attr]
    raw_acc = float((predict(trainer.model, trainer.val_data, 256) == trainer.val_data.y).float().mean())
    assert r.val_acc == ema_acc
    assert ema_acc != raw_acc or not torch.equal(
        trainer.ema.model.fc.weight,
        trainer.model.fc.weight,  # type: ignore[union-attr]
    ), "the EMA is not the model"


def test_mixup_and_cutmix_change_the_loss_and_stay_seeded(splits) -> None:  # type: ignore[no-untyped-def]
    mixed = dataclasses.replace(BASE, augment=AugmentConfig(mixup=0.4, cutmix=1.0))
    plain_loss = Trainer(splits, MODEL, BASE, CPU).run_epoch().train_loss
    a = Trainer(splits, MODEL, mixed, CPU).run_epoch().train_loss
    b = Trainer(splits, MODEL, mixed, CPU).run_epoch().train_loss
    assert a == b and a != plain_loss


KNOBS = {
    "lp-ft": {"freeze_epochs": 2},
    "ema": {"ema_decay": 0.95},
    "frozen bn": {"bn": "frozen"},
    "backbone lr": {"backbone_lr_scale": 0.2},
    "head dropout": {"head_dropout": 0.3},
    "mixup+cutmix": {"augment": AugmentConfig(mixup=0.4, cutmix=1.0)},
    "photo pipeline": {"augment": AugmentConfig(crop="resized", min_scale=0.3, policy="trivialaugment")},
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_a_knob_survives_checkpoint_and_resume_mid_phase(splits, knob: str) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(BASE, **KNOBS[knob])  # type: ignore[arg-type]
    straight = Trainer(splits, MODEL, cfg, CPU, seed=3)
    curve = [straight.run_epoch().train_loss for _ in range(3)]
    first = Trainer(splits, MODEL, cfg, CPU, seed=3)
    first.run_epoch()  # epoch 1 of 2 frozen: resumed inside the linear probe
    state = first.state_dict()
    resumed = Trainer(splits, MODEL, cfg, CPU, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.run_epoch().train_loss for _ in range(2)] == curve[1:]
    for k, v in straight.final_model.state_dict().items():
        assert torch.equal(v, resumed.final_model.state_dict()[k]), k


def test_a_photo_study_runs_end_to_end_with_a_searched_backbone_and_knobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped photo studies' shape on the CPU: photos of mixed aspect ratios, two backbones searched, the
    resized crop with TrivialAugment and mixup, an LP-FT phase, EMA; every trial completes and says where its
    data lived."""
    import optuna
    import yaml
    from conftest import study_dict
    from PIL import Image

    from sft_optuna.cli import main

    rng = torch.Generator().manual_seed(0)
    root = tmp_path / "photos"
    for split, n in (("train", 48), ("test", 8)):
        for i in range(n):
            label = i % 2
            w, h = (40, 28) if i % 3 else (28, 44)  # landscape and portrait photos
            base = torch.full((h, w, 3), 40 + 170 * label, dtype=torch.uint8)
            noise = torch.randint(0, 40, (h, w, 3), generator=rng, dtype=torch.uint8)
            path = root / split / f"c{label}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((base + noise).numpy()).save(path)
    raw = study_dict(
        root,
        name="photos",
        budget={"n_trials": 2},
        data={"val_size": 12, "image_size": 20, "resize": "center_crop"},
        model={"arch": "resnet18", "image_size": 16},
        train={
            "epochs": 2,
            "batch_size": 12,
            "freeze_epochs": 1,
            "ema_decay": 0.9,
            "augment": {"crop": "resized", "min_scale": 0.3, "policy": "trivialaugment", "mixup": 0.2},
        },
    )
    raw["search_space"] = {"model.arch": {"type": "categorical", "choices": ["resnet18", "mobilenet_v3_small"]}}
    study = tmp_path / "photos.yaml"
    study.write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path / 's.db'}"
    with caplog.at_level("INFO", logger="sft_optuna"):
        code = main(["--storage", url, "run", str(study), "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 0, capsys.readouterr().err
    trials = optuna.load_study(study_name="photos", storage=url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.params["model.arch"] in ("resnet18", "mobilenet_v3_small") for t in trials)
    assert all(len(t.user_attrs["history"]) == 2 for t in trials)
    assert re.search(r"data \(\d+ KB\) on cpu: the CPU holds the data either way", caplog.text), caplog.text[-500:]
