"""Soak: rounds of a grid study on every storage, under CPU load, with workers killed and frozen and the storage
taken away — and a count of what was lost.

Each round makes a fresh storage and a grid study (``--points`` learning rates, ``--epochs`` epochs each,
``max_retries`` 2, heartbeat 0.5 s / grace 4 s), starts ``--workers`` real worker processes and, while they
train, in a random order: SIGKILLs one worker that runs a trial (a replacement starts), freezes another one
past the grace period (SIGSTOP, then SIGCONT), and disrupts the storage — SQLite: an exclusive lock held past
the grace period; journal: the journal's lock file held past it; PostgreSQL: every connection of the study's
database terminated, and the server restarted (``pg_ctlcluster``, as root; else skipped and said); the proxy:
restarted, and PostgreSQL behind it restarted. ``--load`` busy loops (started and ended by this script) keep the
cores saturated throughout, as on a loaded CI box.

Per storage it prints: rounds, grid points lost (no COMPLETE/PRUNED trial), points run twice, trials left
RUNNING or WAITING, retries used beyond the deliberate kills (by outages or wrong verdicts: each kill of a
trial's worker may use one), budget exact (every round), worker exits other than 0 or a kill, events that
found no running trial to act on (a round too short for them), wall time. The
goal: 0 lost, 0 duplicated, 0 stuck, 0 retries used by outages.

    python benchmarks/soak.py                                 # 1 round per storage (what CI runs)
    python benchmarks/soak.py --rounds 20 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PG = os.environ.get("SFT_TEST_POSTGRES", "postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test")
STORAGES = ["sqlite", "journal", "postgresql", "grpc"]
GRACE = 4.0
INTERVAL = 0.5


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SFT_OPTUNA_STORAGE", None)
    return {**env, **extra}


def write_images(root: Path, n_train: int = 160, n_test: int = 40, classes: int = 4) -> Path:
    """``root/{train,test}/<class>/*.png``: a class is a colour plus noise (a few epochs learn it)."""
    from PIL import Image

    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]], dtype=np.float32)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        rng = np.random.default_rng(seed)
        y = np.arange(n) % classes
        x = palette[y][:, None, None, :] + rng.normal(0, 40, size=(n, 32, 32, 3))
        for i in range(n):
            d = root / split / f"class{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(x[i], 0, 255).astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


def study_file(folder: Path, data: Path, points: int, epochs: int) -> Path:
    grid = [round(0.02 + 0.01 * i, 3) for i in range(points)]
    cfg = {
        "name": "soak",
        "sampler": {"name": "grid"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": points, "max_retries": 2},
        "data": {"dataset": "imagefolder", "root": str(data), "val_size": 40, "image_size": 16},
        "model": {"weights": "none", "image_size": 16},
        "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 256},
        "heartbeat": {"interval": INTERVAL, "grace_period": GRACE},
        "search_space": {"lr": {"type": "categorical", "choices": grid}},
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pg_cluster() -> list[str] | None:
    versions = sorted(os.listdir("/usr/lib/postgresql")) if os.path.isdir("/usr/lib/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        return None
    return ["pg_ctlcluster", versions[-1], "main"]


def _pg_restart() -> None:
    cluster = _pg_cluster()
    if cluster is not None:
        subprocess.run([*cluster, "restart"], check=True, timeout=120, capture_output=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    def __init__(self, db: str) -> None:
        self.db, self.port = db, _free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sft_optuna", "proxy", "--port", str(self.port), "--threads", "8"],
            env=_env(SFT_OPTUNA_STORAGE=self.db),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("the proxy did not listen within 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class Backend:
    """A fresh storage for one round, and what disrupting it means."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder = kind, folder
        self.proxy: Proxy | None = None
        self.db: str | None = None
        if kind == "sqlite":
            self.url = f"sqlite:///{folder / 'soak.db'}"
        elif kind == "journal":
            self.url = f"journal://{folder / 'soak.log'}"
        else:
            self.db = _new_database()
            self.url = self.db
            if kind == "grpc":
                self.proxy = Proxy(self.db)
                self.url = self.proxy.url

    def disruptions(self) -> list[tuple[str, Callable[[], None]]]:
        hold = GRACE + 2
        if self.kind == "sqlite":
            return [("sqlite exclusive lock", lambda: _sqlite_lock(self.folder / "soak.db", hold))]
        if self.kind == "journal":
            return [("journal lock held", lambda: _journal_lock(self.folder / "soak.log", hold))]
        out = [("connections terminated", lambda: _terminate(self.db or ""))]
        if self.kind == "grpc":
            assert self.proxy is not None
            out.append(("proxy restart", self.proxy.restart))
        if _pg_cluster() is not None:
            out.append(("postgresql restart", _pg_restart))
        return out

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.db is not None:
            _drop_database(self.db)


def _admin() -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(PG, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _new_database() -> str:
    import sqlalchemy

    name = f"soak_{uuid.uuid4().hex[:10]}"
    engine = _admin()
    for attempt in range(60):  # the server may be restarting (this script's last round, or another's)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
            break
        except sqlalchemy.exc.OperationalError:
            if attempt == 59:
                raise
            time.sleep(1)
    engine.dispose()
    return PG.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(url: str) -> None:
    import sqlalchemy

    engine = _admin()
    for _ in range(30):  # right after a restart the server may still be starting
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
            break
        except Exception:
            time.sleep(1)
    engine.dispose()


def _terminate(url: str) -> None:
    import sqlalchemy

    engine = _admin()
    name = url.rsplit("/", 1)[1]
    with engine.connect() as conn:
        conn.execute(
            sqlalchemy.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name}
        )
    engine.dispose()


def _sqlite_lock(path: Path, hold: float) -> None:
    conn = sqlite3.connect(path, timeout=60)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(hold)
    conn.rollback()
    conn.close()


def _journal_lock(path: Path, hold: float) -> None:
    """Hold Optuna's journal lock (the ``.lock`` file JournalFileOpenLock creates) for ``hold`` seconds."""
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(path))
    while not lock.acquire():
        time.sleep(0.01)
    try:
        time.sleep(hold)
    finally:
        lock.release()


def _trials(storage: Any) -> list[Any]:
    import optuna

    return optuna.load_study(study_name="soak", storage=storage).get_trials()


def _pid(t: Any) -> int | None:
    host = t.user_attrs.get("host")
    return int(host.split()[0].rsplit(":", 1)[1]) if host else None


def run_round(kind: str, data: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from sft_optuna import attrs
    from sft_optuna.coordination.claims import budget_used, retries_used, wrong_verdicts
    from sft_optuna.coordination.storage import open_storage

    folder = Path(tempfile.mkdtemp(prefix=f"soak-{kind}-"))
    backend = Backend(kind, folder)
    start = time.monotonic()
    try:
        sf = study_file(folder, data, args.points, args.epochs)
        subprocess.run(
            [sys.executable, "-m", "sft_optuna", "--storage", backend.url, "create", str(sf)],
            env=_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        ckpt = folder / "ck"

        def spawn() -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-m", "sft_optuna", "--storage", backend.url, "worker", "soak"]
            cmd += ["--device", "cpu", "--checkpoint-dir", str(ckpt)]
            log = (folder / f"worker-{time.monotonic_ns()}.log").open("wb")
            return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)

        workers = [spawn() for _ in range(args.workers)]
        monitor = open_storage(backend.url).optuna  # one client for the round's looks
        events = ["kill", "freeze", *(name for name, _ in backend.disruptions())]
        rng.shuffle(events)
        actions = dict(backend.disruptions())
        done_events: list[str] = []
        kills = 0
        deadline = time.monotonic() + args.round_timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = _trials(monitor)
            except Exception:
                continue
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            if all(w.poll() is not None for w in workers):
                if len(finished) >= args.points or time.monotonic() > deadline - 30:
                    break
                workers.append(spawn())  # everyone gone but work left (a worker exits once the budget is spent)
                continue
            if not events:
                continue
            live = {w.pid: w for w in workers if w.poll() is None}
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING and _pid(t) in live and 1 <= len(t.intermediate_values) < args.epochs
            ]
            if not running:
                continue
            event = events.pop()
            victim = rng.choice(running)
            proc = live[_pid(victim)]  # type: ignore[index]
            if event == "kill":
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                workers.append(spawn())
            elif event == "freeze":
                proc.send_signal(signal.SIGSTOP)
                time.sleep(GRACE + 3)
                proc.send_signal(signal.SIGCONT)
            else:
                actions[event]()
            done_events.append(event)
        for w in workers:
            if w.poll() is None:
                try:
                    w.wait(timeout=max(deadline - time.monotonic(), 60))
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
        codes = [w.returncode for w in workers]
        study = optuna.load_study(study_name="soak", storage=open_storage(backend.url).optuna)
        trials = study.get_trials()
        wrong = wrong_verdicts(study)
        grid = study_file_grid(args.points)
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        per_point = {lr: sum(t.params.get("lr") == lr for t in done) for lr in grid}
        used = sum(retries_used(trials, lineage, wrong) for lineage in {attrs.lineage(t) for t in trials})
        return {
            "storage": kind,
            "events": done_events,
            "events_missed": events,
            "lost": sum(n == 0 for n in per_point.values()),
            "twice": sum(n > 1 for n in per_point.values()),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "kills": kills,
            "retries_used": used,
            "retries_by_outages": max(used - kills, 0),
            "wrong_verdicts": len(wrong),
            "budget_exact": budget_used(trials) == args.points,
            "bad_exits": [c for c in codes if c not in (0, -signal.SIGKILL)],
            "wall_s": round(time.monotonic() - start, 1),
            "logs": str(folder),
        }
    finally:
        backend.close()


def study_file_grid(points: int) -> list[float]:
    return [round(0.02 + 0.01 * i, 3) for i in range(points)]


def _pg_reachable() -> bool:
    try:
        engine = _admin()
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="rounds per storage (default 1: CI's time)")
    parser.add_argument("--storages", default=",".join(STORAGES), help=f"comma-separated, of {', '.join(STORAGES)}")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--points", type=int, default=4, help="grid points per round")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per trial (long enough for every event)")
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes started for the run")
    parser.add_argument("--round-timeout", type=float, default=420.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args(argv)
    kinds = [k for k in args.storages.split(",") if k]
    unknown = [k for k in kinds if k not in STORAGES]
    if unknown:
        print(f"soak: unknown storage {unknown[0]!r} (known: {', '.join(STORAGES)})", file=sys.stderr)
        return 2
    if any(k in ("postgresql", "grpc") for k in kinds) and not _pg_reachable():
        print(f"soak: no PostgreSQL at {PG.split('@')[-1]}: postgresql and grpc skipped", file=sys.stderr)
        kinds = [k for k in kinds if k not in ("postgresql", "grpc")]
    if _pg_cluster() is None:
        print("soak: not root or no pg_ctlcluster: PostgreSQL restarts skipped", file=sys.stderr)
    rng = random.Random(args.seed)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    rounds: list[dict[str, Any]] = []
    data = write_images(Path(tempfile.mkdtemp(prefix="soak-data-")))
    try:
        for kind in kinds:
            for r in range(args.rounds):
                result = run_round(kind, data, args, rng)
                rounds.append(result)
                print(
                    f"{kind} round {r + 1}/{args.rounds}: lost {result['lost']} twice {result['twice']} "
                    f"running {result['running']} waiting {result['waiting']} retries used {result['retries_used']} "
                    f"(kills {result['kills']}, wrong verdicts {result['wrong_verdicts']}) budget exact "
                    f"{result['budget_exact']} bad exits {result['bad_exits']} events {result['events']} "
                    f"{result['wall_s']} s",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
    finally:
        for b in busy:
            b.kill()
    header = f"{'storage':<11} {'rounds':>6} {'lost':>5} {'twice':>5} {'stuck':>5} {'by outages':>10} "
    header += f"{'wrong verdicts':>14} {'budget exact':>12} {'bad exits':>9} {'events missed':>13} {'wall s':>8}"
    print("\n" + header)
    for kind in kinds:
        rs = [r for r in rounds if r["storage"] == kind]
        print(
            f"{kind:<11} {len(rs):>6} {sum(r['lost'] for r in rs):>5} {sum(r['twice'] for r in rs):>5} "
            f"{sum(r['running'] + r['waiting'] for r in rs):>5} {sum(r['retries_by_outages'] for r in rs):>10} "
            f"{sum(r['wrong_verdicts'] for r in rs):>14} {'yes' if all(r['budget_exact'] for r in rs) else 'no':>12} "
            f"{sum(len(r['bad_exits']) for r in rs):>9} {sum(len(r['events_missed']) for r in rs):>13} "
            f"{sum(r['wall_s'] for r in rs):>8.0f}"
        )
    bad = any(r["lost"] or r["twice"] or r["running"] or r["waiting"] or r["retries_by_outages"] for r in rounds)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
