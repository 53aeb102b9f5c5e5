"""A finished (or running) study -> files a person can act on: trials.csv, best.yaml, figures.

Figures come from ``optuna.visualization``: interactive HTML (plotly) and PNG (its matplotlib twin, which
installs from PyPI without a browser, unlike kaleido).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, trial_config
from sft_optuna.errors import UserError

__all__ = ["FIGURES", "best_train_block", "best_trial", "check_output_dir", "export_study", "output_dir", "trial_rows"]

log = logging.getLogger(__name__)


def best_train_block(study: optuna.Study, config: StudyConfig) -> dict[str, Any]:
    """The study's fixed ``model`` and ``train`` values with the best trial's parameters laid over them (what a
    study file needs to train the recipe again)."""
    best = best_trial(study, config)
    recipe = trial_config(config, best.params)
    return {
        "model": dataclasses.asdict(recipe.model),
        "train": dataclasses.asdict(recipe.train),
        "trial": best.number,
        "value": best.value,
    }


def best_trial(study: optuna.Study, config: StudyConfig) -> optuna.trial.FrozenTrial:
    """The study's best trial; a one-line error when none has completed."""
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {config.name!r} has no completed trial yet") from None


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, each parameter, epochs run, seconds, reason it ended, and how it
    is chained (lineage, retry, retry_of, promoted_from, rung, resumed_from_epoch, audit_stopped_at): an ASHA
    chain or a retried lineage can be followed in the export."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({p for t in trials for p in t.params})
    rows = []
    for t in trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            **{f"param_{n}": t.params.get(n) for n in names},
            "epochs": len(t.intermediate_values),
            "seconds": round(seconds, 3) if seconds is not None else None,
            "reason": t.user_attrs.get(attrs.REASON, ""),
            "lineage": attrs.lineage(t),
            "retry": t.user_attrs.get(attrs.RETRY, 0),
            "retry_of": t.user_attrs.get(attrs.RETRY_OF, ""),
            "promoted_from": t.user_attrs.get(attrs.PROMOTED_FROM, ""),
            "rung": t.user_attrs.get(attrs.RUNG, ""),
            "resumed_from_epoch": t.user_attrs.get(attrs.RESUMED_FROM_EPOCH, ""),
            "audit_stopped_at": t.user_attrs.get(attrs.AUDITED, ""),
            "warm_start_from": t.user_attrs.get(attrs.WARM_START, ""),
        }
        rows.append(row)
    return rows


def _plotly(name: str) -> Callable[[optuna.Study], Any]:
    return getattr(optuna.visualization, name)  # type: ignore[no-any-return]


def _mpl(name: str) -> Callable[[optuna.Study], Any]:
    return getattr(optuna.visualization.matplotlib, name)  # type: ignore[no-any-return]


FIGURES = {
    # file stem -> optuna.visualization function name
    "optimization_history": "plot_optimization_history",
    "intermediate_values": "plot_intermediate_values",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
}


def check_output_dir(path: Path, option: str) -> Path:
    """One line naming ``path`` if it cannot become an output directory — without creating anything: a command
    that then finds nothing to write (no such study) leaves no empty directory behind."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {path}: cannot create the directory ({ancestor} is a file)")
    return path


def output_dir(path: Path, option: str) -> Path:
    """Create (if needed) and return an output directory; one line naming it if it cannot be one."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create the directory ({exc.strerror or exc})") from None
    return path


def export_study(study: optuna.Study, config: StudyConfig, out: Path, progress: bool = True) -> list[Path]:
    """Write trials.csv, best.yaml and every figure (HTML + PNG) under ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    out = output_dir(out, "--out")
    written: list[Path] = []
    rows = trial_rows(study)
    with (out / "trials.csv").open("w", newline="") as fh:
        fields = list(rows[0]) if rows else ["number", "state", "value", "epochs", "seconds", "reason", "retry_of"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    written.append(out / "trials.csv")
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return written  # no best recipe, and every figure would be empty
    block = best_train_block(study, config)
    text = f"# best trial {block['trial']} of study {config.name!r}: validation accuracy {block['value']:.4f}\n"
    recipe = {"model": block["model"], "train": block["train"]}
    (out / "best.yaml").write_text(text + yaml.safe_dump(recipe, sort_keys=False))
    written.append(out / "best.yaml")
    items = list(FIGURES.items())
    for stem, fn in tqdm(items, desc="figures", disable=not progress or len(rows) < 50, leave=False):
        try:
            fig = _plotly(fn)(study)
            # "directory": one plotly.min.js beside the pages, so they open offline and on air-gapped clusters
            fig.write_html(out / f"{stem}.html", include_plotlyjs="directory")
            written.append(out / f"{stem}.html")
            ax = _mpl(fn)(study)
            figure = ax.flatten()[0].figure if hasattr(ax, "flatten") else ax.figure
            figure.set_size_inches(10, 6)
            figure.savefig(out / f"{stem}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(out / f"{stem}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances need 2+ completed trials with varying params
            log.warning("figure %s skipped: %s", stem, exc)
    if (out / "plotly.min.js").is_file():
        written.append(out / "plotly.min.js")
    return written
