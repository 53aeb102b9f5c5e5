"""How many workers share one GPU: measured once per node, chosen where adding workers stops paying.

A trial of a small model leaves most of a large GPU idle (its step waits for Python to launch kernels). Several
worker processes on one GPU fill it the way Ray Tune's fractional GPUs do. ``launch --workers-per-gpu auto``
runs 1, 2, 4, 8, ... calibration processes at once on one of the node's GPUs — each training the study's
largest configuration on random images for a few seconds — sums their images/s, and takes the count after
which the aggregate grows by less than :data:`GAIN` (10%), no more than the GPU's memory holds. With CUDA MPS
(its control daemon running) the processes share the GPU's SMs at once instead of taking turns; the log says
which. On a CPU node the same measurement splits the cores between the workers. The figures are cached per
node, device and study shape (``~/.cache/sft-optuna/packing.json``), and ``plan`` shows them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft_optuna.config import StudyConfig, parse_config
from sft_optuna.errors import UserError

__all__ = [
    "GAIN",
    "Calibration",
    "cached_calibration",
    "calibrate_node",
    "choose_workers",
    "device_label",
    "memory_cap",
    "mps_running",
]

log = logging.getLogger(__name__)

GAIN = 0.10
"""Add workers while the aggregate images/s grows by at least this share (10%) per doubling."""
CANDIDATES = (1, 2, 4, 8, 16)
"""Workers per GPU tried, in order; the search stops at the first that does not pay or does not fit."""
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sft-optuna" / "packing.json"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Aggregate training images/s per number of concurrent workers, and the choice made from them."""

    device: str
    rates: dict[int, float]
    workers: int
    mps: bool
    cap: int | None
    """The most workers the device's memory holds (None: not limited by memory, or not known)."""

    def describe(self) -> str:
        """One line for the log and ``plan``."""
        gpu = self.device.startswith("cuda")
        figures = ", ".join(f"{k}: {r:.0f}" for k, r in sorted(self.rates.items()))
        notes = []
        if gpu:
            notes.append("with CUDA MPS" if self.mps else "time-sliced (no MPS daemon)")
        if self.cap is not None:
            notes.append(f"{'memory holds' if gpu else 'cores allow'} {self.cap}")
        return (
            f"workers per {'GPU' if gpu else 'node'} on {self.device}: aggregate training images/s {figures} "
            f"({'; '.join(notes)}) -> {self.workers} (each doubling must add {GAIN:.0%})"
        )


def choose_workers(rates: dict[int, float], gain: float = GAIN, cap: int | None = None) -> int:
    """The count after which the aggregate grows by less than ``gain``: walk the measured counts in order and
    keep the next while it is at least ``1 + gain`` times the kept one's rate (and within ``cap``).

    >>> choose_workers({1: 100.0, 2: 190.0, 4: 260.0, 8: 270.0})
    4
    >>> choose_workers({1: 100.0, 2: 105.0, 4: 300.0})  # the first doubling does not pay: stop there
    1
    >>> choose_workers({1: 100.0, 2: 190.0, 4: 260.0}, cap=2)
    2
    """
    counts = sorted(rates)
    best = counts[0]
    for k in counts[1:]:
        if cap is not None and k > cap:
            break
        if rates[k] / rates[best] < 1 + gain - 1e-9:  # (a gain of exactly 10% pays, whatever the rounding)
            break
        best = k
    return best


