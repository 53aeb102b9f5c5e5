"""Storage outages with nothing killed: the proxy or PostgreSQL goes away and comes back while live workers train.

No death verdict without evidence, no retry used up by an outage, no storage error recorded as a trial's error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import (
    explain,
    free_port,
    proxy_log,
    spawn_worker,
    start_proxy,
    stop_proxy,
    study_dict,
    worker_env,
)
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.coordination.claims import recover_trials, retries_used, wrong_verdicts
from sft_optuna.coordination.heartbeat import BEAT_ATTR, StaleTrials
from sft_optuna.coordination.storage import open_storage
from sft_optuna.study import create_study

pytestmark = pytest.mark.slow

GRACE = 4.0


class Proxy:
    """``sft-optuna proxy`` on a fixed port in front of ``db``, stopped and started again at will."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.proc = start_proxy(db, self.port)
        self.logs: list[str] = []

    def stop(self) -> None:
        stop_proxy(self.proc)
        self.logs.append(proxy_log(self.proc))

    def start(self) -> None:
        self.proc = start_proxy(self.db, self.port)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.stop()
        return "\n".join(self.logs)


def _pg_cluster() -> list[str] | None:
    versions = sorted(os.listdir("/usr/lib/postgresql")) if os.path.isdir("/usr/lib/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        return None
    return ["pg_ctlcluster", versions[-1], "main"]


def _pg(action: str) -> None:
    cluster = _pg_cluster()
    assert cluster is not None
    subprocess.run([*cluster, action], check=True, timeout=120, capture_output=True)


def _grid_study(folder_root: Path, name: str, grid: list[float], epochs: int) -> dict[str, Any]:
    return study_dict(
        folder_root,
        name=name,
        sampler={"name": "grid"},
        budget={"n_trials": len(grid), "max_retries": 3},
        search_space={"lr": {"type": "categorical", "choices": grid}},
        train={"epochs": epochs},
        heartbeat={"interval": 0.5, "grace_period": GRACE},
    )


def test_a_watcher_whose_own_reads_failed_fails_no_one(tmp_path: Path, sqlite_url: str) -> None:
    """A beat that stood still across the watcher's own outage proves nothing; after the outage, a grace period
    of uninterrupted reads does."""
    proxy = Proxy(sqlite_url)
    try:
        config = parse_config(
            study_dict(tmp_path, budget={"n_trials": 1}, heartbeat={"interval": 0.5, "grace_period": 3})
        )
        storage = open_storage(proxy.url)
        study, _ = create_study(config, storage)
        trial = study.ask()
        trial.suggest_float("lr", 0.01, 0.1, log=True)
        study._storage.set_trial_system_attr(trial._trial_id, BEAT_ATTR, time.time())  # then its worker dies
        evidence = StaleTrials(config.heartbeat.grace_period, study._storage.health)
        recover_trials(study, config, evidence)  # the first look: the clock starts
        time.sleep(config.heartbeat.grace_period + 0.5)  # the beat stands still a whole grace period, but ...
        proxy.stop()
        restart = threading.Timer(2.0, proxy.start)
        restart.start()
        recover_trials(study, config, evidence)  # ... this read failed before it succeeded: no verdict
        restart.join()
        assert study._storage.health.failures > 0, "the watcher's read should have met the outage"
        assert study.get_trials()[0].state == TrialState.RUNNING, "failed on a clock an outage stopped"
        time.sleep(config.heartbeat.grace_period + 0.2)  # now a grace period of reads that all succeeded
        recover_trials(study, config, evidence)
        trials = study.get_trials()
        assert trials[0].state == TrialState.FAIL, "a worker that stopped beating must still be found"
        assert [t.user_attrs.get(attrs.RETRY_OF) for t in trials[1:]] == [0]
    finally:
        proxy.close()


def _run_with_outages(
    url: str,
    name: str,
    tmp_path: Path,
    workers_n: int,
    outages: int,
    down_s: float,
    stop: Callable[[], None],
    start: Callable[[], None],
    logs: Callable[[], str],
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Start the workers; ``outages`` times, once a running trial has reported an epoch since the last outage,
    take the storage away for ``down_s`` seconds; wait for every worker. Returns each worker's log."""
    env = worker_env(**(extra_env or {}))
    ckpt = tmp_path / "ck"
    procs = [spawn_worker(url, name, ckpt, env=env) for _ in range(workers_n)]
    outputs: dict[str, str] = {}
    done = 0
    reported_at_last = -1
    deadline = time.monotonic() + 480
    try:
        while done < outages and time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.3)
            trials = optuna.load_study(study_name=name, storage=open_storage(url, 5).optuna).get_trials()
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            reported = sum(len(t.intermediate_values) for t in trials)
            if running and reported > reported_at_last:
                stop()
                time.sleep(down_s)
                start()
                done += 1
                reported_at_last = sum(
                    len(t.intermediate_values)
                    for t in optuna.load_study(study_name=name, storage=open_storage(url, 60).optuna).get_trials()
                )
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 30))
            outputs[f"worker {i} (exit {p.returncode})"] = out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                outputs.setdefault(f"worker (killed at the end) {p.pid}", p.communicate()[0])
        outputs["storage"] = logs()
    assert done == outages, f"only {done} of {outages} outages fell while a trial ran\n" + explain(url, name, outputs)
    return outputs


