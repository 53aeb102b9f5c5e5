"""Reading trials, side by side: Optuna's ORM (``RDBStorage``) and sft-optuna's plain-SQL reads (``FastReads``).

A study of ``--finished`` finished trials (4 parameters, 15 intermediate values, a 15-epoch learning curve
attribute each) and ``--running`` running ones (7 epochs so far) on each SQL storage. Timed, best of
``--repeat`` after a warm-up, one process:

- ``unfinished``: what Optuna's cache re-reads on every ``get_all_trials`` (every claim, every refresh of the
  pruner's view): the running trials, and any trial newer than the last finished one;
- ``get_trial``: one running trial (``Trial()`` at every claim, ``study.tell``, error paths);
- ``all``: the whole study (a worker opening the study, ``sft-optuna status``, the dashboard).

    python benchmarks/reads.py --json benchmarks/results/reads.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from sft_optuna.coordination.fast_reads import FastReads

PG = os.environ.get("SFT_TEST_POSTGRES", "postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test")
DISTS = {
    "lr": FloatDistribution(1e-4, 0.3, log=True),
    "batch_size": CategoricalDistribution([64, 128, 256]),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "momentum": FloatDistribution(0.8, 0.99),
}
PARAMS = {"lr": 0.01, "batch_size": 128, "weight_decay": 1e-4, "momentum": 0.9}


def _history(epochs: int) -> list[dict[str, float]]:
    return [
        {"epoch": e, "train_loss": 1.0 / e, "val_acc": 0.5, "lr": 0.01, "seconds": 60.0} for e in range(1, epochs + 1)
    ]


def build(rdb: optuna.storages.RDBStorage, finished: int, running: int) -> tuple[int, set[int], int]:
    """The study; its id, its running trials' ids, and the id of its last finished trial."""
    study = optuna.create_study(storage=rdb, study_name=uuid.uuid4().hex, direction="maximize")
    curve = {s: 0.05 * s for s in range(1, 16)}
    template = create_trial(
        params=PARAMS,
        distributions=DISTS,
        value=0.7,
        intermediate_values=curve,
        user_attrs={"history": _history(15), "slot": 0},
    )
    study.add_trials([template] * finished)
    ids = set()
    for _ in range(running):
        trial = study.ask(DISTS)
        for step in range(1, 8):
            trial.report(0.05 * step, step)
        trial.set_user_attr("history", _history(7))
        ids.add(trial._trial_id)
    last = max(t._trial_id for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    return study._study_id, ids, last


def best_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def measure(url: str, finished: int, running: int, repeat: int) -> list[dict[str, Any]]:
    rdb = optuna.storages.RDBStorage(url)  # Optuna's own class: its methods are the "optuna" column
    fast = FastReads.for_storage(rdb, rdb.get_current_version())
    assert fast is not None, "FastReads does not apply to this schema version"
    sid, ids, last = build(rdb, finished, running)
    one = min(ids)
    orm = optuna.storages.RDBStorage
    rows = []
    for what, optunas, ours, n in [
        (
            "unfinished",
            lambda: orm._get_trials(rdb, sid, None, ids, last),
            lambda: fast.trials(sid, None, ids, last),
            running,
        ),
        ("get_trial", lambda: orm.get_trial(rdb, one), lambda: fast.trial(one), 1),
        (
            "all",
            lambda: orm._get_trials(rdb, sid, None, set(), -1),
            lambda: fast.trials(sid, None, set(), -1),
            finished + running,
        ),
    ]:
        if ours() != optunas():  # a faster read of something else is no figure
            raise SystemExit(f"reads.py: {what}: FastReads and Optuna's ORM read different trials")
        reps = repeat if n < 1000 else max(3, repeat // 10)
        a, b = best_ms(optunas, reps), best_ms(ours, reps)
        rows.append({"read": what, "trials": n, "optuna_ms": a, "sft_optuna_ms": b, "speedup": round(a / b, 1)})
    rdb.engine.dispose()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storages", default="sqlite,postgresql")
    p.add_argument("--finished", type=int, default=2000)
    p.add_argument("--running", default="8,64,256", help="running trials, one study per figure")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = []
    print(f"{'storage':10} {'running':>7} {'read':10} {'trials':>6} {'optuna ms':>10} {'sft-optuna ms':>13} {'x':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.storages.split(","):
            for running in [int(x) for x in args.running.split(",")]:
                if kind == "sqlite":
                    url, cleanup = f"sqlite:///{Path(tmp) / uuid.uuid4().hex}.db", None
                else:
                    url, cleanup = _pg_database()
                try:
                    for row in measure(url, args.finished, running, args.repeat):
                        row = {"storage": kind, "running": running, **row}
                        out.append(row)
                        print(
                            f"{kind:10} {running:>7} {row['read']:10} {row['trials']:>6} {row['optuna_ms']:>10} "
                            f"{row['sft_optuna_ms']:>13} {row['speedup']:>5}",
                            flush=True,
                        )
                finally:
                    if cleanup:
                        cleanup()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": out, "finished": args.finished, "cpus": os.cpu_count()}, fh, indent=1)


def _pg_database() -> tuple[str, Callable[[], None]]:
    name = f"reads_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return PG.rsplit("/", 1)[0] + f"/{name}", drop


if __name__ == "__main__":
    main()
