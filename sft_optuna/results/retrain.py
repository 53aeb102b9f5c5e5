"""Retrain the best recipe on the full training set over several seeds; the only code that reads the test set.

The search never sees the test split; this is where its honest accuracy comes from: train + validation
images together, a fresh model per seed, one evaluation on the test split at the end of each run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, TrainConfig, augment_config, trial_config
from sft_optuna.results.export import best_trial
from sft_optuna.training.augment import BatchPipeline
from sft_optuna.training.data import Dataset, Splits, load_dataset
from sft_optuna.training.model import build_model
from sft_optuna.training.placement import decide_placement
from sft_optuna.training.trainer import Trainer, predict

__all__ = ["evaluate_model_file", "retrain", "retrain_best", "subset_training"]

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("sft-optuna", "torch", "torchvision", "optuna"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _test_pipeline(
    data: Dataset, mean: torch.Tensor, std: torch.Tensor, config: StudyConfig, device: torch.device, placement: str
) -> BatchPipeline:
    """The test images as validation sees its own (the same evaluation crop)."""
    size, aug = config.model.image_size, config.train.augment
    return BatchPipeline(data.test_x, data.test_y, mean, std, device, size, True, aug, placement)


def subset_training(data: Dataset, n: int, seed: int) -> Dataset:
    """The dataset with a stratified, seeded subset of ``n`` training images (the test split untouched)."""
    from sft_optuna.errors import UserError
    from sft_optuna.training.data import stratified_split

    if not 0 < n <= len(data.train_y):
        raise UserError(f"--train-subset {n}: must be between 1 and {len(data.train_y)}")
    if n == len(data.train_y):
        return data
    keep, _ = stratified_split(data.train_y, n, seed)
    return dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])


def retrain(
    config: StudyConfig,
    data: Dataset,
    seeds: list[int],
    device: torch.device,
    out: Path,
    trial_number: int | None = None,
    device_memory: int | None = None,
) -> dict[str, Any]:
    """Train ``config``'s recipe (its ``model`` and ``train``: a trial's, see ``trial_config``) on all training
    images once per seed, evaluate on the test split, write the results.

    Writes ``model-seed<N>.pt`` (state dicts: the EMA's weights where the recipe keeps one), ``model.pt`` (the
    first seed's), ``model-card.json`` and ``summary.md`` under ``out``; returns the model card.
    """
    train = config.train
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # No validation split: every training image trains. The test split is evaluated once per seed, after.
    empty = data.train_x[:0]
    splits = Splits(data.train_x, data.train_y, empty, data.train_y[:0], len(data.classes))
    split_bytes = sum(t.numel() * t.element_size() for t in (data.train_x, data.test_x))
    placement = decide_placement(config, split_bytes, len(data.classes), device, device_memory)
    log.info("%s", placement.describe(device))
    accs: list[float] = []
    per_seed: list[dict[str, Any]] = []
    mean = std = torch.zeros(3)
    for seed in seeds:
        recipe = dataclasses.replace(train, seed=seed)
        trainer = Trainer(splits, config.model, recipe, device, seed=seed, placement=placement.where)
        for _ in range(train.epochs):
            r = trainer.run_epoch()
            log.info(
                "retrain seed %d epoch %d/%d: train_loss %.4f %.0f img/s",
                seed,
                r.epoch,
                train.epochs,
                r.train_loss,
                r.images_per_s,
            )
        mean, std = trainer.mean, trainer.std
        test = _test_pipeline(data, mean, std, config, device, placement.where)
        acc = trainer.evaluate(test)
        log.info("retrain seed %d: test accuracy %.4f", seed, acc)
        torch.save(trainer.final_model.state_dict(), out / f"model-seed{seed}.pt")
        accs.append(acc)
        per_seed.append(
            {
                "seed": seed,
                "test_acc": acc,
                "model": f"model-seed{seed}.pt",
                "final_train_loss": trainer.history[-1].train_loss,
            }
        )
    (out / "model.pt").write_bytes((out / f"model-seed{seeds[0]}.pt").read_bytes())
    card = {
        "study": config.name,
        "trial": trial_number,
        "train": dataclasses.asdict(train),
        "model": dataclasses.asdict(config.model),
        "data": {
            **dataclasses.asdict(config.data),
            "checksum": data.checksum(),
            "train_images": len(data.train_y),
            "test_images": len(data.test_y),
            "classes": list(data.classes),
        },
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "seeds": per_seed,
        "test_acc": accs,
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "versions": _versions(),
    }
    (out / "model-card.json").write_text(json.dumps(card, indent=2))
    lines = [
        f"# {config.name}: retrained best recipe" + (f" (trial {trial_number})" if trial_number is not None else ""),
        "",
        f"Test accuracy over {len(accs)} seed(s): **{card['test_acc_mean']:.4f} ± {card['test_acc_std']:.4f}**"
        f" ({', '.join(f'{a:.4f}' for a in accs)})",
        "",
        f"Trained on {len(data.train_y)} training images (train + validation) for {train.epochs} epochs per seed"
        f" on {card['device']}"
        f" in {card['wall_seconds']} s; evaluated once on the {len(data.test_y)} test images.",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in dataclasses.asdict(train).items()],
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    return card


def evaluate_model_file(card_path: Path, data: Dataset, device: torch.device, seed_index: int = 0) -> float:
    """Load a retrained model from its card and measure its test accuracy again (what the card claims)."""
    from sft_optuna.config import ModelConfig

    card = json.loads(card_path.read_text())
    model_cfg = ModelConfig(**{**card["model"], "weights": "none"})
    model = build_model(len(card["data"]["classes"]), model_cfg)
    model.load_state_dict(torch.load(card_path.parent / card["seeds"][seed_index]["model"], weights_only=True))
    model = model.to(device).to(memory_format=torch.channels_last)
    norm = card["normalization"]
    recipe = StudyConfig(
        name=card["study"],
        model=model_cfg,
        train=dataclasses.replace(TrainConfig(), augment=augment_config(card["train"]["augment"], "augment")),
    )
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    test = _test_pipeline(data, mean, std, recipe, device, "device")
    preds = predict(model, test, card["train"]["eval_batch_size"], card["train"]["precision"])
    return float((preds == test.y).float().mean())


def retrain_best(
    study: optuna.Study,
    config: StudyConfig,
    seeds: int,
    device: torch.device,
    out: Path,
    epochs: int | None = None,
    train_subset: int | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """The whole ``retrain`` use case: the best trial's recipe (``epochs`` overriding its own), on this node's
    data (capped at ``train_subset`` training images, by default the study's ``data.train_subset``), over
    ``seeds`` seeds; the result is written to ``out`` and recorded on the study (``status`` shows it). Returns
    the model card."""
    best = best_trial(study, config)
    recipe = trial_config(config, best.params)
    if epochs is not None:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=epochs))
    # the study's own cap unless told otherwise: its smoke study's 4,000 images must not become 50,000 (and an
    # image folder decodes only those)
    train_subset = config.data.train_subset if train_subset is None else train_subset
    if data_root is not None:  # the card says which folder the model was trained on, not the study file's default
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(data_root)))
    data = load_dataset(config.data, data_root, train_subset)
    if train_subset is not None:
        data = subset_training(data, train_subset, config.data.seed)
    card = retrain(recipe, data, list(range(seeds)), device, out, best.number)
    study.set_user_attr(
        attrs.RETRAIN,
        {k: card[k] for k in ("test_acc", "test_acc_mean", "test_acc_std", "trial")}
        | {"epochs": recipe.train.epochs, "out": str(out)},
    )
    return card
