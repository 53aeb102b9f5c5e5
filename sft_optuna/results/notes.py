"""optuna-dashboard notes: what a person opening a trial or the study in the dashboard should read."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, trial_config
from sft_optuna.errors import ConfigError
from sft_optuna.results.status import progress

__all__ = [
    "confusion_figure",
    "progress_figure",
    "study_note",
    "trial_note",
    "write_best_figure",
    "write_progress",
    "write_study_note",
    "write_trial_note",
]

log = logging.getLogger(__name__)

BEST_FIGURE_ID = "best-trial-confusion-matrix"
PROGRESS_FIGURE_ID = "study-progress"


def study_note(config: StudyConfig, study_file: str | None) -> str:
    """Markdown: where the study came from and its full config."""
    head = f"Created by sft-optuna from `{study_file}`." if study_file else "Created by sft-optuna."
    return f"{head}\n\n```json\n{json.dumps(config.to_dict(), indent=2)}\n```\n"


def trial_note(trial: FrozenTrial, config: StudyConfig) -> str:
    """Markdown: how the trial ended and why, where it ran, how fast, and its full training config."""
    history = trial.user_attrs.get(attrs.HISTORY) or []
    reason = trial.user_attrs.get(attrs.REASON) or ("completed" if trial.state == TrialState.COMPLETE else "")
    lines = [f"**{trial.state.name}**" + (f": {reason}" if reason else "")]
    if trial.value is not None:
        lines.append(f"value (validation accuracy, {config.objective} epoch): {trial.value:.4f}")
    if trial.user_attrs.get(attrs.RETRY_OF) is not None:
        lines.append(
            f"retry of trial {trial.user_attrs[attrs.RETRY_OF]}, resumed from epoch "
            f"{trial.user_attrs.get(attrs.RESUMED_FROM_EPOCH, 0)}"
        )
    lines.append(f"ran on: {trial.user_attrs.get(attrs.HOST, '?')}")
    if history:
        ips = [h["images_per_s"] for h in history]
        lines.append(
            f"epochs: {len(history)}; images/s: {min(ips):.0f}-{max(ips):.0f}; "
            f"peak memory {max(h['peak_memory_mb'] for h in history):.0f} MiB"
        )
    try:
        recipe = trial_config(config, trial.params)
        shown: dict[str, Any] = {"model": dataclasses.asdict(recipe.model), "train": dataclasses.asdict(recipe.train)}
    except ConfigError:
        shown = dict(trial.params)
    lines += ["", "```json", json.dumps(shown, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _safe(what: str, fn: Any) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a note is a courtesy: never fail a trial over it
        log.warning("cannot write %s: %s", what, exc)


def write_study_note(study: optuna.Study, config: StudyConfig, study_file: str | None) -> None:
    """Attach the study note (optuna-dashboard's Note panel)."""
    from optuna_dashboard import save_note

    _safe("study note", lambda: save_note(study, study_note(config, study_file)))


def write_trial_note(study: optuna.Study, trial: optuna.Trial, config: StudyConfig) -> None:
    """Attach a finished trial's note."""
    from optuna_dashboard import save_note

    _safe("trial note", lambda: save_note(trial, trial_note(study._storage.get_trial(trial._trial_id), config)))


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str) -> Any:
    """A plotly heatmap of a confusion matrix (rows: true class, columns: predicted)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=classes, y=classes, colorscale="Blues", text=matrix, texttemplate="%{text}"))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    return fig


def write_best_figure(study: optuna.Study, trial: FrozenTrial, classes: list[str]) -> None:
    """Show the best trial's validation confusion matrix in the study's note (replacing the previous best's)."""
    from optuna_dashboard import save_plotly_graph_object

    matrix = trial.user_attrs.get(attrs.CONFUSION)
    if matrix is None:
        return
    fig = confusion_figure(matrix, classes, f"best trial {trial.number}: validation confusion matrix")
    _safe("best-trial figure", lambda: save_plotly_graph_object(study, fig, graph_object_id=BEST_FIGURE_ID))


def progress_figure(rows: list[tuple[str, str]], finished: int) -> Any:
    """A small plotly table of the study's spending (epochs, rungs, audit). Kept under one storage attribute
    (~2 KB: no template), so that workers finishing trials at the same instant overwrite it whole, never mix
    two halves."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Table(
            header={"values": ["", f"after {finished} finished trials"]},
            cells={"values": [[label for label, _ in rows], [text for _, text in rows]], "align": "left"},
            columnwidth=[1, 5],
        )
    )
    fig.update_layout(template="none", title="study progress (sft-optuna)")
    return fig


def write_progress(study: optuna.Study, config: StudyConfig) -> None:
    """Show epochs used/left, rung occupancy and the pruner audit in the study's note (after each trial)."""
    from optuna_dashboard import save_plotly_graph_object

    def save() -> None:
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        fig = progress_figure(progress(trials, config), finished)
        save_plotly_graph_object(study, fig, graph_object_id=PROGRESS_FIGURE_ID)

    _safe("study progress", save)
