"""Optuna's own storage conformance suite (``optuna.testing.pytest_storages.StorageTestCase``, shipped in the
wheel for third-party storages) on every storage this project opens: SQLite, journal, PostgreSQL directly, and
``sft-optuna proxy`` in front of PostgreSQL through our client and through Optuna's own. A deviation from plain
Optuna fails CI; intended ones are skipped by name with the reason (README, storage section).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import free_port, start_proxy, stop_proxy
from optuna.testing.pytest_storages import StorageTestCase

from sft_optuna.coordination.storage import open_storage

BACKENDS = ["sqlite", "journal", "postgresql", "grpc", "grpc-optuna-client"]

GRPC_PARAMS_ORDER = (
    "Optuna's gRPC messages carry a trial's params in a protobuf map, whose order is not kept: plain Optuna's "
    "proxy loses it too (measured: 20 of 40 reads)"
)
INTENDED: dict[tuple[str, str], str] = {
    ("test_get_all_trials_params_order", "grpc"): GRPC_PARAMS_ORDER,
    ("test_get_all_trials_params_order", "grpc-optuna-client"): GRPC_PARAMS_ORDER,
}
"""Suite tests skipped on purpose, by (name, backend) -> why; every other test passes on every backend."""


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(backend, what a fresh storage is made from), one per module: a database for PostgreSQL and the proxy
    (emptied before each test: a proxy per test would cost most of the suite's time)."""
    kind = request.param
    if kind in ("sqlite", "journal"):
        yield kind, tmp_path_factory.mktemp(kind)
        return
    pg = request.getfixturevalue("_suite_database")
    if kind == "postgresql":
        yield kind, pg
        return
    port = free_port()
    proc = start_proxy(pg, port)
    try:
        yield kind, port
    finally:
        stop_proxy(proc)


@pytest.fixture(scope="module")
def _suite_database() -> Iterator[str]:
    from conftest import fresh_database

    with fresh_database("sft_suite") as url:
        yield url


_counter = iter(range(10**9))


@pytest.fixture
def storage(server: tuple[str, Any], request: pytest.FixtureRequest) -> Any:
    """An empty storage of the backend, as the suite expects."""
    kind, where = server
    why = INTENDED.get((request.node.originalname, kind))
    if why:
        pytest.skip(why)
    if kind == "sqlite":
        return open_storage(f"sqlite:///{Path(where) / f'{next(_counter)}.db'}").optuna
    if kind == "journal":
        return open_storage(f"journal://{Path(where) / f'{next(_counter)}.log'}").optuna
    if kind == "postgresql":
        s = open_storage(where).optuna
    elif kind == "grpc":
        s = open_storage(f"grpc://127.0.0.1:{where}").optuna
    else:
        s = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=where)
        s.wait_server_ready(timeout=60)
    for study in s.get_all_studies():  # what earlier tests of the module left
        s.delete_study(study._study_id)
    return s


class TestOptunaStorageSuite(StorageTestCase):
    """Every test of Optuna's suite, on every backend (the ``storage`` fixture above)."""
