"""The state of a study in a few lines: budget, trials by state, best, running trials (and dead ones), retrain."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig
from sft_optuna.coordination.claims import budget_used, epochs_used, retries_used, wrong_verdicts
from sft_optuna.coordination.heartbeat import last_beat
from sft_optuna.search.asha import occupancy, study_rungs
from sft_optuna.search.audit import audit_summary

__all__ = ["progress", "status_lines"]


def progress(trials: Sequence[FrozenTrial], config: StudyConfig) -> list[tuple[str, str]]:
    """(label, text) of the study's spending: epochs used and left, ASHA's rungs, the pruner audit — shown by
    ``status`` and, as a table, in the dashboard (``results/notes.write_progress``)."""
    cap = config.budget.epochs
    used = epochs_used(trials, config)
    rows = [
        (
            "epochs",
            f"{used} trained or planned by running trials"
            + (f" of a budget of {cap} ({max(cap - used, 0)} left)" if cap is not None else ""),
        )
    ]
    epochs = study_rungs(config)
    if epochs:
        rungs = [f"epoch {e}: {n} reached, {w} paused, {p} promoted" for e, n, w, p in occupancy(trials, epochs)]
        rows.append(("rungs (ASHA)", "; ".join(rungs)))
    audit = audit_summary(trials)
    if audit is not None:
        rows.append(
            (
                "pruner audit",
                f"{audit['audited']} trials ran on past a stop; {audit['false_prunes']} "
                f"({audit['false_prune_rate']:.0%}) finished at or above the median of the trials it let run"
                + ("; one of them is the best" if audit["best_was_audited"] else ""),
            )
        )
    return rows


def status_lines(study: optuna.Study, config: StudyConfig) -> list[str]:
    """What ``sft-optuna status`` prints (and ``run`` after its work)."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    lines = [
        f"study {config.name!r}: sampler {config.sampler.name}, pruner {config.pruner.name}",
        f"trials: budget {budget_used(trials)}/{config.budget.n_trials} used; "
        + ", ".join(f"{s.name} {states.get(s.name, 0)}" for s in TrialState),
    ]
    lines += [f"{label}: {text}" for label, text in progress(trials, config)]
    retried = sorted({attrs.lineage(t) for t in trials if attrs.RETRY_OF in t.user_attrs})
    if retried:
        wrong = wrong_verdicts(study)
        attempts = Counter(attrs.lineage(t) for t in trials if attrs.RETRY_OF in t.user_attrs)
        lines.append(
            f"retries (max_retries {config.budget.max_retries} failures per lineage; stops, outages and wrong "
            "verdicts not counted): "
            + ", ".join(f"lineage {n}: {attempts[n]} retried, {retries_used(trials, n, wrong)} used" for n in retried)
        )
    warm = [t for t in trials if attrs.WARM_START in t.user_attrs]
    if warm:
        lines.append(
            "warm start: "
            + ", ".join(f"trial {t.number} runs {t.user_attrs[attrs.WARM_START]} ({t.state.name})" for t in warm)
        )
    try:
        best = study.best_trial
        lines.append(f"best: trial {best.number} value {best.value:.4f} params {json.dumps(best.params)}")
    except ValueError:
        pass  # no completed trial yet
    now = time.time()
    for t in trials:
        if t.state == TrialState.RUNNING:
            history = t.user_attrs.get(attrs.HISTORY) or [{}]
            last = history[-1]
            silent = now - last_beat(t)
            # A dead worker's trial stays RUNNING until a live worker fails it: say so, not "running".
            gone = (
                f" - no heartbeat for {silent:.0f} s: its worker looks gone; a worker of this study will retry it"
                if silent > config.heartbeat.grace_period
                else ""
            )
            epochs = t.params.get("epochs", config.train.epochs)
            progress_text = (
                f"epoch {last['epoch']}/{epochs} val_acc {last['val_acc']:.4f}"
                if "epoch" in last and "val_acc" in last
                else f"starting (0/{epochs} epochs)"
            )
            lines.append(f"running: trial {t.number} {progress_text} on {t.user_attrs.get(attrs.HOST, '?')}{gone}")
    retrain = study.user_attrs.get(attrs.RETRAIN)
    if retrain:
        lines.append(
            f"retrain: test accuracy {retrain['test_acc_mean']:.4f} ± {retrain['test_acc_std']:.4f} "
            f"over {len(retrain['test_acc'])} seeds"
        )
    return lines