def memory_cap(free_bytes: int, per_worker_bytes: int, headroom: float = 0.9) -> int:
    """How many workers' steps (and their data) fit in ``headroom`` of the free memory (at least 1).

    >>> memory_cap(80 * 10**9, 9 * 10**9)
    8
    """
    if per_worker_bytes <= 0:
        return CANDIDATES[-1]
    return max(1, int(headroom * free_bytes // per_worker_bytes))


def mps_running() -> bool:
    """Does a CUDA MPS control daemon serve this node (its pipe directory exists and a daemon runs)?"""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if not pipe.is_dir():
        return False
    try:
        out = subprocess.run(["pgrep", "-x", "nvidia-cuda-mps"], capture_output=True, text=True, check=False)
    except OSError:
        return False
    return out.returncode == 0


def device_label(device: Any) -> str:
    """``cuda (NVIDIA H200)`` or ``cpu``: what a calibration is cached under."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _shape_key(config: StudyConfig, device_name: str) -> str:
    """What the calibration depends on: the device, the architectures, the largest batch and image size."""
    from sft_optuna.training.placement import largest_choices, study_archs

    big = largest_choices(config)
    shape = [device_name, study_archs(config), big.train.batch_size, big.model.image_size, big.model.stem]
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


def cached_calibration(config: StudyConfig, device_name: str, path: Path = CACHE) -> Calibration | None:
    """The node's calibration for this study's shape, if one was measured."""
    try:
        entry = json.loads(path.read_text()).get(_shape_key(config, device_name))
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    entry["rates"] = {int(k): v for k, v in entry["rates"].items()}
    return Calibration(**entry)


def _store(config: StudyConfig, calibration: Calibration, path: Path = CACHE) -> None:
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        table = {}
    table[_shape_key(config, calibration.device)] = dataclasses.asdict(calibration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
    except OSError as exc:
        log.warning("cannot cache the calibration in %s (%s)", path, exc)


def _run_together(config: StudyConfig, k: int, gpu: str | None, cores: int, seconds: float) -> tuple[float, int]:
    """(aggregate images/s, the most device memory one of them took) of ``k`` calibration processes started
    together (on GPU ``gpu``, else the CPU with the cores split between them)."""
    payload = json.dumps(config.to_dict())
    threads = max(1, cores // k)
    procs: list[tuple[subprocess.Popen[str], Any]] = []
    with tempfile.TemporaryDirectory() as barrier:  # each process measures only while all k train
        for _ in range(k):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            device = "cuda" if gpu is not None else "cpu"
            cmd = [sys.executable, "-m", "sft_optuna.packing", device, str(seconds), barrier, str(k)]
            errors = tempfile.TemporaryFile("w+")  # a pipe nobody reads until the end could fill and block
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
            )
            assert proc.stdin is not None
            proc.stdin.write(payload)  # every process gets its config before any is waited for: they meet
            proc.stdin.close()  # at the barrier
            procs.append((proc, errors))
        total, peak = 0.0, 0
        for proc, errors in procs:
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.wait()
            errors.seek(0)
            err = errors.read()
            errors.close()
            if proc.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"--workers-per-gpu auto: a calibration process failed ({last[:200]})")
            result = json.loads(out.strip().splitlines()[-1])
            total += float(result["images_per_s"])
            peak = max(peak, int(result["peak_bytes"]))
    return total, peak


def _gpu(gpu: str) -> tuple[str, int | None]:
    """(``cuda (NAME)``, free bytes) of GPU ``gpu`` from ``nvidia-smi``: the launcher never opens a CUDA context of
    its own (it would hold memory on the GPU for as long as its workers run); (``cuda``, None) without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", gpu, "--query-gpu=name,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        name, free_mib = (field.strip() for field in out.splitlines()[0].rsplit(",", 1))
        return f"cuda ({name})", int(free_mib) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "cuda", None


def calibrate_node(
    config: StudyConfig,
    gpu: str | None,
    counts: Sequence[int] = CANDIDATES,
    seconds: float = 10.0,
    cores: int | None = None,
    cache: Path | None = CACHE,
    stop_early: bool = True,
) -> Calibration:
    """Measure 1, 2, 4, ... concurrent workers on GPU ``gpu`` (None: the CPU) and choose (see the module);
    ``stop_early``: no larger count once a doubling did not pay (``False``: every count that fits, a benchmark).
    The memory one worker's step takes is measured by the first (lone) calibration process."""
    cores = cores or len(os.sched_getaffinity(0))
    device_name, free = _gpu(gpu) if gpu is not None else ("cpu", None)
    if cache is not None and (hit := cached_calibration(config, device_name, cache)) is not None:
        return hit
    cap: int | None = cores if gpu is None else None  # a CPU worker needs a core of its own
    rates: dict[int, float] = {}
    for k in counts:
        if cap is not None and k > cap:
            break
        start = time.perf_counter()
        rates[k], peak = _run_together(config, k, gpu, cores, seconds)
        log.info("calibration: %d worker(s) together: %.0f images/s (%.0f s)", k, rates[k], time.perf_counter() - start)
        if k == counts[0] and gpu is not None and free is not None and peak:
            cap = memory_cap(free, peak)
        if stop_early and len(rates) > 1 and choose_workers(rates, cap=cap) < k:
            break  # this doubling did not pay: larger counts are not measured
    workers = choose_workers(rates, cap=cap)
    calibration = Calibration(device_name, rates, workers, gpu is not None and mps_running(), cap)
    if cache is not None:
        _store(config, calibration, cache)
    return calibration


BARRIER_S = 300.0
"""How long a calibration process waits for the others to be ready (they import torch and warm up)."""


def _calibrate_one(device_name: str, seconds: float, barrier: Path, k: int) -> dict[str, Any]:
    """In a calibration process: warm up, wait until all ``k`` processes are ready (a file each in
    ``barrier``), then train the study's largest configuration on random images for ``seconds``."""
    import torch

    from sft_optuna.node import use_threads
    from sft_optuna.training.data import Splits
    from sft_optuna.training.placement import largest_choices, study_archs
    from sft_optuna.training.trainer import Trainer

    use_threads(None)
    config = largest_choices(parse_config(json.loads(sys.stdin.read()), "calibration"))
    device = torch.device(device_name)
    bs, size = config.train.batch_size, config.data.image_size
    n = bs * 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    model = dataclasses.replace(config.model, arch=study_archs(config)[0], weights="none")
    trainer = Trainer(Splits(x, y, x[:bs], y[:bs], 10), model, config.train, device)
    trainer.train_steps(1)  # warm-up: cuDNN's autotuning, the allocator
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + BARRIER_S
    while len(list(barrier.iterdir())) < k and time.monotonic() < deadline:
        time.sleep(0.05)
    seen, elapsed = 0, 0.0
    while elapsed < seconds:
        _, _, images, secs, _ = trainer.train_steps()
        seen, elapsed = seen + images, elapsed + secs
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"images_per_s": seen / max(elapsed, 1e-9), "peak_bytes": peak}


if __name__ == "__main__":
    print(json.dumps(_calibrate_one(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
