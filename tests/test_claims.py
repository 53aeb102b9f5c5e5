"""Lock-free claims on every storage: workers claiming at the same instant never share a trial, the budget is
exact, and a worker holds one PostgreSQL connection (the proxy a fixed pool)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import PROXIES, spawn_script, spawn_worker, study_dict
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.coordination.claims import QUEUE_CHUNK, budget_used
from sft_optuna.coordination.storage import open_storage

pytestmark = pytest.mark.slow

CLAIMER = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from sft_optuna.coordination.claims import claim_trial
from sft_optuna.coordination.storage import open_storage
from sft_optuna.study import load_study
storage = open_storage(sys.argv[1])
study, config = load_study("t", storage)
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
got = []
while (trial := claim_trial(study, config)) is not None:
    got.append(trial.number)
    study.tell(trial, 0.5)
print(json.dumps(got))
"""


def test_workers_claiming_at_the_same_instant_never_share_a_trial(
    folder_root: Path, write_study: Callable[..., Path], storage_url: str
) -> None:
    n_trials, n_procs = 2 * QUEUE_CHUNK + 22, 6  # three chunks: the third is queued by a claim
    cfg = study_dict(folder_root, budget={"n_trials": n_trials})
    assert main(["--storage", storage_url, "create", str(write_study(cfg))]) == 0
    start = time.time() + 8  # every process open and waiting by then; then all claim at once
    procs = [spawn_script(CLAIMER, storage_url, str(start)) for _ in range(n_procs)]
    claimed: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        claimed += json.loads(out.splitlines()[-1])
    twice = [n for n, c in Counter(claimed).items() if c > 1]
    assert not twice, f"trials claimed by two workers: {twice}"
    trials = optuna.load_study(study_name="t", storage=open_storage(storage_url).optuna).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[attrs.SLOT] for t in done) == list(range(n_trials)), "each slot run once"
    assert budget_used(trials) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len(trials) == n_trials, "no trial besides the budget's: nothing dropped, nothing fresh"


def _connections(url: str) -> int:
    db = sqlalchemy.make_url(url).database
    engine = sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        n = conn.execute(sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": db})
        return int(n.scalar_one())


@pytest.mark.parametrize("via", ["postgresql", "grpc"])
def test_a_worker_holds_one_postgresql_connection_and_the_proxy_a_fixed_pool(
    folder_root: Path, write_study: Callable[..., Path], tmp_path: Path, via: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("grpc_url" if via == "grpc" else "postgres_url"))
    db_url = PROXIES[url][1] if via == "grpc" else url
    n_workers = 3
    cfg = study_dict(
        folder_root,
        budget={"n_trials": 2 * n_workers},
        train={"epochs": 4},
        heartbeat={"interval": 0.2, "grace_period": 30},  # beats and the watcher busy all the time
    )
    assert main(["--storage", url, "create", str(write_study(cfg))]) == 0
    study = optuna.load_study(study_name="t", storage=open_storage(url).optuna)
    study.get_trials()
    own = _connections(db_url)  # this test's (and, through the proxy, the proxy's so far)
    workers = [spawn_worker(url, "t", tmp_path / "ck") for _ in range(n_workers)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [t for t in study.get_trials() if t.state == TrialState.RUNNING and t.intermediate_values]
        if len(running) == n_workers:
            break
        time.sleep(0.2)
    counts = []
    for _ in range(20):  # while all of them train, beat and watch
        counts.append(_connections(db_url))
        time.sleep(0.1)
    for p in workers:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:]
    if via == "grpc":  # the proxy fixture serves with 8 threads: its pool, whatever the workers
        assert max(counts) <= 8, f"connections in use while {n_workers} workers ran: {counts}"
    else:  # one per worker, besides this test's own
        assert max(counts) - own <= n_workers, f"{own} of ours, in use while {n_workers} workers ran: {counts}"
    assert min(counts) >= 1
