"""One worker process per GPU on this node: each sees only its GPU, logs prefixed, signals forwarded.

Nothing is restarted silently: a worker that exits non-zero makes the launcher exit non-zero once all are
done (a cluster scheduler or compose restart policy decides what happens next; the study resumes anyway).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import IO

from sft_optuna.coordination.storage import ENV_STORAGE
from sft_optuna.errors import UserError

__all__ = ["launch", "parse_gpus"]

log = logging.getLogger(__name__)


def parse_gpus(spec: str) -> list[str]:
    """``all`` -> every visible CUDA device; ``0,1,3`` -> those; ``cpu`` -> CPU workers (no GPU)."""
    if spec == "cpu":
        return ["cpu"]
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise UserError("--gpus all: no CUDA device on this node (use --gpus cpu for CPU workers)")
        return [str(i) for i in range(n)]
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(s.isdigit() for s in ids):
        raise UserError(f"--gpus {spec!r}: expected all, cpu or a list of GPU indices like 0,1,3")
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus {spec!r}: a GPU is listed twice")
    return ids


def _memory_shares(gpus: Sequence[str], workers_per_gpu: int) -> dict[str, int]:
    """Each GPU's free memory divided between its workers, from ``nvidia-smi`` (asking torch would open a CUDA
    context in the launcher, on every GPU, for as long as it runs); empty when it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot read the GPUs' free memory (%s): workers sharing a GPU each plan with all of it", exc)
        return {}
    free = {}
    for line in out.strip().splitlines():
        index, mib = (field.strip() for field in line.split(","))
        free[index] = int(mib) * 2**20
    return {gpu: free[gpu] // workers_per_gpu for gpu in gpus if gpu in free}


def _pump(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def launch(
    gpus: Sequence[str], workers_per_gpu: int, worker_argv: Sequence[str], url: str, threads: int | None = None
) -> int:
    """Run ``python -m sft_optuna <worker_argv> --device ...`` once per GPU slot; returns the exit code.

    The storage URL goes to the workers as ``$SFT_OPTUNA_STORAGE``: a command line is world-readable (``ps``),
    a process's environment is not.
    """
    if workers_per_gpu < 1:
        raise UserError(f"--workers-per-gpu {workers_per_gpu}: must be at least 1")
    slots = [(gpu, k) for gpu in gpus for k in range(workers_per_gpu)]
    shares = _memory_shares(gpus, workers_per_gpu) if workers_per_gpu > 1 and gpus != ["cpu"] else {}
    # ``threads`` (--threads, else an exported $OMP_NUM_THREADS: node.resolve_threads), else the node's cores
    # shared between the workers (two workers on 2 cores each using all cores ran 5x slower than one).
    per_worker = threads or max(1, (os.cpu_count() or 1) // len(slots))
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    pumps = []
    for gpu, k in slots:
        env = {**os.environ, "OMP_NUM_THREADS": str(per_worker), ENV_STORAGE: url}
        if gpu == "cpu":
            device, tag = "cpu", f"[cpu.{k}]"
        else:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # the worker sees only its own GPU, as cuda:0
            device, tag = "cuda", f"[gpu{gpu}" + (f".{k}]" if workers_per_gpu > 1 else "]")
        cmd = [sys.executable, "-m", "sft_optuna", *worker_argv, "--device", device]
        if gpu in shares:  # workers sharing a GPU decide their data placement on their share of its memory
            cmd += ["--device-memory", str(shares[gpu])]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, tag), daemon=True)
        pump.start()
        pumps.append(pump)
        procs.append((tag, proc))
        log.info("%s started worker pid %d", tag, proc.pid)

    def forward(signum: int, frame: FrameType | None) -> None:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [(tag, proc.wait()) for tag, proc in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for pump in pumps:
        pump.join(timeout=5)
    failed = [(tag, code) for tag, code in codes if code != 0]
    for tag, code in failed:
        log.error("%s worker exited with code %d", tag, code)
    return 1 if failed else 0
