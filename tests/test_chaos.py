"""Chaos: workers killed, frozen and cold-started on every storage; nothing is lost, nothing runs twice.

``SFT_CHAOS_ROUNDS`` sets the cold-start rounds (3 here; the issue's goal is 20, run by hand and recorded).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import PROXIES, PYTHON, explain, proxy_log, restart_proxy, spawn_worker, study_dict, worker_env
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.coordination.claims import budget_used
from sft_optuna.coordination.storage import open_storage

pytestmark = pytest.mark.slow

GRID = [0.02, 0.03, 0.04, 0.05, 0.06, 0.07]
EPOCHS = 4


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="chaos", storage=open_storage(url).optuna).get_trials()


def _pid(t: optuna.trial.FrozenTrial) -> int | None:
    host = t.user_attrs.get(attrs.HOST)
    return int(host.split()[0].rsplit(":", 1)[1]) if host else None


def _restart_postgres() -> bool:
    versions = sorted(os.listdir("/usr/lib/postgresql")) if os.path.isdir("/usr/lib/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        return False
    subprocess.run(["pg_ctlcluster", versions[-1], "main", "restart"], check=True, timeout=60)
    return True


def test_killed_and_frozen_workers_lose_nothing_and_retries_resume(
    folder_root: Path, write_study: Callable[..., Path], storage_url: str, tmp_path: Path
) -> None:
    url = storage_url
    cfg = study_dict(
        folder_root,
        name="chaos",
        sampler={"name": "grid"},
        budget={"n_trials": len(GRID), "max_retries": 3},
        search_space={"lr": {"type": "categorical", "choices": GRID}},
        train={"epochs": EPOCHS},
        heartbeat={"interval": 0.5, "grace_period": 4.0},
    )
    assert main(["--storage", url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    workers = [spawn_worker(url, "chaos", ckpt) for _ in range(3)]
    killed: dict[int, int] = {}  # trial number -> epochs reported when its worker was SIGKILLed
    frozen_done = restarted_db = restarted_proxy = False
    behind_db = url.startswith(("postgresql", "grpc"))  # through the proxy, PostgreSQL restarts behind it
    rng = random.Random(0)
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        time.sleep(0.5)
        trials = _trials(url)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if len(finished) >= len(GRID) and all(p.poll() is not None for p in workers):
            break
        if all(p.poll() is not None for p in workers):
            workers.append(spawn_worker(url, "chaos", ckpt))  # everyone gone but work left
        live = {p.pid: p for p in workers if p.poll() is None}
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and _pid(t) in live and 1 <= len(t.intermediate_values) < EPOCHS
        ]
        if url.startswith("grpc") and running and killed and not restarted_proxy:
            restart_proxy(url)  # the proxy goes away mid-study and comes back: workers retry through it
            restarted_proxy = True
        elif behind_db and running and killed and not restarted_db:
            restarted_db = _restart_postgres()  # a database restart mid-study: workers must ride it out
        elif running and len(killed) < 3:
            victim = rng.choice(running)
            live[_pid(victim)].send_signal(signal.SIGKILL)  # type: ignore[index]
            live[_pid(victim)].wait()  # type: ignore[index]
            killed[victim.number] = len(_trials(url)[victim.number].intermediate_values)
            workers.append(spawn_worker(url, "chaos", ckpt))
        elif running and not frozen_done and len(killed) >= 1:
            # Freeze a worker past the grace period: another worker retries its trial; when it wakes, it
            # must drop the stale trial and go on instead of crashing on "Cannot tell a FAIL trial".
            victim = rng.choice(running)
            proc = live[_pid(victim)]  # type: ignore[index]
            proc.send_signal(signal.SIGSTOP)
            time.sleep(4.0 + 2 * 0.5 + 3)
            proc.send_signal(signal.SIGCONT)
            frozen_done = True

    outputs = []
    for p in workers:
        out, _ = p.communicate(timeout=240)
        outputs.append((p.returncode, out))
    logs = {f"worker {i} (exit {code})": out for i, (code, out) in enumerate(outputs)}
    if url.startswith("grpc"):
        logs["proxy"] = proxy_log(PROXIES[url][0])
    why = explain(url, "chaos", logs)
    crashed = [out[-2500:] for code, out in outputs if code not in (0, -signal.SIGKILL)]
    assert not crashed, why

    trials = _trials(url)
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, why
    assert budget_used(trials) == len(GRID), why
    final = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.params["lr"] for t in final) == GRID, "every grid point finished exactly once\n" + why
    assert len(killed) == 3, "the chaos loop should have killed three workers mid-trial"
    for number, reported in killed.items():
        retries = [t for t in trials if t.user_attrs.get(attrs.RETRY_OF) == number]
        assert len(retries) == 1, f"trial {number} retried {len(retries)} times"
        retry = retries[0]
        assert retry.params == trials[number].params
        # The checkpoint is written right after the report, so a kill can fall between the two.
        assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] in (reported, reported - 1)
        if retry.state == TrialState.COMPLETE:
            assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    for t in final:
        assert t.value is not None and 0.0 <= t.value <= 1.0
    assert frozen_done
    if behind_db and os.geteuid() == 0 and shutil.which("pg_ctlcluster"):
        assert restarted_db
    assert restarted_proxy or not url.startswith("grpc")


def test_cold_start_of_eight_workers_on_an_empty_storage(
    folder_root: Path,
    write_study: Callable[..., Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    storage_url: str,
) -> None:
    rounds = int(os.environ.get("SFT_CHAOS_ROUNDS", "3"))
    study_file = write_study(study_dict(folder_root, name="chaos"))
    for r in range(rounds):
        url = storage_url if r == 0 else _fresh(request, tmp_path / f"round{r}", storage_url)
        procs = [
            subprocess.Popen(
                [PYTHON, "-m", "sft_optuna", "--storage", url, "create", str(study_file)],
                env=worker_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(8)
        ]
        outs = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "") for p in procs]
        assert all(code == 0 for code, _ in outs), [o[-1500:] for c, o in outs if c != 0]
        assert sum("created:" in o for _, o in outs) == 1, "exactly one worker creates the study"
        assert open_storage(url).study_names() == ["chaos"]


def _fresh(request: pytest.FixtureRequest, folder: Path, like: str) -> str:
    folder.mkdir()
    if like.startswith("sqlite"):
        return f"sqlite:///{folder / 'studies.db'}"
    if like.startswith("journal"):
        return f"journal://{folder / 'studies.log'}"
    import sqlalchemy

    engine = sqlalchemy.create_engine(PROXIES[like][1] if like.startswith("grpc") else like)
    with engine.connect() as conn:  # empty the database: drop every table
        conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        conn.commit()
    engine.dispose()
    if like.startswith("grpc"):
        restart_proxy(like)  # a new proxy on the emptied database (the old one cached its studies)
    return like


SPARE_CONNECTIONS = 2  # README: one per worker, and two more for a moment while a worker opens the storage


def test_workers_wait_for_scarce_database_connections_instead_of_dying(
    folder_root: Path, write_study: Callable[..., Path], postgres_url: str, tmp_path: Path
) -> None:
    """Plain Optuna lost 5 of 12 workers to too few connections; ours wait for one and go on."""
    import psycopg
    import sqlalchemy

    url, workers_n = postgres_url, 3
    cfg = study_dict(folder_root, name="scarce", budget={"n_trials": 4}, train={"epochs": 2})
    create = subprocess.run(
        [PYTHON, "-m", "sft_optuna", "--storage", url, "create", str(write_study(cfg))],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert create.returncode == 0, create.stderr[-2000:]
    db = sqlalchemy.make_url(url)
    dsn = db.set(drivername="postgresql").render_as_string(hide_password=False)

    def limit(n: int) -> None:  # the database's owner may cap its connections; the server stays as it is
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db.database}" CONNECTION LIMIT {n}')  # type: ignore[arg-type]

    limit(workers_n + SPARE_CONNECTIONS)
    hog = [psycopg.connect(dsn) for _ in range(workers_n + SPARE_CONNECTIONS)]  # every slot taken
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(dsn)
        workers = [spawn_worker(url, "scarce", tmp_path / "ck") for _ in range(workers_n)]
        time.sleep(8)  # the workers find no free connection for a while: they must wait, not exit
        assert [p.poll() for p in workers] == [None] * workers_n
    finally:
        for conn in hog:
            conn.close()
    outs = [(p.wait(timeout=300), p.stdout.read() if p.stdout else "") for p in workers]
    assert all(code == 0 for code, _ in outs), [o[-2000:] for c, o in outs if c != 0]
    assert any("too many connections" in o for _, o in outs), "the workers should have met the limit"
    limit(-1)
    trials = optuna.load_study(study_name="scarce", storage=open_storage(url).optuna).get_trials()
    assert budget_used(trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
