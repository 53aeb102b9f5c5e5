"""A whole study's throughput on one GPU: sft-optuna (one worker per GPU, and packed workers) against plain
Optuna + the textbook PyTorch loop, on the same data, budget and device (#27).

The shipped TPE study's shape, shrunk to minutes: ``--trials`` trials x ``--epochs`` epochs of ResNet-18 on
``--images`` generated images (the official CIFAR-10 format) at 64 px, TPE, no pruning (so both sides train the
same epochs). Per row: wall seconds, trials per hour, GPU-seconds per trial and the aggregate model FLOP
utilisation (the training images of all trials x FLOPs per image / wall / a measured matmul rate).

- ``sft-optuna, 1 worker``: ``sft-optuna launch NAME --gpus 0`` on a fresh SQLite storage;
- ``sft-optuna, K workers``: the same with ``--workers-per-gpu K`` (``auto``: measured and chosen by the launcher);
- ``sft-optuna, 1 worker, fused packs of K``: one worker per GPU with ``--pack K`` (trials of one shape trained
  as one fused model);
- ``plain Optuna + textbook loop``: ``optuna.create_study(TPESampler)`` + ``study.optimize`` of an objective that
  trains with torchvision transforms on PIL images in a ``DataLoader(num_workers=2)``, fp32, ``loss.item()`` per
  step — what the textbook does.

    python benchmarks/study_e2e.py --json benchmarks/results/gpu/study.json             # one CUDA GPU
    python benchmarks/study_e2e.py --dry-run                                            # every stage, seconds, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` learnable 32-px images in the official CIFAR-10 python layout (train) and n/10 test images."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def images(count: int) -> tuple[np.ndarray, list[int]]:
        y = rng.integers(0, 10, count)
        x = rng.integers(0, 80, (count, 3, 32, 32)) + (y * 17)[:, None, None, None]
        return x.clip(0, 255).astype(np.uint8).reshape(count, -1), y.tolist()

    for i, part in enumerate(np.array_split(np.arange(n), 5), start=1):
        x, y = images(len(part))
        with (base / f"data_batch_{i}").open("wb") as fh:
            pickle.dump({b"data": x, b"labels": y}, fh)
    x, y = images(max(n // 10, 10))
    with (base / "test_batch").open("wb") as fh:
        pickle.dump({b"data": x, b"labels": y}, fh)
    return root


def study_file(path: Path, root: Path, trials: int, epochs: int, size: int, val: int) -> Path:
    """The shipped TPE study, shrunk: same sampler and space, no pruning, ``trials`` x ``epochs``."""
    raw = yaml.safe_load((REPO / "studies" / "cifar10-resnet18-tpe.yaml").read_text())
    raw.update(name="e2e", pruner={"name": "none"}, budget={"n_trials": trials, "max_retries": 2})
    # a worker left without a trial looks for one every heartbeat interval: the shipped 30 s would add up to 30 s
    # of idle tail to a study of minutes (a long study does not notice)
    raw["heartbeat"] = {"interval": 2.0, "grace_period": 20.0}
    raw["data"] = {"dataset": "cifar10", "root": str(root), "val_size": val, "download": False}
    raw["model"] = {"weights": "none", "stem": "imagenet", "image_size": size}
    raw["train"] = {**raw["train"], "epochs": epochs, "warmup_epochs": min(raw["train"]["warmup_epochs"], epochs / 2)}
    raw["search_space"].pop("epochs", None)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_ours(study: Path, work: Path, workers: str, gpus: str, pack: int = 1) -> float:
    """Wall seconds of ``create`` + ``launch`` until the study is done."""
    tag = f"{workers}-pack{pack}"
    url = f"sqlite:///{work / f'ours-{tag}.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "sft_optuna", "--storage", url]
    made = subprocess.run([*cli, "create", str(study)], env=env, capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"sft-optuna create failed: {made.stderr.strip()[-1000:]}")
    start = time.perf_counter()
    launch = [*cli, "launch", "e2e", "--gpus", gpus, "--workers-per-gpu", workers, "--pack", str(pack)]
    proc = subprocess.run(
        [*launch, "--checkpoint-dir", str(work / f"ck-{tag}")], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    (work / f"ours-{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"sft-optuna launch --workers-per-gpu {workers} --pack {pack} failed: {proc.stdout[-2000:]}")
    return wall


def run_plain(root: Path, trials: int, epochs: int, size: int, val: int, device: str) -> float:
    """Wall seconds of plain Optuna's ``study.optimize`` over the textbook objective (in its own process)."""
    args = [str(root), str(trials), str(epochs), str(size), str(val), device]
    script = str(REPO / "benchmarks" / "plain_optuna.py")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plain Optuna + textbook loop failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["wall_s"])


