"""Budget preview before launch: trials, epochs, and device-hours from a short measured calibration.

The estimate is arithmetic on one measured number (training images/s of the study's fixed config on the
chosen device), so a user can redo it by hand:

    epoch_s = train_images / images_per_s + val_images / (eval_factor * images_per_s)
    hours_without_pruning = trials * epochs * epoch_s / 3600

With the median pruner the first ``n_startup_trials`` run in full; of the rest we assume half are pruned right
after the warm-up epochs (``n_warmup_steps + 1``): a rough, stated assumption, not a promise.

With ASHA (rungs ``r_0 < … < r_{K-1}`` below ``train.epochs`` = E, reduction factor η) the expected epochs are
those of the rule itself: all n configurations train to ``r_0``, n/η^k of them on from ``r_{k-1}`` to ``r_k``,
n/η^K to E:

    epochs_asha = n * (r_0 + sum_k (r_k - r_{k-1}) / η^k + (E - r_{K-1}) / η^K)

A ``budget.epochs`` caps both figures (the study stops starting work there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sft_optuna.config import StudyConfig
from sft_optuna.search.asha import reduction_factor, study_rungs
from sft_optuna.search.space import grid_size
from sft_optuna.training.data import CIFAR10_CLASSES, Splits, dataset_size
from sft_optuna.training.trainer import Trainer

__all__ = ["Plan", "asha_epochs", "calibrate", "make_plan", "train_image_count"]

EVAL_FACTOR = 3.0  # evaluation (no backward pass) runs about 3x the training rate: forward only, large batches
PRUNED_SHARE = 0.5  # assumed share of post-startup trials the median pruner stops after its warm-up


@dataclass(frozen=True)
class Plan:
    """The numbers ``sft-optuna plan`` prints."""

    trials: int
    grid_size: int | None
    epochs: int
    train_images: int
    val_images: int
    images_per_s: float
    epoch_seconds: float
    epochs_full: float
    """Epochs of the whole study without pruning (capped by ``budget.epochs``)."""
    epochs_with_pruning: float
    """Expected epochs with the study's pruner: the median's stated assumption, or ASHA's rule (capped)."""
    warnings: tuple[str, ...]

    @property
    def hours_without_pruning(self) -> float:
        return self.epochs_full * self.epoch_seconds / 3600

    @property
    def hours_with_pruning(self) -> float:
        return self.epochs_with_pruning * self.epoch_seconds / 3600


def asha_epochs(config: StudyConfig, trials: int) -> float | None:
    """Expected epochs of ``trials`` configurations under the study's ASHA rungs (None: not an ASHA study)."""
    rungs = study_rungs(config)
    if rungs is None:
        return None
    eta = reduction_factor(config)
    stops = [*rungs, config.train.epochs]
    per_config = sum((stop - (stops[k - 1] if k else 0)) / eta**k for k, stop in enumerate(stops))
    return trials * per_config


def train_image_count(config: StudyConfig, data_root: str | None = None) -> int:
    """Training images a trial sees, without loading the data (0 where the data is not on this node yet)."""
    size = dataset_size(config.data, data_root)
    n = max((size[0] if size else 0) - config.data.val_size, 0)
    return min(n, config.data.train_subset) if config.data.train_subset else n


def calibrate(config: StudyConfig, device: torch.device, steps: int = 5, data_root: str | None = None) -> float:
    """Training images/s of the study's fixed config on ``device``, measured on random images (as many classes
    as the data has, where it is here; CIFAR-10's ten otherwise)."""
    counts = dataset_size(config.data, data_root)
    classes = counts[1] if counts else len(CIFAR10_CLASSES)
    bs = config.train.batch_size
    gen = torch.Generator().manual_seed(0)
    n = bs * (steps + 1)
    size = config.data.image_size
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    model = dataclasses.replace(config.model, weights="none")  # speed does not depend on the starting weights
    trainer = Trainer(Splits(x, y, x[:bs], y[:bs], classes), model, config.train, device)
    trainer.train_steps(1)  # warm-up (cuDNN autotuning, allocator)
    _, _, seen, seconds, _ = trainer.train_steps(steps)
    return seen / max(seconds, 1e-9)