def _assert_nothing_lost(url: str, name: str, grid: list[float], outputs: dict[str, str]) -> None:
    study = optuna.load_study(study_name=name, storage=open_storage(url, 30).optuna)
    trials = study.get_trials()
    why = explain(url, name, outputs)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(grid), why
    assert sorted(t.params["lr"] for t in trials) == grid, why
    assert all(retries_used(trials, attrs.lineage(t)) == 0 for t in trials), why
    assert not wrong_verdicts(study), "no live worker should have been called dead\n" + why
    assert all("exit 0" in who for who in outputs if who.startswith("worker")), why


GRID = [0.02, 0.04, 0.06]


def test_five_proxy_stops_with_nothing_killed_fail_no_trial_and_use_no_retry(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    proxy = Proxy(sqlite_url)
    cfg = _grid_study(folder_root, "outages", GRID, epochs=40)
    assert main(["--storage", proxy.url, "create", str(write_study(cfg))]) == 0
    outputs = _run_with_outages(proxy.url, "outages", tmp_path, 3, 5, 6.0, proxy.stop, proxy.start, proxy.close)
    proxy.start()
    try:
        _assert_nothing_lost(proxy.url, "outages", GRID, outputs)
    finally:
        proxy.close()


def test_postgresql_restarts_with_nothing_killed_fail_no_trial_and_use_no_retry(
    folder_root: Path, write_study: Callable[..., Path], postgres_url: str, tmp_path: Path
) -> None:
    if _pg_cluster() is None:
        pytest.skip("restarting PostgreSQL needs root and pg_ctlcluster")
    cfg = _grid_study(folder_root, "outages", GRID, epochs=40)
    assert main(["--storage", postgres_url, "create", str(write_study(cfg))]) == 0
    outputs = _run_with_outages(
        postgres_url, "outages", tmp_path, 3, 3, 6.0, lambda: _pg("stop"), lambda: _pg("start"), lambda: ""
    )
    _assert_nothing_lost(postgres_url, "outages", GRID, outputs)


WINDOW_S = 10.0  # $SFT_OPTUNA_OUTAGE_S for the long outages: the same code path as the default 60 s, sooner


@pytest.mark.parametrize("backend", ["grpc", "postgresql"])
def test_an_outage_past_the_window_is_not_the_trials_error_and_the_trial_resumes_from_its_checkpoint(
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    if backend == "grpc":
        proxy = Proxy(sqlite_url)
        url, stop, start, logs = proxy.url, proxy.stop, proxy.start, proxy.close
    else:
        if _pg_cluster() is None:
            pytest.skip("stopping PostgreSQL needs root and pg_ctlcluster")
        url = str(request.getfixturevalue("postgres_url"))
        stop, start, logs = (lambda: _pg("stop")), (lambda: _pg("start")), (lambda: "")
    grid = [0.05]
    cfg = _grid_study(folder_root, "long", grid, epochs=40)
    assert main(["--storage", url, "create", str(write_study(cfg))]) == 0
    env = {"SFT_OPTUNA_OUTAGE_S": str(WINDOW_S)}
    first = spawn_worker(url, "long", tmp_path / "ck", env=worker_env(**env))
    outputs: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.3)
            (t,) = optuna.load_study(study_name="long", storage=open_storage(url, 5).optuna).get_trials()
            if len(t.intermediate_values) >= 2:
                break
        stop()
        time.sleep(WINDOW_S * 1.5)  # past the outage window: the worker gives up on the storage
        start()
        out, _ = first.communicate(timeout=120)
        outputs["first worker"] = out
        assert first.returncode == 3, explain(url, "long", outputs)
        assert "Traceback" not in out, explain(url, "long", outputs)
        second = spawn_worker(url, "long", tmp_path / "ck", env=worker_env(**env))
        outputs["second worker"] = second.communicate(timeout=300)[0]
        assert second.returncode == 0, explain(url, "long", outputs)
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
        outputs["storage"] = logs()
        if backend == "grpc":
            proxy.start()
    study = optuna.load_study(study_name="long", storage=open_storage(url, 30).optuna)
    trials = study.get_trials()
    why = explain(url, "long", outputs)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[attrs.REASON] == attrs.OUTAGE, why
    assert not any(str(t.user_attrs.get(attrs.REASON, "")).startswith("error") for t in trials), why
    (retry,) = trials[1:]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[attrs.RETRY_OF] == 0, why
    assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] >= 2, "it resumes from its checkpoint\n" + why
    assert retries_used(trials, 0) == 0, "an outage uses up no retry\n" + why
    if backend == "grpc":
        proxy.close()


def test_an_idle_worker_whose_storage_stays_away_exits_3_with_one_line(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    """The claim and wait paths too: no traceback when back-to-back outages pass the window."""
    proxy = Proxy(sqlite_url)
    try:
        cfg = study_dict(folder_root, budget={"n_trials": 1}, heartbeat={"interval": 0.5, "grace_period": 30})
        assert main(["--storage", proxy.url, "create", str(write_study(cfg))]) == 0
        study = optuna.load_study(study_name="t", storage=open_storage(proxy.url).optuna)
        config = parse_config(cfg)
        from sft_optuna.coordination.claims import claim_trial

        assert claim_trial(study, config) is not None  # the budget's one trial runs "elsewhere"
        log = tmp_path / "idle.log"
        with log.open("w") as fh:
            idle = spawn_worker(proxy.url, "t", tmp_path / "ck", stdout=fh, env=worker_env(SFT_OPTUNA_OUTAGE_S="3"))
        deadline = time.monotonic() + 120
        while "waiting for running trial(s)" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proxy.stop()
        code = idle.wait(timeout=60)
        out = log.read_text()
        assert code == 3, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert sum(line.startswith("sft-optuna: error: storage") for line in out.splitlines()) == 1, out[-3000:]
    finally:
        proxy.close()
