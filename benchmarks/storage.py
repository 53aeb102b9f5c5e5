"""Storage cost of a study, side by side: per-epoch report + median-pruner check, and trials/s.

For each storage (SQLite, journal file, PostgreSQL when reachable), each study size (finished trials already
in the study, each with a full learning curve) and each number of concurrent worker processes, workers run
trials whose epochs *sleep* in place of GPU work; each epoch is ``trial.report`` + ``trial.should_prune``
(the median pruner). Two variants side by side: ``optuna`` (Optuna's own storage and MedianPruner, as a plain
Optuna user has them) and ``sft-optuna`` (the storage wrapper and pruner the real workers use). One table.

    python benchmarks/storage.py                                   # all storages, 1/4/16/32 workers, 100/2000 trials
    python benchmarks/storage.py --storages sqlite --workers 1,4 --sizes 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sft_optuna.config import PrunerConfig
from sft_optuna.coordination.storage import open_storage
from sft_optuna.search.samplers import make_pruner

PG = os.environ.get("SFT_TEST_POSTGRES", "postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test")
EPOCHS = 10


def prefill(url: str, name: str, n: int) -> None:
    """A study holding ``n`` finished trials with ``EPOCHS`` intermediate values each."""
    storage = open_storage(url).optuna
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
    )
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    trials = [
        create_trial(
            params={"lr": 10 ** (-4 + 4 * (i % 97) / 97)},
            distributions=dist,
            value=0.5 + (i % 50) / 100,
            intermediate_values={s: 0.1 + s * 0.04 + (i % 13) / 100 for s in range(1, EPOCHS + 1)},
            state=TrialState.COMPLETE,
        )
        for i in range(n)
    ]
    study.add_trials(trials)


def pruner_for(variant: str) -> optuna.pruners.BasePruner:
    """Optuna's MedianPruner as is, or sft-optuna's (the same pruner reading completed trials via a cache)."""
    if variant == "optuna":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return make_pruner(PrunerConfig("median", {"n_startup_trials": 5, "n_warmup_steps": 1}))


def storage_for(variant: str, url: str) -> Any:
    """Plain Optuna's storage for ``url``, as an Optuna user would open it, or sft-optuna's (retries, one-statement
    writes)."""
    if variant != "optuna":
        return open_storage(url).optuna
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return optuna.storages.get_storage(url)


def worker(url: str, name: str, n_trials: int, epoch_s: float, variant: str, out: Any) -> None:
    study = optuna.load_study(study_name=name, storage=storage_for(variant, url), pruner=pruner_for(variant))
    costs = []
    for _ in range(n_trials):
        trial = study.ask({"lr": FloatDistribution(1e-4, 1.0, log=True)})
        value = 0.0
        for step in range(1, EPOCHS + 1):
            time.sleep(epoch_s)
            value = 0.5 + step * 0.045  # above the median curve: runs every epoch, the pruner still checks
            start = time.perf_counter()
            trial.report(value, step)
            pruned = trial.should_prune()
            costs.append(time.perf_counter() - start)
            if pruned:
                break
        study.tell(trial, value)
    out.put(costs)


def fresh_url(kind: str, tmp: Path) -> str | None:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex}.db'}"
    if kind == "journal":
        return f"journal://{tmp / f'{uuid.uuid4().hex}.log'}"
    name = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:
        print(f"postgresql: skipped ({str(exc).splitlines()[0]})")
        return None
    return PG.rsplit("/", 1)[0] + f"/{name}"


def run_case(url: str, name: str, workers: int, trials_per_worker: int, epoch_s: float, variant: str) -> dict[str, Any]:
    before = len(optuna.load_study(study_name=name, storage=open_storage(url).optuna).get_trials(deepcopy=False))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, name, trials_per_worker, epoch_s, variant, out)) for _ in range(workers)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    costs: list[float] = []
    for _ in procs:
        costs += out.get(timeout=1800)
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    costs.sort()
    return {
        "variant": variant,
        "trials_before": before,
        "workers": workers,
        "epoch_cost_ms_median": round(1000 * statistics.median(costs), 2),
        "epoch_cost_ms_p95": round(1000 * costs[int(0.95 * (len(costs) - 1))], 2),
        "trials_per_s": round(workers * trials_per_worker / wall, 2),
        "share_of_60s_trial_pct": round(100 * statistics.median(costs) * EPOCHS / 60, 4),
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['storage']:<11}{r['variant']:<11}{r['trials_before']:>7}{r['workers']:>8}"
        f"{r['epoch_cost_ms_median']:>10.2f}{r['epoch_cost_ms_p95']:>9.2f}{r['trials_per_s']:>10.2f}"
        f"{r['share_of_60s_trial_pct']:>16.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storages", default="sqlite,journal,postgresql")
    parser.add_argument("--workers", default="1,4,16,32")
    parser.add_argument("--sizes", default="100,2000", help="finished trials in the study before the run")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--epoch-seconds", type=float, default=0.2, help="sleep standing in for an epoch")
    parser.add_argument(
        "--variants", default="optuna,sft-optuna", help="optuna: Optuna's own storage and MedianPruner, as is"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.storages.split(","):
            for size in map(int, args.sizes.split(",")):
                # One prefilled study per storage and size serves every worker count and variant; the few
                # trials each case adds are counted in the next case's "trials" column.
                url = fresh_url(kind, Path(tmp))
                if url is None:
                    break
                name = f"bench-{size}"
                prefill(url, name, size)
                for w in map(int, args.workers.split(",")):
                    for variant in args.variants.split(","):
                        case = run_case(url, name, w, args.trials_per_worker, args.epoch_seconds, variant)
                        row = {"storage": kind, **case}
                        rows.append(row)
                        print(_line(row), flush=True)

    print(
        f"\n{'storage':<11}{'variant':<11}{'trials':>7}{'workers':>8}{'epoch ms':>10}{'p95 ms':>9}{'trials/s':>10}"
        f"{'% of 60s trial':>16}"
    )
    for r in rows:
        print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