def flops_per_image(size: int, device: Any) -> tuple[float, float]:
    """(training FLOPs per image of ResNet-18 at ``size`` px, a measured matmul rate) for the MFU column."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from throughput import matmul_rate, step_flops

    from sft_optuna.config import ModelConfig

    dev = torch.device(device)
    flops = step_flops(ModelConfig(weights="none", image_size=size), 10, 8, dev) / 8
    return flops, matmul_rate(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", default="1,auto", help="sft-optuna rows: workers per GPU, comma-separated")
    p.add_argument("--packs", default="4", help="rows of one worker per GPU with --pack K, comma-separated ('' none)")
    p.add_argument("--no-plain", action="store_true", help="skip plain Optuna + the textbook loop")
    p.add_argument("--dry-run", action="store_true", help="every stage for seconds, on the CPU")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device, gpus = "cuda", "0"
    if args.dry_run:
        args.trials, args.epochs, args.images, args.image_size, args.packs = 2, 1, 600, 32, "2"
        device, gpus = "cpu", "cpu"
    val = max(args.images // 10, 100)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = make_data(work / "data", args.images)
        study = study_file(work / "e2e.yaml", root, args.trials, args.epochs, args.image_size, val)
        walls: dict[str, float] = {}
        for workers in args.workers.split(","):
            if workers == "auto":  # measured once per node, before the timed launch (which then reads the cache)
                from sft_optuna.packing import calibrate_node
                from sft_optuna.study_file import load_study_file

                start = time.perf_counter()
                calibration = calibrate_node(load_study_file(study), None if gpus == "cpu" else gpus)
                calibration_s = time.perf_counter() - start
                print(f"calibration ({calibration_s:.0f} s, once per node): {calibration.describe()}", flush=True)
            walls[f"sft-optuna, {workers} worker(s) per GPU"] = run_ours(study, work, workers, gpus)
            print(
                f"sft-optuna --workers-per-gpu {workers}: {walls[f'sft-optuna, {workers} worker(s) per GPU']:.1f} s",
                flush=True,
            )
        for k in [int(v) for v in args.packs.split(",") if v]:
            name = f"sft-optuna, 1 worker per GPU, fused packs of {k}"
            walls[name] = run_ours(study, work, "1", gpus, k)
            print(f"sft-optuna --pack {k}: {walls[name]:.1f} s", flush=True)
        if not args.no_plain:
            walls["plain Optuna + textbook loop"] = run_plain(
                root, args.trials, args.epochs, args.image_size, val, device
            )
            print(f"plain Optuna + textbook loop: {walls['plain Optuna + textbook loop']:.1f} s", flush=True)
    flops, peak = flops_per_image(args.image_size, device)
    images = args.trials * args.epochs * (args.images - val)
    rows = {}
    base = walls.get("plain Optuna + textbook loop")
    shape = f"{args.trials} trials x {args.epochs} epochs x {args.images - val} images at {args.image_size} px"
    print(f"\n{shape} on {device}")
    print(f"{'':50s} {'wall s':>8s} {'trials/h':>9s} {'GPU-s/trial':>12s} {'MFU':>7s} {'x plain':>8s}")
    for name, wall in walls.items():
        row = {
            "wall_s": round(wall, 1),
            "trials_per_hour": round(args.trials * 3600 / wall, 1),
            "gpu_seconds_per_trial": round(wall / args.trials, 1),
            "aggregate_mfu": round(images * flops / wall / peak, 4),
            "vs_plain": round(base / wall, 2) if base else None,
        }
        rows[name] = row
        vs = f"{row['vs_plain']:.2f}x" if row["vs_plain"] else "–"
        print(
            f"{name:50s} {wall:8.1f} {row['trials_per_hour']:9.1f} {row['gpu_seconds_per_trial']:12.1f} "
            f"{row['aggregate_mfu']:7.1%} {vs:>8s}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"args": vars(args) | {"json": str(args.json)}, "flops_per_image": flops, "matmul_flops_per_s": peak}
        args.json.write_text(json.dumps(out | {"rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
