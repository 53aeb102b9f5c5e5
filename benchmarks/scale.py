"""Many workers on one study: claims/s, claim latency, per-epoch storage cost and database connections.

Simulated workers — processes, and threads inside them so that hundreds fit on a small machine, each with its
own storage client — run trials whose epochs *sleep* in place of GPU work, through the real code: sft-optuna's
lock-free ``claim_trial``, ``trial.report`` + the history attribute (the objective's ``HistoryWriter``) +
``should_prune`` (median pruner) per epoch, a heartbeat thread per running trial and a stale-trial watcher per
worker. Side by side with plain Optuna (``study.ask()`` with the same TPE sampler and median pruner, the budget
checked by counting trials before each ask, as ``MaxTrialsCallback`` does), against PostgreSQL directly and
through the gRPC proxy.

A row's study already holds ``trials - claims`` finished trials (full learning curves), so claims are made
against a study of the stated size; ``claims`` new trials are then claimed and run.

    python benchmarks/scale.py --json out.json                           # the table in docs/benchmarks.md
    python benchmarks/scale.py --workers 8 --trials 100 --storages postgresql --json quick.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from typing import Any, NamedTuple

import optuna
import sqlalchemy
from optuna.trial import TrialState, create_trial

PG = os.environ.get("SFT_TEST_POSTGRES", "postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test")
EPOCHS = 3  # per trial, by default: claims weigh more than in a real study (15 epochs); see --epochs
SPACE = {
    "lr": {"type": "float", "low": 1.0e-4, "high": 0.3, "log": True},
    "batch_size": {"type": "categorical", "choices": [64, 128, 256]},
    "weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99},
}
SAMPLER = {"name": "tpe", "seed": 0, "n_startup_trials": 10, "multivariate": True, "constant_liar": True}
MODELLED = {"name": "random", "seed": 0}  # with --sampler-ms: a random sampler that waits as long as TPE computes


class Load(NamedTuple):
    """What each simulated trial does: its epochs, what one sleeps, and the modelled sampler's wait (0: TPE)."""

    epoch_s: float
    epochs: int
    sampler_ms: float
    epoch_jitter: float = 0.0
    """Each epoch sleeps ``epoch_s`` times a uniform factor in [1 - jitter, 1 + jitter] (real epochs differ)."""


