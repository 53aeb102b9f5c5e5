"""``sft-optuna proxy``: Optuna's gRPC storage proxy in front of one storage, for studies with many workers.

Workers point at ``grpc://HOST:PORT`` instead of the database: the proxy holds a fixed pool of database
connections (``threads`` per process, each serving ``HANDLERS_PER_CONNECTION`` requests at once) whatever the
number of workers, and serves the storage with sft-optuna's guarded state changes, one-statement writes and
two-statement reads (``RetryingStorage``), so claims stay exact through it; requests for a study's trials that
arrive together share one read (``SharedReadsStorage``), and each trial of a read is turned into its gRPC
message once, not once per request (``MessageCachingService``). One proxy process is one Python interpreter:
past ~1 core of work it is its GIL that limits it, so ``processes`` > 1 runs that many on one port (the kernel
spreads the workers' connections over them, ``SO_REUSEPORT``), each with its own pool; every guard runs in the
database, so claims stay exact across them.
The proxy has no authentication: keep it on a private network (it binds to 127.0.0.1 unless told otherwise).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from optuna.storages._grpc.auto_generated import api_pb2, api_pb2_grpc
from optuna.storages._grpc.servicer import OptunaStorageProxyService, _to_proto_trial
from optuna.trial import FrozenTrial

from sft_optuna.coordination.retrying import OUTAGE_S
from sft_optuna.coordination.shared_reads import SharedReadsStorage
from sft_optuna.coordination.storage import Storage, open_storage
from sft_optuna.errors import UserError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_THREADS",
    "HANDLERS_PER_CONNECTION",
    "MessageCachingService",
    "serve",
    "serve_processes",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 13000
DEFAULT_THREADS = 16
"""Database connections in the pool."""
HANDLERS_PER_CONNECTION = 4
"""Requests served at once per pooled connection. A request for a study's trials takes tens of milliseconds at
hundreds of workers (and waits for the next shared read); with one handler thread per connection, the epochs'
one-statement writes queued behind them (measured at 256 workers, 15-s trials: a report's p50 540 ms; with 4 per
connection 152 ms). A handler that needs the database while every connection is in use waits for one."""


def serve(storage: Storage, host: str, port: int, threads: int = DEFAULT_THREADS, shared: bool = False) -> None:
    """Serve ``storage`` over gRPC on ``host:port`` until interrupted. ``shared``: other processes of the same
    proxy serve the same port (gRPC would share any port by default: a second proxy started on a port in use,
    maybe for another database, would silently take half of the workers — without ``shared`` that fails)."""
    if storage.backend.name == "grpc":
        raise UserError(f"{storage.masked} is itself a proxy: point the proxy at the database (--storage URL)")
    # what Optuna's make_server does, with the port's sharing stated
    handlers = ThreadPoolExecutor(max_workers=HANDLERS_PER_CONNECTION * threads)
    server = grpc.server(handlers, options=[("grpc.so_reuseport", int(shared))])
    # requests for a study's trials that arrive together share one read of the database
    service = MessageCachingService(SharedReadsStorage(storage.optuna))
    api_pb2_grpc.add_StorageServiceServicer_to_server(service, server)
    try:
        server.add_insecure_port(f"{host}:{port}")
        server.start()
    except RuntimeError:  # gRPC says only "Failed to bind"
        raise UserError(f"cannot serve on {host}:{port}: the address is in use or cannot be bound here") from None
    log.info("serving %s on grpc://%s:%d with %d database connections", storage.masked, host, port, threads)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=5)


class MessageCachingService(OptunaStorageProxyService):
    """Optuna's gRPC servicer whose ``GetTrials`` turns each trial into its message once.

    Every claim asks for its study's unfinished trials and anything new, and Optuna's servicer builds a message
    for each trial of each answer: at 256 workers ~300 running trials per request, a fifth of the proxy's time.
    The messages are kept by trial *object*: Optuna's cache never changes a trial object (a finished trial is
    read once, an unfinished one is re-read as a new object every time, shared by the requests a shared read
    answers), so a kept message is exactly as fresh as the object it was made from."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self._messages: dict[int, tuple[FrozenTrial, Any]] = {}  # id(trial) -> (trial: kept alive, its message)

    def GetTrials(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC's name)
        included = set(request.included_trial_ids)
        after = request.trial_id_greater_than
        try:
            trials = self._backend.get_all_trials(request.study_id, deepcopy=False)
        except KeyError as e:
            context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(e))
        kept = self._messages  # single dict operations are atomic under the GIL; no lock needed
        messages = []
        for t in trials:
            if t._trial_id > after or t._trial_id in included:
                hit = kept.get(id(t))
                if hit is None or hit[0] is not t:
                    hit = (t, _to_proto_trial(t))
                    kept[id(t)] = hit
                messages.append(hit[1])
        if len(kept) > 2 * len(trials) + 1024:  # forget the messages of objects no read returns any more
            live = {id(t) for t in trials}
            self._messages = {k: v for k, v in list(kept.items()) if k in live}
        return api_pb2.GetTrialsReply(trials=messages)


def serve_processes(url: str, storage: Storage, host: str, port: int, threads: int, processes: int) -> None:
    """``processes`` proxy processes on one port: this one and ``processes - 1`` children, which die with it;
    if one of them dies, this one stops too (a supervisor restarts the whole proxy)."""
    if port == 0:
        raise UserError("--processes needs a fixed --port: each process binds the same one")
    ctx = multiprocessing.get_context("spawn")
    # the children log as this process was set up to (the command's level and format), not a setup of their own
    level = logging.getLogger("sft_optuna").getEffectiveLevel()
    formatter = next((h.formatter for h in logging.getLogger().handlers if h.formatter), None)
    args = (url, host, port, threads, os.getpid(), level, formatter)
    children = [ctx.Process(target=_child, args=args, daemon=True) for _ in range(processes - 1)]
    for child in children:
        child.start()  # the URL travels through the spawn pipe, never on a command line

    def watch() -> None:
        while all(c.is_alive() for c in children):
            time.sleep(1.0)
        dead = next(c for c in children if not c.is_alive())
        log.error("proxy process %d exited with code %s: stopping the proxy", dead.pid, dead.exitcode)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="proxy-children", daemon=True).start()
    serve(storage, host, port, threads, shared=True)


def _child(
    url: str, host: str, port: int, threads: int, parent: int, level: int, formatter: logging.Formatter | None
) -> None:
    if sys.platform == "linux":  # die with the parent, however it ends
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above: nothing would signal this one
        sys.exit(1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.getLogger().addHandler(handler)
    logging.getLogger("sft_optuna").setLevel(level)
    try:
        serve(open_storage(url, OUTAGE_S, connections=threads), host, port, threads, shared=True)
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent says "interrupted"
        sys.exit(130)
