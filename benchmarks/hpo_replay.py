"""Replay hyperparameter searches against recorded learning curves, in virtual time (#13).

K simulated asynchronous workers run studies through the project's real code — ``create_study`` (the budget
queued), ``claim_trial`` (claims, ASHA promotions, the epoch budget), the samplers and pruners of
``search/samplers.py`` — against a table of real learning curves (``benchmarks/curves/*.csv``, made by
``record_curves.py``). A trial's curve is that of the recorded configuration nearest to its parameters
(normalised: log scale for log-uniform ones, one-hot for categories), so samplers may propose any point;
``--neighbours k`` averages the k nearest, ``--smooth`` fits a kernel ridge regression over the whole table.
Epochs cost their recorded seconds of virtual time; nothing sleeps. Each epoch is an event, so a pruner sees
the other workers' reports exactly as far as they got at that virtual time.

The objective below follows the real one's decisions (``objective.py``): report each epoch, ASHA pauses at
rungs above the trial's ``from_rung``, the median/hyperband pruners stop via ``should_prune``, a promotion
re-reports the curve it continues.

    python benchmarks/hpo_replay.py --table benchmarks/curves/cifar10-2k.csv --seeds 20 --json replay.json
    python benchmarks/hpo_replay.py --table tiny.csv --seeds 2 --methods random+none,tpe+asha --workers 1,2
    python benchmarks/hpo_replay.py --table benchmarks/curves/cifar10-10k-gpu.csv \
        --warm-start-table benchmarks/curves/cifar10-2k.csv --methods tpe+asha3 --seeds 40
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import random
import re
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.coordination import claims
from sft_optuna.coordination.claims import claim_trial, epochs_used, study_done
from sft_optuna.coordination.retrying import RetryingStorage
from sft_optuna.coordination.storage import BACKENDS, Storage
from sft_optuna.errors import UserError
from sft_optuna.search.asha import pause_epochs
from sft_optuna.search.space import random_points
from sft_optuna.study import create_study
from sft_optuna.study_file import load_study_file, parse_study

SAMPLERS: dict[str, dict[str, Any]] = {
    "random": {"name": "random"},
    "tpe": {"name": "tpe", "n_startup_trials": 10, "multivariate": True},  # as the shipped TPE study samples
    "gp": {"name": "gp", "n_startup_trials": 10},
}
PRUNERS: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "median": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
    "hyperband": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
}
METHODS = [
    "random+none",
    "random+median",
    "tpe+none",
    "tpe+median",
    "tpe+hyperband",
    "tpe+asha",
    "tpe+asha3",
    "random+asha",
    "random+asha3",
    "gp+asha",
]
_ASHA = re.compile(r"asha(\d*)(?:x(\d+))?")


def parse_method(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A method's sampler and pruner: ``SAMPLER+PRUNER``, the pruner ``none``, ``median``, ``hyperband`` or
    ``asha[MIN][xETA]`` (ASHA with its first rung at epoch MIN, default 1, and reduction factor ETA, default 3:
    ``asha3`` pauses at epochs 3 and 9 of 12, ``asha3x2`` at 3 and 6).

    >>> parse_method("tpe+asha3x2")[1]
    {'name': 'asha', 'min_epochs': 3, 'reduction_factor': 2}
    """
    sampler, _, pruner = name.partition("+")
    asha = _ASHA.fullmatch(pruner)
    if sampler not in SAMPLERS or not (pruner in PRUNERS or asha):
        known = f"SAMPLER+PRUNER, SAMPLER one of {sorted(SAMPLERS)}, PRUNER one of {sorted(PRUNERS)} or asha[MIN][xETA]"
        raise SystemExit(f"error: unknown method {name!r} ({known})")
    if asha:
        rung = {"name": "asha", "min_epochs": int(asha[1] or 1), "reduction_factor": int(asha[2] or 3)}
        return SAMPLERS[sampler], rung
    return SAMPLERS[sampler], PRUNERS[pruner]


@dataclass
class Curve:
    params: dict[str, Any]
    values: list[float]  # validation accuracy after epochs 1..E (a diverged run: 0.1 from then on)
    seconds: list[float]


