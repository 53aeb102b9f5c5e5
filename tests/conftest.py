"""Shared fixtures: tiny learnable datasets in both on-disk formats, study files, temporary storages."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

torch.set_num_threads(2)
SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]

# Ten well-separated colours: a class is its colour plus noise, so a few epochs learn it.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [128, 128, 0],
        [0, 0, 128],
    ],
    dtype=np.float32,
)


def make_images(n: int, num_classes: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable images (N x 3 x size x size uint8) with balanced labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    base = PALETTE[y][:, :, None, None]
    x = base + rng.normal(0, 40, size=(n, 3, size, size))
    # a bright square whose corner depends on the class: spatial structure too, not only colour
    for i, c in enumerate(y):
        r, q = divmod(int(c) % 4, 2)
        x[i, :, r * size // 2 : r * size // 2 + size // 4, q * size // 2 : q * size // 2 + size // 4] = 255
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_cifar10(root: Path, n_train: int = 500, n_test: int = 100, num_classes: int = 10) -> Path:
    """The official CIFAR-10 python layout (``root/cifar-10-batches-py``) with generated images."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    x, y = make_images(n_train, num_classes, seed=1)
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5), strict=True), start=1):
        with (base / f"data_batch_{i}").open("wb") as fh:
            pickle.dump({b"data": xs.reshape(len(xs), -1), b"labels": ys.tolist()}, fh)
    tx, ty = make_images(n_test, num_classes, seed=2)
    with (base / "test_batch").open("wb") as fh:
        pickle.dump({b"data": tx.reshape(len(tx), -1), b"labels": ty.tolist()}, fh)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (base / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": names[:num_classes]}, fh)
    return root


def write_imagefolder(
    root: Path, n_train: int = 200, n_test: int = 40, num_classes: int = 4, test_labels_shift: int = 0
) -> Path:
    """``root/{train,test}/<class>/*.png`` with generated images; ``test_labels_shift`` files test images
    under another class than their colour says (to prove which split a number came from)."""
    from PIL import Image

    for split, n, seed, shift in (("train", n_train, 1, 0), ("test", n_test, 2, test_labels_shift)):
        x, y = make_images(n, num_classes, seed)
        for i in range(n):
            cls = f"class{(int(y[i]) + shift) % num_classes}"
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].transpose(1, 2, 0)).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("folder"))