def study_config(name: str, claims: int, heartbeat_s: float, epochs: int, sampler_ms: float = 0.0) -> dict[str, Any]:
    return {
        "name": name,
        "sampler": MODELLED if sampler_ms else SAMPLER,
        "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
        "budget": {"n_trials": claims, "max_retries": 2},
        "heartbeat": {"interval": heartbeat_s, "grace_period": 24 * heartbeat_s},  # watchers every 60 s
        "data": {"dataset": "imagefolder", "root": "unused"},
        "train": {"epochs": epochs},
        "search_space": SPACE,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def fresh_database() -> str:
    name = f"scale_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    return PG.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    admin = sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{sqlalchemy.make_url(url).database}" WITH (FORCE)'))


def connections(url: str) -> tuple[int, int]:
    """Connections to the study's database, and how many of them wait for a lock (a row or advisory lock)."""
    engine = sqlalchemy.create_engine(PG, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        q = "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') FROM pg_stat_activity WHERE datname = :d"
        total, waiting = conn.execute(sqlalchemy.text(q), {"d": sqlalchemy.make_url(url).database}).one()
        return int(total), int(waiting)


def max_connections() -> int:
    engine = sqlalchemy.create_engine(PG, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        return int(conn.execute(sqlalchemy.text("SHOW max_connections")).scalar_one())


def start_proxy(db_url: str, threads: int, processes: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SFT_OPTUNA_STORAGE": db_url}  # never on the command line
    cmd = [sys.executable, "-m", "sft_optuna", "proxy", "--port", str(port), "--threads", str(threads)]
    cmd += ["--processes", str(processes)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"grpc://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("proxy did not start")


def prefill(url: str, name: str, n: int, claims: int, ours: bool, epochs: int, sampler_ms: float) -> None:
    """The study with ``n`` finished trials, then (ours) its budget of ``claims`` queued after them — as a study
    that has run ``n`` trials looks (sft-optuna's ``create_study`` would queue the budget before the prefill,
    leaving the oldest trials unfinished, which no long-running study has and which defeats TPE's incremental
    search space)."""
    from sft_optuna import attrs
    from sft_optuna.coordination.claims import queue_budget
    from sft_optuna.coordination.storage import open_storage
    from sft_optuna.study_file import parse_study

    storage = open_storage(url)
    study = optuna.create_study(storage=storage.optuna, study_name=name, direction="maximize")
    config = parse_study(study_config(name, claims, 5.0, epochs, sampler_ms))
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 0.3, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([64, 128, 256]),
        "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
        "momentum": optuna.distributions.FloatDistribution(0.8, 0.99),
    }
    rng = random.Random(0)
    trials = []
    for _ in range(n):
        params = {k: (rng.choice(d.choices) if hasattr(d, "choices") else _draw(rng, d)) for k, d in dists.items()}
        curve = {s: 0.1 + 0.2 * s * rng.random() for s in range(1, epochs + 1)}
        trials.append(
            create_trial(
                params=params,
                distributions=dists,
                value=curve[epochs],
                intermediate_values=curve,
                state=TrialState.COMPLETE,
                user_attrs={"prefill": True},
            )
        )
    study.add_trials(trials)
    if ours:
        study.set_user_attr(attrs.STUDY_CONFIG, config.to_dict())
        queue_budget(study, config)


def model_sampler_cost(ms: float) -> None:
    """Make every random sampler in this process wait ``ms`` per trial (once, where a sampler proposes the
    trial's relative parameters) without using the CPU: TPE's cost at a large study, as it is on a cluster,
    where each worker computes it on its own node. On this 2-core box the real TPE of 256 simulated workers
    shares two cores, and measures the box; a wait measures whether claims serialise (a study-wide lock held
    while the sampler runs would cap the study at 1000/ms claims per second whatever the number of workers)."""
    plain = optuna.samplers.RandomSampler.sample_relative

    def sample_relative(self: Any, study: Any, trial: Any, search_space: Any) -> Any:
        time.sleep(ms / 1000)
        return plain(self, study, trial, search_space)

    optuna.samplers.RandomSampler.sample_relative = sample_relative  # type: ignore[method-assign]


def _draw(rng: random.Random, d: Any) -> float:
    import math

    if d.log:
        return math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
    return rng.uniform(d.low, d.high)


def _worker_thread(
    url: str,
    name: str,
    ours: bool,
    budget: int,
    load: Load,
    gate: Any,
    out: dict[str, list[Any]],
) -> None:
    """One simulated worker: its own storage client; claims and runs trials until the budget is spent."""
    from sft_optuna.coordination.claims import claim_trial, more_to_claim, recover_trials
    from sft_optuna.coordination.heartbeat import Heartbeat, StaleTrials, Watcher, watch_interval
    from sft_optuna.coordination.storage import open_storage
    from sft_optuna.objective import HistoryWriter
    from sft_optuna.search.space import suggest
    from sft_optuna.study import load_study
    from sft_optuna.study_file import parse_study

    epoch_s, epochs, sampler_ms, jitter = load
    config = parse_study(study_config(name, budget, 5.0, epochs, sampler_ms))
    if ours:
        study, config = load_study(name, open_storage(url))
    else:
        study = optuna.load_study(
            study_name=name,
            storage=_plain_storage(url),
            sampler=optuna.samplers.RandomSampler(seed=0)
            if sampler_ms
            else optuna.samplers.TPESampler(n_startup_trials=10, multivariate=True, constant_liar=True),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        )
    study.get_trials(deepcopy=False)  # connected before the start, so the count below is the steady state
    out["ready"].append(time.time())
    with gate["ready"].get_lock():
        gate["ready"].value += 1
    while not gate["start"].value or time.time() < gate["start"].value:  # every worker waits for the last one
        time.sleep(0.005)
    current: set[int] = set()
    every = watch_interval(config.heartbeat.interval, config.heartbeat.grace_period)
    evidence = StaleTrials(config.heartbeat.grace_period, getattr(study._storage, "health", None))
    watcher = Watcher(every, lambda: recover_trials(study, config, evidence, set(current)), "watcher")
    with watcher if ours else _Null():
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            if ours:
                trial = claim_trial(study, config)
            else:
                # plain Optuna: count, then ask — N workers may all pass the count at once (overshoot)
                states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
                used = sum(not t.user_attrs.get("prefill") for t in study.get_trials(deepcopy=False, states=states))
                if used >= budget:
                    trial = None
                else:
                    trial = study.ask()
                    suggest(trial, config.search_space)
            if trial is None:
                # as a worker does: wait for the slots still to be queued, leave when nothing is left to claim
                if ours and more_to_claim(study.get_trials(deepcopy=False), config):
                    continue
                out["exits"].append(time.time())
                break
            out["claim_s"].append(time.perf_counter() - t0)
            out["claim_cpu_s"].append(time.thread_time() - c0)
            out["trials"].append(trial.number)
            out["claimed_at"].append(time.time())
            current.add(trial.number)
            state = TrialState.COMPLETE
            beat = Heartbeat(study._storage, trial._trial_id, config.heartbeat.interval) if ours else _Null()
            # ours: the objective's per-epoch calls (the curve written off the training loop); plain Optuna:
            # the same three calls in line, as an objective would make them
            history = HistoryWriter(trial) if ours else _Inline(trial)
            with beat, history:
                for epoch in range(1, epochs + 1):
                    time.sleep(epoch_s * random.uniform(1 - jitter, 1 + jitter))
                    t1 = time.perf_counter()
                    trial.report(random.random(), epoch)
                    t2 = time.perf_counter()
                    history.put([{"epoch": e, "val_acc": 0.5} for e in range(1, epoch + 1)])
                    t3 = time.perf_counter()
                    pruned = trial.should_prune()
                    t4 = time.perf_counter()
                    out["epoch_at"].append((time.time(), t4 - t1))  # when, how long: one append (threads share it)
                    out["epoch_parts_s"].append((t2 - t1, t3 - t2, t4 - t3))
                    if pruned:
                        state = TrialState.PRUNED
                        break
            if state == TrialState.COMPLETE:
                study.tell(trial, random.random())
            else:
                study.tell(trial, state=state)
            current.discard(trial.number)
            out["last_trial_end"].append(time.time())


def _plain_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("grpc://"):
        host, port = url.removeprefix("grpc://").rsplit(":", 1)
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    return optuna.storages.RDBStorage(url)


class _Inline:
    """The learning curve written on the training loop, each epoch."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def put(self, history: list[dict[str, Any]]) -> None:
        self.trial.set_user_attr("history", history)

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _process(url: str, name: str, ours: bool, budget: int, threads: int, load: Load, gate: Any, q: Any) -> None:
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if load.sampler_ms:
        model_sampler_cost(load.sampler_ms)
    out: dict[str, list[Any]] = {
        "claim_s": [],
        "claim_cpu_s": [],
        "epoch_parts_s": [],
        "trials": [],
        "claimed_at": [],
        "epoch_at": [],
        "errors": [],
        "ready": [],
        "last_trial_end": [],
        "exits": [],
    }

    def run() -> None:
        try:
            _worker_thread(url, name, ours, budget, load, gate, out)
        except Exception as exc:
            with gate["gone"].get_lock():
                gate["gone"].value += 1
            out["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out["end"] = [time.time()]
    out["start"] = [gate["start"].value]
    q.put(out)


def run_row(kind: str, workers: int, size: int, claims: int, load: Load, procs: int, ours: bool) -> dict[str, Any]:
    epochs = load.epochs
    name = "scale"
    db = fresh_database()
    proxy = None
    try:
        url = db
        if kind.startswith("grpc"):  # grpcN: the proxy with N processes
            proxy, url = start_proxy(db, 16, int(kind.removeprefix("grpc") or 1))
        ctx = mp.get_context("spawn")
        # in a process of its own: its connections go with it
        filler = ctx.Process(target=prefill, args=(url, name, size - claims, claims, ours, epochs, load.sampler_ms))
        filler.start()
        filler.join()
        q = ctx.Queue()
        n_procs = min(procs, workers)
        # All workers start at one instant, once every one of them has imported, opened its storage and read
        # the study (on 2 cores, opening 64 storages at once takes tens of seconds: a fixed delay started the
        # row with most workers still opening, and measured that instead of the claims).
        gate = {"ready": ctx.Value("i", 0), "gone": ctx.Value("i", 0), "start": ctx.Value("d", 0.0)}
        ps = [
            ctx.Process(
                target=_process,
                args=(url, name, ours, claims, workers // n_procs + (i < workers % n_procs), load, gate, q),
            )
            for i in range(n_procs)
        ]
        for p in ps:
            p.start()
        opening = time.time()
        while gate["ready"].value + gate["gone"].value < workers and time.time() < opening + 600:
            time.sleep(0.05)
        start_at = time.time() + 1.0
        gate["start"].value = start_at
        open_s = start_at - 1.0 - opening
        print(f"  {workers} workers ready after {open_s:.1f} s; claiming", file=sys.stderr, flush=True)
        conns: list[tuple[int, int]] = []
        results: list[dict[str, list[Any]]] = []
        while len(results) < n_procs:
            try:
                results.append(q.get(timeout=0.5))
            except Exception:
                if time.time() > start_at + 1:
                    conns.append(connections(db))
        for p in ps:
            p.join()
        claim_s = [x for r in results for x in r["claim_s"]]
        claim_cpu = [x for r in results for x in r["claim_cpu_s"]]
        epoch_s_all = [d for r in results for _, d in r["epoch_at"]]
        parts = list(zip(*[x for r in results for x in r["epoch_parts_s"]], strict=True)) or [(), (), ()]
        numbers = [x for r in results for x in r["trials"]]
        errors = [x for r in results for x in r["errors"]]
        wall = max(r["end"][0] for r in results) - start_at
        claimed_at = sorted(x for r in results for x in r["claimed_at"])
        last_claim = claimed_at[-1] if claimed_at else start_at
        cold_end = claimed_at[min(workers, len(claimed_at)) - 1] if claimed_at else start_at
        steady = [d for r in results for at, d in r["epoch_at"] if at > cold_end]
        from sft_optuna.coordination.claims import budget_used
        from sft_optuna.coordination.storage import open_storage

        trials = optuna.load_study(study_name=name, storage=open_storage(url).optuna).get_trials()
        new = [t for t in trials if not t.user_attrs.get("prefill")]
        if ours:
            used = budget_used(new)
            done = [t for t in new if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            slots = Counter(t.user_attrs["slot"] for t in done)
            duplicates = sum(c - 1 for c in slots.values()) + len(numbers) - len(set(numbers))
        else:
            used = len([t for t in new if t.state != TrialState.FAIL])
            duplicates = None
        return {
            "storage": kind,
            "method": "sft-optuna" if ours else "optuna",
            "workers": workers,
            "trials": size,
            "sampler": f"random, waits {load.sampler_ms:g} ms" if load.sampler_ms else "tpe",
            "epoch_jitter": load.epoch_jitter,
            "claims": len(claim_s),
            "claims_per_s": round(len(claim_s) / wall, 2),
            "claim_p50_ms": _pct(claim_s, 0.5),
            "claim_p95_ms": _pct(claim_s, 0.95),
            "claim_cpu_p50_ms": _pct(claim_cpu, 0.5),
            "epoch_p50_ms": _pct(epoch_s_all, 0.5),
            "epoch_p95_ms": _pct(epoch_s_all, 0.95),
            # the epoch's three parts: report, handing in the curve, should_prune (p50 of each)
            "epoch_parts_p50_ms": {
                k: _pct(list(v), 0.5) for k, v in zip(("report", "history", "prune"), parts, strict=True)
            },
            "epoch_parts_p95_ms": {
                k: _pct(list(v), 0.95) for k, v in zip(("report", "history", "prune"), parts, strict=True)
            },
            # the cold start: until every worker holds its first trial (all claim at the same instant); the
            # epochs after it are the steady state a running cluster sees
            "cold_start_s": round(cold_end - start_at, 1),
            "epoch_p50_ms_after_cold_start": _pct(steady, 0.5),
            "epoch_p95_ms_after_cold_start": _pct(steady, 0.95),
            "db_connections": max(c for c, _ in conns) if conns else None,
            "lock_waits_max": max(w for _, w in conns) if conns else None,
            "lock_wait_samples": f"{sum(w > 0 for _, w in conns)}/{len(conns)}",
            "overshoot": used - claims,
            "duplicates": duplicates,
            "left_running": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in new),
            "errors": errors[:3],
            "wall_s": round(wall, 1),
            "open_s": round(open_s, 1),  # launch to the last worker ready (imports, storage open, first read)
            # workers still opening their storage at the start instant (their claims start late), and when
            # the last trial ended (the rest of wall_s is workers finding the queue empty and exiting)
            "late_workers": sum(t > start_at for r in results for t in r["ready"]),
            "last_ready_s": round(max(t for r in results for t in r["ready"]) - start_at, 1),
            # workers that found no queued trial and left while trials were still being claimed (session 10
            # and the rows before session 11's lock-ceiling run: before the last trial *ended*, which also
            # counted workers leaving once every slot was taken)
            "early_exits": sum(t < last_claim - 1.0 for r in results for t in r["exits"]),
            "last_trial_end_s": round(
                max((t for r in results for t in r["last_trial_end"]), default=start_at) - start_at, 1
            ),
        }
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        drop_database(db)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storages", default="postgresql,grpc", help="postgresql, grpc, grpcN (a proxy of N processes)")
    p.add_argument("--workers", default="8,64,256")
    p.add_argument("--trials", default="100,2000")
    p.add_argument("--epoch-s", type=float, default=1.0, help="seconds an epoch sleeps")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per trial")
    p.add_argument(
        "--epoch-jitter",
        type=float,
        default=0.0,
        help="each epoch sleeps --epoch-s x U(1-J, 1+J): workers drift apart as real ones do (0: in lockstep)",
    )
    p.add_argument("--procs", type=int, default=8, help="processes the simulated workers are spread over")
    p.add_argument("--claims", type=int, default=0, help="trials claimed per row (default: max(64, workers))")
    p.add_argument(
        "--sampler-ms",
        type=float,
        default=0.0,
        help="a random sampler that waits this long per trial in place of TPE (TPE's cost on a worker's own CPU)",
    )
    p.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True, help="plain Optuna rows too")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not 0 <= args.epoch_jitter < 1:
        p.error(f"--epoch-jitter {args.epoch_jitter}: expected 0 <= J < 1")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    limit = max_connections()
    rows = []
    header = f"{'storage':10} {'method':10} {'workers':>7} {'trials':>6} {'claims/s':>8} {'claim p50/p95 ms':>17} "
    header += f"{'cpu ms':>6} {'epoch p50/p95 ms':>17} {'db conns':>8} {'lockw':>5} {'over':>4} {'dup':>4} {'left':>4}"
    print(header, flush=True)
    for size in [int(x) for x in args.trials.split(",")]:
        for workers in [int(x) for x in args.workers.split(",")]:
            claims = min(size, args.claims or max(64, workers))
            for kind in args.storages.split(","):
                for ours in (True, False) if args.plain else (True,):
                    if kind == "postgresql" and workers + 10 > limit:
                        rows.append(
                            {
                                "storage": kind,
                                "method": "sft-optuna" if ours else "optuna",
                                "workers": workers,
                                "trials": size,
                                "skipped": f"needs > {workers} connections; max_connections is {limit}",
                            }
                        )
                        print(
                            f"{kind:10} {rows[-1]['method']:10} {workers:>7} {size:>6} skipped: {rows[-1]['skipped']}",
                            flush=True,
                        )
                        continue
                    row = run_row(
                        kind,
                        workers,
                        size,
                        claims,
                        Load(args.epoch_s, args.epochs, args.sampler_ms, args.epoch_jitter),
                        args.procs,
                        ours,
                    )
                    rows.append(row)
                    print(
                        f"{kind:10} {row['method']:10} {workers:>7} {size:>6} {row['claims_per_s']:>8} "
                        f"{str(row['claim_p50_ms']) + ' / ' + str(row['claim_p95_ms']):>17} "
                        f"{row['claim_cpu_p50_ms']!s:>6} "
                        f"{str(row['epoch_p50_ms']) + ' / ' + str(row['epoch_p95_ms']):>17} "
                        f"{row['db_connections']!s:>8} {row['lock_waits_max']!s:>5} "
                        f"{row['overshoot']:>4} {row['duplicates']!s:>4} "
                        f"{row['left_running']:>4} {'; '.join(row['errors'])}",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as fh:
            meta = {
                "cpus": os.cpu_count(),
                "claims": args.claims or "max(64, workers)",
                "epochs": args.epochs,
                "epoch_s": args.epoch_s,
                "sampler_ms": args.sampler_ms,
                "epoch_jitter": args.epoch_jitter,
            }
            json.dump({"rows": rows, **meta}, fh, indent=1)


if __name__ == "__main__":
    main()