def load_table(path: Path, space: dict[str, Any]) -> list[Curve]:
    rows: dict[int, list[dict[str, str]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(int(row["config"]), []).append(row)
    curves = []
    for runs in rows.values():
        runs.sort(key=lambda r: int(r["epoch"]))
        params = {k: _cast(runs[0][k], spec) for k, spec in space.items() if k in runs[0]}
        ok = [r for r in runs if r["val_acc"] not in ("nan", "")]
        values = [float(r["val_acc"]) for r in ok]
        epochs = max(int(runs[-1]["epoch"]), len(values))
        while len(values) < epochs:  # diverged: chance level from then on
            values.append(0.1)
        # Every epoch of a configuration costs the same work; its median recorded time stands for each, since
        # an epoch during which the recorder was paused (SIGSTOP while a benchmark ran) recorded the pause too.
        pace = statistics.median([float(r["seconds"]) for r in runs]) if runs else 1.0
        secs = [pace] * epochs
        curves.append(Curve(params, values, secs))
    return curves


def _cast(text: str, spec: Any) -> Any:
    if spec.type == "categorical":
        for choice in spec.choices:
            if str(choice) == text:
                return choice
        return text
    return int(text) if spec.type == "int" else float(text)


def _coords(params: dict[str, Any], space: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for name, spec in space.items():
        value = params.get(name)
        if spec.type == "categorical":
            out += [1.0 if value == c else 0.0 for c in spec.choices]
        elif value is not None:
            lo, hi, v = float(spec.low), float(spec.high), float(value)
            if spec.log:
                lo, hi, v = math.log(lo), math.log(hi), math.log(v)
            out.append((v - lo) / (hi - lo) if hi > lo else 0.0)
    return out


class Surrogate:
    """The learning curve at a point of the search space: the recorded curve nearest to it (Euclidean,
    normalised coordinates), or with ``neighbours`` k > 1 the inverse-distance-weighted mean of the k nearest
    curves (a recorded point itself still gets its own curve) — smoother, so that a sampler proposing points
    near each other does not get one recorded curve over and over."""

    def __init__(self, curves: list[Curve], space: dict[str, Any], neighbours: int = 1) -> None:
        self.curves, self.space, self.k = curves, space, max(1, neighbours)
        self.points = [_coords(c.params, space) for c in curves]

    def nearest(self, params: dict[str, Any], k: int = 1) -> tuple[list[int], list[float]]:
        """The indices of the ``k`` recorded curves nearest to ``params``, nearest first, and every distance."""
        x = _coords(params, self.space)
        dist = [math.dist(x, p) for p in self.points]
        return sorted(range(len(self.points)), key=lambda i: dist[i])[:k], dist

    def __call__(self, params: dict[str, Any]) -> Curve:
        near, dist = self.nearest(params, self.k)
        if self.k == 1 or dist[near[0]] == 0.0:
            return self.curves[near[0]]
        weights = [1.0 / dist[i] for i in near]
        total = sum(weights)

        def mean(series: list[list[float]]) -> list[float]:
            return [sum(w * s[e] for w, s in zip(weights, series, strict=True)) / total for e in range(len(series[0]))]

        return Curve(
            dict(params),
            mean([self.curves[i].values for i in near]),
            mean([self.curves[i].seconds for i in near]),
        )


class SmoothSurrogate(Surrogate):
    """The learning curve at a point of the search space from kernel ridge regression over the whole table
    (a Gaussian kernel on the normalised coordinates, one fit per epoch; width and ridge chosen by exact
    leave-one-out error on the final accuracies). Where the nearest-curve surrogate is flat on each recorded
    point's cell, so that a sampler refining around its best gets the same curve again, this one varies
    smoothly and averages the recording's noise out (its best lies below the table's). Epochs cost what the
    nearest recorded curve's cost."""

    # Wider kernels with smaller ridges fit the 150-curve table's final accuracies a little better by
    # leave-one-out (RMSE 0.047 at width 5, ridge 1e-5, vs 0.050 at 2, 1e-3) but are ill-conditioned and
    # overshoot in the corners of the space; the grid stops where the fit is still stable.
    WIDTHS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0)
    RIDGES = (1e-3, 1e-2, 1e-1, 1.0)

    def __init__(self, curves: list[Curve], space: dict[str, Any]) -> None:
        import numpy as np

        super().__init__(curves, space)
        x = np.array(self.points)
        y = np.array([c.values for c in curves])
        self._x, self._mean = x, y.mean(axis=0)
        sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        final = y[:, -1] - self._mean[-1]
        best: tuple[float, float, float, Any] | None = None
        for width in self.WIDTHS:
            gram = np.exp(-sq / (2 * width**2))
            for ridge in self.RIDGES:
                hat = gram @ np.linalg.inv(gram + ridge * np.eye(len(x)))
                loo = float(np.mean(((final - hat @ final) / (1.0 - np.diag(hat))) ** 2))
                if best is None or loo < best[0]:
                    best = (loo, width, ridge, gram)
        assert best is not None
        loo, self.width, self.ridge, gram = best
        self.loo_rmse = math.sqrt(loo)
        self._alpha = np.linalg.solve(gram + self.ridge * np.eye(len(x)), y - self._mean)

    def __call__(self, params: dict[str, Any]) -> Curve:
        import numpy as np

        x = np.array(_coords(params, self.space))
        k = np.exp(-((self._x - x) ** 2).sum(-1) / (2 * self.width**2))
        values = np.clip(self._mean + k @ self._alpha, 0.0, 1.0)
        return Curve(dict(params), [float(v) for v in values], self.curves[self.nearest(params)[0][0]].seconds)


def surrogate_finals(surrogate: Surrogate, space: dict[str, Any], points: int = 5000) -> list[float]:
    """The final accuracies a search can find on the surrogate, at ``points`` random points of the space, sorted.
    Their most is the best a search can reach: with one neighbour the table's best wherever its cell is hit;
    with k > 1 the averaged curves stay below the best recorded one (only its exact point returns it), so a
    target taken from the table would be out of reach by construction."""
    # Not record_curves.py's seed (0): its draws are the table's own points, which a k > 1 surrogate returns
    # unaveraged.
    return sorted(surrogate(params).values[-1] for params in random_points(space, points, seed=1_000_003))


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (nearest rank)."""
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _memory_storage() -> Storage:
    """An in-memory Optuna storage behind the project's storage wrapper (one process: no lock needed)."""
    return Storage("memory://replay", BACKENDS["grpc"], RetryingStorage(optuna.storages.InMemoryStorage()))


PROPOSAL_WINDOWS = ((0, 10), (10, 30), (30, 60), (60, 100), (100, 200))
"""Ranges of new configurations, in the order a study proposed them, whose hits on the top target are counted."""


def replay(
    config_raw: dict[str, Any],
    surrogate: Surrogate,
    workers: int,
    top: float = math.inf,
    storage: Storage | None = None,
    warm_start: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """One study with ``workers`` asynchronous workers in virtual time; its anytime curve and counts, and per
    :data:`PROPOSAL_WINDOWS` how many of the new configurations it proposed there have a final accuracy at or
    above ``top`` (what the sampler learnt, whatever the pruner made of them). ``storage``: one that already
    holds the study ``warm_start`` names (``create --warm-start``), else a fresh in-memory one."""
    config = parse_study(config_raw)
    storage = storage if storage is not None else _memory_storage()
    study, _ = create_study(config, storage, warm_start=warm_start)
    events: list[tuple[float, int, int]] = [(0.0, w, 0) for w in range(workers)]  # (time, worker, seq)
    running: dict[int, dict[str, Any]] = {}  # worker -> state of its trial
    anytime: list[tuple[int, float]] = []  # (epochs trained so far, best final accuracy so far)
    best, seq, trained = 0.0, 0, 0
    while events:
        now, w, _ = heapq.heappop(events)
        state = running.get(w)
        if state is None:  # free: claim
            trial = claim_trial(study, config)
            if trial is None:
                if not study_done(study.get_trials(deepcopy=False), config) and any(running.values()):
                    seq += 1
                    heapq.heappush(events, (_next_time(events, now), w, seq))  # wait for the others
                continue
            curve = surrogate(trial.params)
            start = 0
            if attrs.PROMOTED_FROM in trial.user_attrs:  # continue the paused curve, as the objective does
                paused = study.get_trials(deepcopy=False)[int(trial.user_attrs[attrs.PROMOTED_FROM])]
                start = len(paused.intermediate_values)
                for e in range(1, start + 1):
                    trial.report(curve.values[e - 1], e)
            trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, start)
            pause_at = pause_epochs(config, int(trial.user_attrs.get(attrs.FROM_RUNG, -1)))
            running[w] = state = {"trial": trial, "curve": curve, "epoch": start, "pause_at": pause_at}
            seq += 1
            heapq.heappush(events, (now + curve.seconds[min(start, len(curve.seconds) - 1)], w, seq))
            continue
        trial, curve = state["trial"], state["curve"]
        state["epoch"] += 1
        trained += 1
        epoch = state["epoch"]
        value = curve.values[epoch - 1]
        trial.report(value, epoch)
        done_epochs = config.train.epochs
        outcome = None
        if epoch in state["pause_at"] and epoch < done_epochs:
            trial.set_user_attr(attrs.RUNG, state["pause_at"][epoch])
            trial.set_user_attr(attrs.REASON, f"paused at rung {state['pause_at'][epoch]}")
            outcome = TrialState.PRUNED
        elif trial.should_prune():
            outcome = TrialState.PRUNED
        elif epoch >= done_epochs:
            outcome = TrialState.COMPLETE
        if outcome is None:
            seq += 1
            heapq.heappush(events, (now + curve.seconds[epoch], w, seq))
            continue
        if outcome == TrialState.COMPLETE:
            study.tell(trial, value)
            best = max(best, value)
        else:
            study.tell(trial, state=TrialState.PRUNED)
        running[w] = None  # type: ignore[assignment]
        anytime.append((trained, best))  # epochs trained by all workers at this virtual instant
        seq += 1
        heapq.heappush(events, (now, w, seq))
    trials = study.get_trials(deepcopy=False)
    ran = [t for t in trials if t.state != TrialState.WAITING]  # not the budget's unclaimed queue
    proposed = [t for t in ran if attrs.lineage(t) == t.number]  # a lineage's first trial: a new configuration
    hits = [surrogate(t.params).values[-1] >= top for t in proposed]
    return {
        "anytime": anytime,
        "epochs": epochs_used(trials, config),
        "best": best,
        "trials": len(trials),
        "false_prunes": _false_prunes(trials, surrogate),
        # configurations the study tried, and how many recorded curves they fell nearest to: a sampler that
        # proposes points near its best gets the same few curves again on a surrogate over a finite table
        "configurations": len({attrs.lineage(t) for t in ran}),
        "distinct_curves": len({surrogate.nearest(t.params)[0][0] for t in ran}),
        "proposal_hits": [[sum(hits[a:b]), len(hits[a:b])] for a, b in PROPOSAL_WINDOWS],
    }


def _false_prunes(trials: list[optuna.trial.FrozenTrial], surrogate: Surrogate) -> tuple[int, int]:
    """(stopped lineages whose recorded final accuracy is at or above the median of the completed ones,
    stopped lineages): the replay knows every curve's end, so no audit is needed to count them."""
    completed = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    finished = {attrs.lineage(t) for t in trials if t.state == TrialState.COMPLETE}
    stopped = {attrs.lineage(t): t for t in trials if t.state == TrialState.PRUNED and attrs.lineage(t) not in finished}
    if not completed or not stopped:
        return 0, len(stopped)
    bar = statistics.median(completed)
    return sum(surrogate(t.params).values[-1] >= bar for t in stopped.values()), len(stopped)


def _next_time(events: list[tuple[float, int, int]], now: float) -> float:
    return min((t for t, _, _ in events if t > now), default=now + 1.0)


def best_at(anytime: list[tuple[int, float]], epochs: int) -> float:
    return max((b for e, b in anytime if e <= epochs), default=0.0)


def epochs_to(anytime: list[tuple[int, float]], target: float) -> int | None:
    return next((e for e, b in anytime if b >= target), None)


def reach(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Epochs to ``target`` over seeds: the median over every seed, a miss counting as beyond the horizon (None:
    half or more missed), and the mean and std of the seeds that reached it."""
    reached = [epochs_to(r["anytime"], target) for r in runs]
    hits = [e for e in reached if e is not None]
    median = statistics.median(sorted(e if e is not None else math.inf for e in reached))
    return {
        "mean": statistics.mean(hits) if hits else None,
        "std": statistics.pstdev(hits) if len(hits) > 1 else 0.0,
        "reached": f"{len(hits)}/{len(runs)}",
        "median": median if math.isfinite(median) else None,
    }


def anytime_band(runs: list[list[tuple[int, float]]], budget: int, points: int = 48) -> dict[str, list[Any]]:
    """The anytime curve over seeds: best final accuracy found by ``e`` epochs, mean and std, on a grid."""
    grid = sorted({round(budget * i / points) for i in range(points + 1)})
    values = [[best_at(run, e) for run in runs] for e in grid]
    return {
        "epochs": grid,
        "mean": [round(statistics.mean(v), 5) for v in values],
        "std": [round(statistics.pstdev(v), 5) for v in values],
    }


def plot(out: dict[str, Any], path: Path) -> None:
    """The anytime curves (mean ± std over seeds), one panel per number of workers, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(key.rsplit("K=", 1)[1]) for key in out["methods"]})
    fig, axes = plt.subplots(1, len(ks), figsize=(6.5 * len(ks), 4.5), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for key, m in out["methods"].items():
            if not key.endswith(f"K={k}"):
                continue
            band = m["anytime"]
            lo = [a - b for a, b in zip(band["mean"], band["std"], strict=True)]
            hi = [a + b for a, b in zip(band["mean"], band["std"], strict=True)]
            (line,) = ax.plot(band["epochs"], band["mean"], label=key.rsplit(" K=", 1)[0])
            ax.fill_between(band["epochs"], lo, hi, color=line.get_color(), alpha=0.12)
        ax.axhline(out["target"], color="grey", linestyle="--", linewidth=1, label="target (best − 0.5 pt)")
        ax.axhline(out["top_target"], color="grey", linestyle="-.", linewidth=1, label="top target")
        ax.axvline(out["budget_epochs"], color="grey", linestyle=":", linewidth=1, label="fixed budget")
        # where the methods differ: from a little below the worst mean at the fixed budget to the target
        low = min(m["best_at_budget"]["mean"] for m in out["methods"].values()) - 0.04
        ax.set_ylim(max(0.0, low), out["target"] + 0.02)
        ax.set_title(f"{k} worker{'s' if k > 1 else ''}, {out['configs']} recorded curves")
        ax.set_xlabel("epochs consumed")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best final validation accuracy found")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="benchmarks/curves/cifar10-2k.csv")
    p.add_argument("--study", default="studies/cifar10-resnet18-tpe.yaml", help="its search space is replayed")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", default="1,8")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--budget-epochs", type=int, default=None, help="default: 20 full trials' epochs")
    p.add_argument("--horizon-epochs", type=int, default=None, help="each study's epoch budget (default: 3x)")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--full-json", action="store_true", help="keep every seed's whole anytime curve in --json (megabytes)"
    )
    p.add_argument("--plot", default=None, help="PNG of the anytime curves")
    p.add_argument("--neighbours", type=int, default=1, help="curves averaged by the surrogate (1: the nearest)")
    p.add_argument("--smooth", action="store_true", help="a kernel ridge regression surrogate (not --neighbours)")
    p.add_argument(
        "--top-quantile",
        type=float,
        default=0.99,
        help="the second target: this quantile of the space's final accuracies (0.99: the top 1%%)",
    )
    p.add_argument(
        "--warm-start-table",
        default=None,
        help="measure create --warm-start instead: each seed first runs the method on this table (the last study), "
        "then the study on --table with and without its --warm-top best configurations",
    )
    p.add_argument("--warm-top", type=int, default=5, help="configurations a warm start carries over (default 5)")
    p.add_argument(
        "--warm-source-trials", type=int, default=20, help="the last study's epoch budget, in its trials (default 20)"
    )
    args = p.parse_args()
    methods = {name: parse_method(name) for name in args.methods.split(",")}  # a typo fails before any work
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # One process, one in-memory storage, one claim at a time: no other worker's promotion can be committing,
    # so a promotion need not wait for one (the real claim path waits 0.2 s of wall time, which virtual time
    # does not count but a replay of thousands of promotions would sleep through).
    claims.PROMOTION_SETTLE_S = 0.0
    base = load_study_file(args.study)
    space = base.search_space
    curves = _load(args.table, space)
    epochs = len(curves[0].values)
    surrogate = SmoothSurrogate(curves, space) if args.smooth else Surrogate(curves, space, args.neighbours)
    finals = surrogate_finals(surrogate, space)
    best = finals[-1]
    target = best - 0.005
    # The target is one recorded configuration's cell (with 1 neighbour): a lottery ticket more than
    # a measure of search. The second target asks for the top 1% of the space, which every method can reach.
    top = quantile(finals, args.top_quantile)
    budget = args.budget_epochs or 20 * epochs
    horizon = args.horizon_epochs or 3 * budget
    out: dict[str, Any] = {
        "table": args.table,
        "configs": len(curves),
        "table_best": max(c.values[-1] for c in curves),
        "surrogate_best": best,
        "target": target,
        "top_quantile": args.top_quantile,
        "top_target": top,
        "budget_epochs": budget,
        "horizon_epochs": horizon,
        "train_epochs": epochs,
        "neighbours": args.neighbours,
        "surrogate": "smooth" if args.smooth else "nearest",
    }
    if isinstance(surrogate, SmoothSurrogate):
        out["smooth_fit"] = {"width": surrogate.width, "ridge": surrogate.ridge, "loo_rmse": surrogate.loo_rmse}
        print(f"smooth surrogate: {out['smooth_fit']}", flush=True)
    print(
        f"{len(curves)} curves; target {target:.4f} (the surrogate's best − 0.5 pt), top target {top:.4f} (its "
        f"{args.top_quantile} quantile); budget {budget}, horizon {horizon} epochs",
        flush=True,
    )
    if args.warm_start_table:
        source = _load(args.warm_start_table, space)
        out["warm_start"] = warm_start_rows(args, base, methods, source, surrogate, top, budget, horizon, epochs)
        if args.json:
            Path(args.json).write_text(json.dumps(out))
        return
    out["methods"] = {}
    for method, (sampler, pruner) in methods.items():
        for k in (int(x) for x in args.workers.split(",")):
            runs = []
            for seed in range(args.seeds):
                raw = _study_raw(base, f"{method}-{k}-{seed}", sampler, pruner, seed, epochs, horizon)
                runs.append(replay(raw, surrogate, k, top))
            at_budget = [best_at(r["anytime"], budget) for r in runs]
            false, stopped = (sum(r["false_prunes"][i] for r in runs) for i in (0, 1))
            key = f"{method} K={k}"
            out["methods"][key] = {
                "epochs_to_target": reach(runs, target),
                "epochs_to_top": reach(runs, top),
                "best_at_budget": {"mean": statistics.mean(at_budget), "std": statistics.pstdev(at_budget)},
                "false_prune_rate": round(false / stopped, 4) if stopped else None,
                "configurations": statistics.mean(r["configurations"] for r in runs),
                "distinct_curves": statistics.mean(r["distinct_curves"] for r in runs),
                # the share of new configurations in the top 1%, by when they were proposed (0-10: the start-up),
                # and how many were proposed there over all seeds
                "proposals_in_top": {
                    f"{a}-{b}": round(sum(r["proposal_hits"][i][0] for r in runs) / n, 3)
                    for i, (a, b) in enumerate(PROPOSAL_WINDOWS)
                    if (n := sum(r["proposal_hits"][i][1] for r in runs))
                },
                "proposals_counted": sum(n for r in runs for _, n in r["proposal_hits"]),
                "anytime": anytime_band([r["anytime"] for r in runs], horizon),
                "anytime_runs": [r["anytime"] for r in runs],
            }
            m = out["methods"][key]
            t, u = m["epochs_to_target"], m["epochs_to_top"]
            print(
                f"{key:22} epochs to target {t['median']} ({t['reached']}), to top {u['median']} ({u['reached']}), "
                f"best at {budget} epochs {m['best_at_budget']['mean']:.4f} ± {m['best_at_budget']['std']:.4f}, "
                f"false-prune rate {m['false_prune_rate']}, {m['configurations']:.0f} configurations on "
                f"{m['distinct_curves']:.0f} recorded curves; new configurations in the top: "
                + ", ".join(f"{w} {share:.2f}" for w, share in m["proposals_in_top"].items()),
                flush=True,
            )
            if args.json:  # after every row: a long run (GP fits a model per claim) keeps what it has
                Path(args.json).write_text(json.dumps(out if args.full_json else compact(out)))
    _summary(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out if args.full_json else compact(out)))
    if args.plot:
        plot(out, Path(args.plot))