def study_dict(root: Path, name: str = "t", **sections: Any) -> dict[str, Any]:
    """A small, fast study on generated data (16 px images, 2 epochs); sections override keys."""
    cfg: dict[str, Any] = {
        "name": name,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 2},
        "data": {"dataset": "imagefolder", "root": str(root), "val_size": 40, "image_size": 16},
        "model": {"weights": "none", "image_size": 16},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "eval_batch_size": 256},
        "search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def write_study(tmp_path: Path) -> Callable[..., Path]:
    def _write(cfg: dict[str, Any], filename: str = "study.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return _write


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def worker_env(**extra: str) -> dict[str, str]:
    """Environment of a worker subprocess: one torch thread each (2-core CI), repo importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SFT_OPTUNA_STORAGE", None)
    return {**env, **extra}


PYTHON = sys.executable


def spawn_worker(
    url: str, name: str, ckpt: Path, *extra: str, stdout: Any = subprocess.PIPE, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``sft-optuna worker NAME`` as its own process on the CPU (one torch thread), output to ``stdout``."""
    cli = [PYTHON, "-m", "sft_optuna", "--storage", url, "worker", name]
    return subprocess.Popen(
        [*cli, "--device", "cpu", "--checkpoint-dir", str(ckpt), *extra],
        env=env or worker_env(),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


def spawn_script(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c CODE ARGS...`` as a worker-like process (one torch thread, repo importable), output piped."""
    return subprocess.Popen(
        [PYTHON, "-c", code, *args], env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_on_cpu(url: str, study_file: Path, checkpoint_dir: Path | str) -> list[str]:
    """argv of ``sft-optuna run STUDY_FILE`` on the CPU (``main(...)`` in-process)."""
    return ["--storage", url, "run", str(study_file), "--device", "cpu", "--checkpoint-dir", str(checkpoint_dir)]


PG_URL = os.environ.get("SFT_TEST_POSTGRES", "postgresql+psycopg://sft:sft@127.0.0.1:5432/sft_test")


def _pg_reachable() -> bool:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def need_postgres() -> None:
    """Skip without a PostgreSQL server, except under CI, where a missing server is a failure."""
    if not _pg_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PostgreSQL is not reachable at {PG_URL} (run tests/services.sh)")
        pytest.skip(f"no PostgreSQL at {PG_URL} (run tests/services.sh as root)")


def fresh_database(prefix: str = "sft") -> Any:
    """A context manager: a fresh, empty PostgreSQL database (its URL), dropped afterwards."""
    import contextlib
    import uuid

    import sqlalchemy

    @contextlib.contextmanager
    def database() -> Any:
        need_postgres()
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        try:
            yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return database()


@pytest.fixture
def postgres_url() -> Any:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with fresh_database() as url:
        yield url


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PROXY_LOGS: dict[int, Path] = {}
"""A proxy process's pid -> its log file."""


def proxy_log(proc: subprocess.Popen[str]) -> str:
    """What the proxy process ``proc`` has logged so far."""
    path = PROXY_LOGS.get(proc.pid)
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def start_proxy(url: str, port: int) -> subprocess.Popen[str]:
    """``sft-optuna proxy`` in front of ``url`` (given in the environment, never on the command line), ready."""
    import tempfile
    import time

    # Its log goes to a file, not a pipe: a pipe nobody reads fills up (an outage's warnings) and blocks the
    # proxy; a file can be read when a test fails (``proxy_log``).
    log = tempfile.NamedTemporaryFile(prefix=f"proxy-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [PYTHON, "-m", "sft_optuna", "proxy", "--port", str(port), "--threads", "8"],
        env=worker_env(SFT_OPTUNA_STORAGE=url),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.close()
    PROXY_LOGS[proc.pid] = Path(log.name)
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the proxy exited: {proxy_log(proc)[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the proxy did not start listening within 60 s")


def stop_proxy(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


PROXIES: dict[str, tuple[subprocess.Popen[str], str]] = {}
"""grpc:// URL -> (its proxy process, the database behind it), for tests that restart one."""


def restart_proxy(url: str) -> None:
    """Stop the proxy serving ``url`` and start a new one on the same port (a redeploy, a crash)."""
    proc, db = PROXIES[url]
    stop_proxy(proc)
    PROXIES[url] = (start_proxy(db, int(url.rsplit(":", 1)[1])), db)


@pytest.fixture
def grpc_url(postgres_url: str) -> Any:
    """Optuna's gRPC proxy (``sft-optuna proxy``) in front of a fresh PostgreSQL database."""
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    PROXIES[url] = (start_proxy(postgres_url, port), postgres_url)
    yield url
    stop_proxy(PROXIES.pop(url)[0])


STARTED = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")
"""Trial states of trials a worker took (the budget's queued WAITING slots left out): ``get_trials(states=...)``."""


def started(study: Any) -> list[Any]:
    """The study's trials that a worker took: its queued budget slots (WAITING) left out."""
    from optuna.trial import TrialState

    return list(study.get_trials(states=tuple(TrialState[s] for s in STARTED)))


def stored_trials(url: str, name: str = "t") -> list[Any]:
    """Every trial of study ``name`` at ``url``, read afresh."""
    import optuna

    from sft_optuna.coordination.storage import open_storage

    return list(optuna.load_study(study_name=name, storage=open_storage(url).optuna).get_trials())


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_resumed_from_checkpoint(retry: Any, dead: Any, epochs: int) -> None:
    """``retry`` continued ``dead``'s lineage from its checkpoint, not from scratch: its curve has every epoch
    1..``epochs``, equal to the dead trial's up to the epoch it resumed from."""
    from sft_optuna import attrs

    resumed = retry.user_attrs[attrs.RESUMED_FROM_EPOCH]
    assert resumed >= 1, "resumed from the dead worker's checkpoint, not from scratch"
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    for step in range(1, resumed + 1):
        assert retry.intermediate_values[step] == dead.intermediate_values[step]


STORAGES = ["sqlite", "journal", "postgresql", "grpc"]


@pytest.fixture(params=STORAGES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on every storage backend (one fixture, all storages, as Optuna's own suite does); ``grpc``
    is the proxy in front of PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    if request.param == "journal":
        return f"journal://{tmp_path / 'studies.log'}"
    if request.param == "grpc":
        return str(request.getfixturevalue("grpc_url"))
    return str(request.getfixturevalue("postgres_url"))


def explain(url: str, name: str, outputs: dict[str, str]) -> str:
    """What a red run needs to be read without rerunning it: every trial, and the tail of every log."""
    import optuna

    from sft_optuna import attrs
    from sft_optuna.coordination.storage import open_storage

    lines = []
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url, 5).optuna)
        for t in study.get_trials():
            lines.append(
                f"trial {t.number} {t.state.name} reason={t.user_attrs.get(attrs.REASON)!r} "
                f"retry={t.user_attrs.get(attrs.RETRY, 0)} lineage={attrs.lineage(t)} "
                f"epochs={sorted(t.intermediate_values)} params={t.params}"
            )
    except Exception as exc:  # the explanation must not hide the failure it explains
        lines.append(f"(cannot read the study: {exc})")
    for who, out in outputs.items():
        lines.append(f"--- {who} (last 3000 characters) ---\n{out[-3000:]}")
    return "\n".join(lines)
