"""Asynchronous successive halving (ASHA; Li et al., MLSys 2020): rungs, and which paused trial to promote.

The arithmetic and the promotion rule only, on plain trials: no storage, no claims. A trial pauses when it
finishes a rung's epoch; a claim promotes, highest rung first, a paused trial in the top ``n_k // eta`` of its
rung (``n_k``: learning curves — lineages — that reached rung k) that was not promoted yet.

The objective pauses trials (``objective.py``), claims promote them (``coordination/claims.py``); the pruner
below only carries the settings through the study file's checks: ASHA never stops a trial.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig

__all__ = [
    "AshaPruner",
    "due_promotion",
    "occupancy",
    "pause_epochs",
    "rung_values",
    "rungs",
    "sampler_view",
    "study_rungs",
]


class AshaPruner(optuna.pruners.BasePruner):
    """``pruner: {name: asha, min_epochs: 1, reduction_factor: 3}``: rungs at ``min_epochs * reduction_factor**k``.

    Never prunes: trials pause at rungs (the objective) and are promoted by claims."""

    def __init__(self, min_epochs: int = 1, reduction_factor: int = 3) -> None:
        rungs(min_epochs, reduction_factor, min_epochs + 1)  # the same checks, one message
        self.min_epochs = min_epochs
        self.reduction_factor = reduction_factor

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return False


def study_rungs(config: StudyConfig) -> list[int] | None:
    """The pause epochs of an ASHA study (from its pruner and ``train.epochs``), None for any other pruner."""
    if config.pruner.name != "asha":
        return None
    options: dict[str, Any] = config.pruner.options
    return rungs(int(options.get("min_epochs", 1)), int(options.get("reduction_factor", 3)), config.train.epochs)


def pause_epochs(config: StudyConfig, from_rung: int = -1) -> dict[int, int]:
    """Epoch -> rung at which a trial pauses, for a lineage promoted from ``from_rung`` (-1: a new one)."""
    return {epoch: k for k, epoch in enumerate(study_rungs(config) or []) if k > from_rung}


def reduction_factor(config: StudyConfig) -> int:
    return int(config.pruner.options.get("reduction_factor", 3))


def rungs(min_epochs: int, reduction_factor: int, max_epochs: int) -> list[int]:
    """Epochs at which trials pause: ``min_epochs * reduction_factor**k`` below ``max_epochs`` (a trial that
    reaches ``max_epochs`` is complete, not paused)."""
    if not (isinstance(min_epochs, int) and isinstance(reduction_factor, int)):
        raise ValueError("ASHA's min_epochs and reduction_factor are whole numbers")
    if min_epochs < 1 or reduction_factor < 2:
        raise ValueError("ASHA needs min_epochs >= 1 and reduction_factor >= 2")
    out, epoch = [], min_epochs
    while epoch < max_epochs:
        out.append(epoch)
        epoch *= reduction_factor
    return out


def rung_values(trials: Sequence[FrozenTrial], epoch: int) -> dict[int, float]:
    """Lineage -> validation accuracy at ``epoch``, for every lineage whose curve reached it (a promotion or a
    retry carries its lineage's curve, so each lineage counts once)."""
    values: dict[int, float] = {}
    for t in trials:
        value = t.intermediate_values.get(epoch)
        if value is not None and t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED:
            values.setdefault(attrs.lineage(t), value)
    return values


def _paused_at(t: FrozenTrial, k: int) -> bool:
    return t.state == TrialState.PRUNED and t.user_attrs.get(attrs.RUNG) == k


def due_promotion(trials: Sequence[FrozenTrial], epochs: Sequence[int], reduction_factor: int) -> FrozenTrial | None:
    """The paused trial a free worker should continue, or None (then it starts a new configuration).

    Highest rung first; in rung k, among the top ``n_k // reduction_factor`` lineages by their value at the
    rung's epoch, the best paused trial not promoted yet. Ties go to the lower trial number.
    """
    promoted = {int(t.user_attrs[attrs.PROMOTED_FROM]) for t in trials if attrs.PROMOTED_FROM in t.user_attrs}
    for k in reversed(range(len(epochs))):
        values = rung_values(trials, epochs[k])
        top = sorted(values, key=lambda lineage: (-values[lineage], lineage))[: len(values) // reduction_factor]
        best = set(top)
        candidates = [t for t in trials if _paused_at(t, k) and t.number not in promoted and attrs.lineage(t) in best]
        if candidates:
            return min(candidates, key=lambda t: (-values[attrs.lineage(t)], t.number))
    return None


def occupancy(trials: Sequence[FrozenTrial], epochs: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Per rung: (epoch, learning curves that reached it, trials paused there waiting, trials promoted from it)."""
    promoted = {int(t.user_attrs[attrs.PROMOTED_FROM]) for t in trials if attrs.PROMOTED_FROM in t.user_attrs}
    rows = []
    for k, epoch in enumerate(epochs):
        paused = [t for t in trials if _paused_at(t, k)]
        waiting = sum(t.number not in promoted for t in paused)
        rows.append((epoch, len(rung_values(trials, epoch)), waiting, len(paused) - waiting))
    return rows


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

MODEL_MIN_POINTS = 10
"""The fewest curves at a budget that the sampler models, where its options set no ``n_startup_trials`` (the
default of Optuna's TPE and GP samplers)."""


def sampler_view(trials: Sequence[FrozenTrial], config: StudyConfig | None = None) -> list[FrozenTrial]:
    """The trials a sampler learns from: one per lineage; in an ASHA study, compared at one budget.

    A promoted (or retried) configuration is several trials with the same parameters: the one paused at its
    rung and the one that continues it. Shown them all, TPE ranks the paused copy of a winner among its bad
    guesses — by its step, below every finished trial — next to the winner's good one, and with
    ``constant_liar`` counts a running promotion as one more bad guess. So each lineage shows its latest
    finished trial, or — none finished yet — its running or queued one.

    In an ASHA study (``config``) most trials are paused, at different epochs; Optuna's samplers rank a pruned
    trial by its last step first and its value second, or (GP) ignore it. As BOHB does (Falkner et al., ICML
    2018), the sampler then models the deepest budget — a rung's epoch, or the end — that at least
    ``n_startup_trials`` curves reached, each curve as a finished trial valued at that epoch; curves that
    stopped below it are left out. Running and queued trials stay as they are.
    """
    latest: dict[int, FrozenTrial] = {}
    for t in trials:
        if t.state in _FINISHED:
            k = attrs.lineage(t)
            if k not in latest or t.number > latest[k].number:
                latest[k] = t
    view = [t for t in trials if latest.get(attrs.lineage(t), t) is t]
    epochs = study_rungs(config) if config is not None else None
    if not epochs or config is None:
        return view
    min_points = int(config.sampler.options.get("n_startup_trials", MODEL_MIN_POINTS))
    finished = [t for t in view if t.state in _FINISHED]
    if sum(t.state == TrialState.COMPLETE for t in finished) >= min_points:
        return [t for t in view if t.state != TrialState.PRUNED]
    budget = epochs[0]
    for epoch in reversed(epochs):
        if sum(epoch in t.intermediate_values for t in finished) >= min_points:
            budget = epoch
            break
    out = []
    for t in view:
        if t.state not in _FINISHED:
            out.append(t)
        elif budget in t.intermediate_values:
            at_budget = copy.copy(t)
            at_budget.state = TrialState.COMPLETE
            at_budget.value = t.intermediate_values[budget]
            out.append(at_budget)
    return out