def compact(out: dict[str, Any]) -> dict[str, Any]:
    """``out`` without every seed's whole anytime curve (megabytes over 60 seeds): per seed, only the figures
    the summary reads — epochs to each target (None: not reached) and the best found at the fixed budget; the
    mean curve stays as its banded summary (``anytime``)."""
    slim = dict(out)
    slim["methods"] = {}
    for key, m in out.get("methods", {}).items():
        runs = m.get("anytime_runs")
        m = {k: v for k, v in m.items() if k != "anytime_runs"}
        if runs is not None:
            m["per_seed"] = {
                "epochs_to_target": [epochs_to(r, out["target"]) for r in runs],
                "epochs_to_top": [epochs_to(r, out["top_target"]) for r in runs],
                "best_at_budget": [round(best_at(r, out["budget_epochs"]), 5) for r in runs],
            }
        slim["methods"][key] = m
    return slim


def _load(table: str, space: dict[str, Any]) -> list[Curve]:
    """A table of learning curves, or one line naming it and what is wrong."""
    try:
        curves = load_table(Path(table), space)
    except OSError as exc:
        raise SystemExit(f"error: --table {table}: {exc.strerror or exc}") from None
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"error: --table {table}: not a table of learning curves ({exc!s})") from None
    if not curves:
        raise SystemExit(f"error: --table {table}: no learning curves in it")
    return curves