def make_plan(config: StudyConfig, images_per_s: float, train_images: int) -> Plan:
    """The budget arithmetic for a measured ``images_per_s``."""
    warnings: list[str] = []
    grid = grid_size(config)
    trials = config.budget.n_trials if grid is None else min(grid, config.budget.n_trials)
    if grid is not None and grid > config.budget.n_trials:
        warnings.append(
            f"the grid has {grid} points but the budget is {config.budget.n_trials}: "
            f"{grid - config.budget.n_trials} points will never run"
        )
    epochs = config.train.epochs
    if "epochs" in config.search_space:
        spec = config.search_space["epochs"]
        epochs = int(max(spec.choices) if spec.choices else spec.high or epochs)
        warnings.append(f"epochs is searched: estimating with the largest, {epochs}")
    val = config.data.val_size
    epoch_s = train_images / images_per_s + val / (EVAL_FACTOR * images_per_s)
    full = float(trials * epochs)
    asha = asha_epochs(config, trials)
    if asha is not None:
        pruned = asha
    elif config.pruner.name == "none":
        pruned = full
    else:
        startup = min(int(config.pruner.options.get("n_startup_trials", 5)), trials)
        warm = int(config.pruner.options.get("n_warmup_steps", 0)) + 1
        rest = trials - startup
        pruned = startup * epochs + rest * ((1 - PRUNED_SHARE) * epochs + PRUNED_SHARE * min(warm, epochs))
    cap = config.budget.epochs
    if cap is not None:
        if cap < pruned:
            warnings.append(f"budget.epochs {cap} stops the study before its {trials} trials are done (~{pruned:.0f})")
        full, pruned = min(full, cap), min(pruned, cap)
    return Plan(
        trials,
        grid,
        epochs,
        train_images,
        val,
        images_per_s,
        epoch_s,
        full,
        pruned,
        tuple(warnings),
    )


def describe(config: StudyConfig, plan: Plan, device: str) -> str:
    """A human-readable preview."""
    lines = [f"study {config.name!r}: sampler {config.sampler.name}, pruner {config.pruner.name}"]
    lines.append(f"trials: {plan.trials}" + (f" (grid of {plan.grid_size} points)" if plan.grid_size else ""))
    lines.append(
        f"epochs per trial: up to {plan.epochs}; {plan.train_images} training / {plan.val_images} validation images"
    )
    lines.append(
        f"calibration on {device}: {plan.images_per_s:.0f} training images/s at batch "
        f"{config.train.batch_size}, {config.model.image_size} px -> {plan.epoch_seconds:.1f} s per epoch"
    )
    if config.pruner.name == "asha":
        how = f"ASHA's expected epochs at rungs {study_rungs(config)}, reduction factor {reduction_factor(config)}"
    else:
        how = "assumes half the post-startup trials pruned early"
    cap = "" if config.budget.epochs is None else f", capped by budget.epochs {config.budget.epochs}"
    lines.append(
        f"estimate: {plan.epochs_full:.0f} epochs, {plan.hours_without_pruning:.2f} device-hours without pruning; "
        f"{plan.epochs_with_pruning:.0f} epochs, {plan.hours_with_pruning:.2f} with pruning ({how}{cap})"
    )
    lines.append("search space:")
    for name, spec in config.search_space.items():
        if spec.type == "categorical":
            lines.append(f"  {name}: one of {spec.choices}")
        else:
            extra = (" log" if spec.log else "") + (f" step {spec.step:g}" if spec.step else "")
            lines.append(f"  {name}: {spec.type} in [{spec.low:g}, {spec.high:g}]{extra}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