def _study_raw(
    base: Any, name: str, sampler: dict[str, Any], pruner: dict[str, Any], seed: int, epochs: int, horizon: int
) -> dict[str, Any]:
    """A replayed study's config: the base study's space, the method's sampler and pruner, ``epochs`` per trial and
    an epoch budget of ``horizon``."""
    raw = base.to_dict()
    raw.update(
        name=name,
        sampler={**sampler, "seed": seed},
        pruner=pruner,
        budget={"n_trials": 10 * horizon // epochs, "epochs": horizon, "max_retries": 0},
    )
    raw["train"] = {**raw["train"], "epochs": epochs}
    raw["model"] = {**raw["model"], "weights": "none"}
    return raw


def warm_start_rows(
    args: argparse.Namespace,
    base: Any,
    methods: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    source_curves: list[Curve],
    surrogate: Surrogate,
    top: float,
    budget: int,
    horizon: int,
    epochs: int,
) -> dict[str, Any]:
    """``create --warm-start`` measured: per method, K and seed, the last study runs on the source table (its
    own epochs per trial, an epoch budget of ``--warm-source-trials`` of its trials), then the new study on
    ``--table`` in the same storage with its ``--warm-top`` best configurations queued first, and without them
    (the same seed). The source study's epochs are not counted: it is the study already run. Epochs to the top
    target and the best found at the fixed budget, with and without, and their ratio's and difference's
    bootstrap intervals."""
    src_epochs = len(source_curves[0].values)
    source = (
        SmoothSurrogate(source_curves, base.search_space)
        if args.smooth
        else Surrogate(source_curves, base.search_space, args.neighbours)
    )
    rows: dict[str, Any] = {
        "source_table": args.warm_start_table,
        "top": args.warm_top,
        "source_trials": args.warm_source_trials,
        "rows": {},
    }
    for method, (sampler, pruner) in methods.items():
        for k in (int(x) for x in args.workers.split(",")):
            with_, without = [], []
            for seed in range(args.seeds):
                storage = _memory_storage()
                src_name = f"last-{method}-{k}-{seed}"
                replay(
                    _study_raw(base, src_name, sampler, pruner, seed, src_epochs, args.warm_source_trials * src_epochs),
                    source,
                    k,
                    storage=storage,
                )
                raw = _study_raw(base, f"{method}-{k}-{seed}", sampler, pruner, seed, epochs, horizon)
                with_.append(replay(raw, surrogate, k, top, storage=storage, warm_start=(src_name, args.warm_top)))
                without.append(replay(raw, surrogate, k, top))
            key = f"{method} K={k}"

            def per_seed(runs: list[dict[str, Any]]) -> list[float]:
                return [e if (e := epochs_to(r["anytime"], top)) is not None else math.inf for r in runs]

            ratio = ratio_interval(per_seed(with_), per_seed(without), horizon)
            diff = difference_interval(
                [best_at(r["anytime"], budget) for r in with_], [best_at(r["anytime"], budget) for r in without]
            )
            rows["rows"][key] = {
                "epochs_to_top": {"with": reach(with_, top), "without": reach(without, top)},
                "epochs_to_top_per_seed": {"with": per_seed(with_), "without": per_seed(without)},
                "ratio_with_over_without": ratio,
                "best_at_budget_difference": diff,
            }
            w, wo = reach(with_, top), reach(without, top)
            lo, hi = ("beyond" if v is None else v for v in ratio["interval"])
            print(
                f"{key:20} warm start ({args.warm_top} from {args.warm_start_table}): epochs to top {w['median']} "
                f"({w['reached']}) vs {wo['median']} ({wo['reached']}) without; ratio {_shown(ratio)} "
                f"({ratio['level']:.0%} bootstrap {lo}–{hi}); best at {budget} epochs {diff['difference']:+.4f} "
                f"({diff['interval'][0]:+.4f}–{diff['interval'][1]:+.4f})",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"warm_start": rows}))
    return rows


GOALS = {"asha_vs_median": 0.5, "k8_vs_k1": 1.25}
"""The issue's goals on the ratios of epochs to a target: TPE+asha's over TPE+median's, 8 workers' over 1's."""


def ratio_bounds(top: list[float], bottom: list[float], horizon: float) -> tuple[float, float]:
    """What the ratio of two medians of epochs to a target over seeds (a miss: ``math.inf``) can be: exact
    where both reach it; where a median is a miss, the target came later than the horizon, if ever, which
    bounds the ratio on one side: ``(0, top/horizon)`` or ``(horizon/bottom, inf)``; both misses: nan."""
    x, y = statistics.median(top), statistics.median(bottom)
    if math.isinf(x) and math.isinf(y):
        return math.nan, math.nan
    if math.isinf(y):
        return 0.0, x / horizon
    if math.isinf(x):
        return horizon / y, math.inf
    return x / y, x / y


def ratio_interval(
    top: list[float], bottom: list[float], horizon: float, draws: int = 2000, level: float = 0.9, seed: int = 0
) -> dict[str, Any]:
    """The ratio of two medians of epochs to a target over seeds (:func:`ratio_bounds`) and its bootstrap
    interval: each side's seeds resampled with replacement, ``draws`` times; the interval runs from the low
    quantile of the resamples' lower bounds to the high quantile of their upper bounds. Resamples where both
    medians are misses have no ratio; their share is reported.

    20 seeds decide few of the goals: a median of epochs to the top 1% moves by half when a few seeds miss.
    """
    rng = random.Random(seed)
    pairs = [
        ratio_bounds(rng.choices(top, k=len(top)), rng.choices(bottom, k=len(bottom)), horizon) for _ in range(draws)
    ]
    defined = [p for p in pairs if not math.isnan(p[0])]

    def rounded(v: float) -> float | None:
        return None if math.isnan(v) or math.isinf(v) else round(v, 3)

    def at(values: list[float], q: float) -> float | None:
        return rounded(quantile(sorted(values), q)) if values else None

    lo, hi = ratio_bounds(top, bottom, horizon)
    return {
        "ratio": rounded(lo) if lo == hi else None,
        "bounds": [rounded(lo), rounded(hi)],  # [x, x]: exact; [0, x]: at most x; [x, None]: at least x
        "interval": [at([p[0] for p in defined], (1 - level) / 2), at([p[1] for p in defined], (1 + level) / 2)],
        "level": level,
        "undefined_share": round(1 - len(defined) / draws, 3),
    }


def verdict(interval: dict[str, Any], goal: float) -> str:
    """``met`` when the whole interval is at or below ``goal``, ``not met`` when it is all above, else
    ``undecided`` (more seeds would tell)."""
    lo, hi = interval["interval"]
    if interval["undefined_share"] > 1 - interval["level"]:
        return "undecided"
    if hi is not None and hi <= goal:
        return "met"
    if lo is None or lo > goal:
        return "not met"
    return "undecided"


def difference_interval(
    top: list[float], bottom: list[float], draws: int = 2000, level: float = 0.9, seed: int = 0
) -> dict[str, Any]:
    """The difference of two means over seeds (``top`` − ``bottom``: bests found at the fixed budget), its
    bootstrap interval and a verdict on "top ≥ bottom": ``met`` (the interval at or above 0), ``not met``
    (below 0) or ``tie`` (it holds 0: no difference the seeds can tell)."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.mean(rng.choices(top, k=len(top))) - statistics.mean(rng.choices(bottom, k=len(bottom)))
        for _ in range(draws)
    )
    lo, hi = quantile(diffs, (1 - level) / 2), quantile(diffs, (1 + level) / 2)
    return {
        "difference": round(statistics.mean(top) - statistics.mean(bottom), 4),
        "interval": [round(lo, 4), round(hi, 4)],
        "level": level,
        "verdict": "met" if lo >= 0 else "not met" if hi < 0 else "tie",
    }


def critical_path_bound(one_worker: float, epochs: int, workers: int) -> float:
    """The least K-worker / 1-worker ratio of epochs to a target for a search that proposes its winner after
    the same results at any K: the winner's ``epochs`` run one after another while the other K − 1 workers
    keep training, ``(one_worker − epochs + K·epochs) / one_worker``. A 1-worker study that reaches the target
    early cannot be matched by 8 workers: 1.25 needs ``one_worker ≥ 4·7·epochs`` (560 epochs of 20-epoch
    trials). Below it, a K-worker study got lucky, or searched differently (8 random proposals at once)."""
    return round(1 + (workers - 1) * epochs / one_worker, 3)


def _shown(interval: dict[str, Any]) -> str:
    """A ratio as printed: exact, ``≤ x`` (the bottom side missed), ``≥ x`` (the top side missed) or ``–``."""
    lo, hi = interval["bounds"]
    if interval["ratio"] is not None:
        return str(interval["ratio"])
    if lo == 0.0 and hi is not None:
        return f"≤ {hi}"
    return f"≥ {lo}" if lo is not None else "–"


def _summary(out: dict[str, Any]) -> None:
    """The goals' ratios, where both sides were run, with bootstrap intervals and a verdict."""
    m = out["methods"]
    ks = sorted({key.rsplit("K=", 1)[1] for key in m})
    methods = sorted({key.rsplit(" K=", 1)[0] for key in m})
    variants = [method for method in methods if method.startswith("tpe+asha")]

    def per_seed(key: str, target: float) -> list[float]:
        return [e if (e := epochs_to(run, target)) is not None else math.inf for run in m[key]["anytime_runs"]]

    def add(name: str, top: str, bottom: str, which: str, goal: float | None) -> None:
        if top not in m or bottom not in m:
            return
        target = out["target"] if which == "epochs_to_target" else out["top_target"]
        interval = ratio_interval(per_seed(top, target), per_seed(bottom, target), out["horizon_epochs"])
        interval["goal"], interval["verdict"] = goal, "–" if goal is None else verdict(interval, goal)
        # the median over all seeds (a miss counts as beyond the horizon): the mean of the seeds that reached
        # the target alone favours a method that reaches it rarely but early
        base = m[bottom][which]["median"]
        if top.endswith("K=8") and bottom.endswith("K=1") and base and "train_epochs" in out:
            interval["critical_path_bound"] = critical_path_bound(base, out["train_epochs"], 8)
        out.setdefault("ratio_intervals", {})[name] = interval
        if interval["ratio"] is not None:  # both medians reached the target
            out.setdefault("ratios", {})[name] = interval["ratio"]

    def at_budget(key: str) -> list[float]:
        return [best_at(run, out["budget_epochs"]) for run in m[key]["anytime_runs"]]

    for k in ks:
        for variant in variants:
            if f"tpe+median K={k}" in m:
                name = f"{variant} − tpe+median best at {out['budget_epochs']} epochs, K={k}"
                interval = difference_interval(at_budget(f"{variant} K={k}"), at_budget(f"tpe+median K={k}"))
                out.setdefault("difference_intervals", {})[name] = interval
    for name, interval in out.get("difference_intervals", {}).items():
        lo, hi = interval["interval"]
        print(
            f"{name}: {interval['difference']:+.4f} ({interval['level']:.0%} bootstrap {lo:+.4f}–{hi:+.4f}; "
            f"goal ≥ 0: {interval['verdict']})",
            flush=True,
        )
    for which, label in (("epochs_to_target", "target"), ("epochs_to_top", "top")):
        for k in ks:
            for variant in variants:
                name = f"{variant} / tpe+median epochs to {label}, K={k}"
                add(name, f"{variant} K={k}", f"tpe+median K={k}", which, GOALS["asha_vs_median"])
        for method in methods:
            goal = GOALS["k8_vs_k1"] if "asha" in method else None  # the goal is ASHA's; the others for comparison
            add(f"{method} epochs to {label}, K=8 / K=1", f"{method} K=8", f"{method} K=1", which, goal)
    for name, interval in out.get("ratio_intervals", {}).items():
        lo, hi = ("beyond" if v is None else v for v in interval["interval"])
        print(
            f"{name}: {_shown(interval)} "
            f"({interval['level']:.0%} bootstrap {lo}–{hi}"
            + (f"; goal ≤ {interval['goal']}: {interval['verdict']}" if interval["goal"] is not None else "")
            + (f"; critical path ≥ {interval['critical_path_bound']}" if "critical_path_bound" in interval else "")
            + ")",
            flush=True,
        )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a bad --study: one line, as the CLI prints it
        raise SystemExit(f"error: {exc}") from None
