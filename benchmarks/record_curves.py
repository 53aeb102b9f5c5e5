"""Record real learning curves for the replay benchmark (``benchmarks/hpo_replay.py``).

Random configurations from a study file's search space (the shipped TPE study by default), each trained from
scratch with the project's own trainer on a class-balanced subset of an image folder (the real CIFAR-10 JPEG
copy), validation accuracy and seconds recorded after every epoch. One CSV row per (configuration, epoch).

Resumable: configurations already in the CSV are skipped (the list of configurations is fixed by ``--seed``),
and each configuration's rows are appended only once it has finished, so an interrupted run loses at most the
configuration in progress.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C data/      # once
    python benchmarks/record_curves.py --data data/cifar10-jpeg --out benchmarks/curves/cifar10-2k.csv

On a GPU: ``--device cuda --precision bf16``, several recorders sharing it (``--shard K/N``) and
``--time-limit-s`` to end inside a lease; ``benchmarks/record_curves_gpu.sh`` does all of that.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import math
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from sft_optuna.config import DataConfig, ModelConfig, StudyConfig, train_config_for
from sft_optuna.errors import UserError
from sft_optuna.node import resolve_device
from sft_optuna.search.space import random_points
from sft_optuna.study_file import load_study_file
from sft_optuna.training.data import load_splits
from sft_optuna.training.trainer import DivergedError, Trainer

FIELDS = ["config", "status", "epoch", "val_acc", "train_loss", "seconds"]


def done_configs(path: Path) -> set[int]:
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {int(row["config"]) for row in csv.DictReader(f)}


def record_one(
    number: int,
    params: dict[str, Any],
    config: StudyConfig,
    splits: Any,
    model: ModelConfig,
    epochs: int,
    device: torch.device,
    precision: str,
) -> list[dict[str, Any]]:
    train_cfg = dataclasses.replace(train_config_for(config, params), epochs=epochs, precision=precision)
    trainer = Trainer(splits, model, train_cfg, device, seed=train_cfg.seed + number)
    rows: list[dict[str, Any]] = []
    base = {"config": number, **params}
    for _ in range(epochs):
        try:
            r = trainer.run_epoch()
        except DivergedError:
            # the curve stops here; the replay treats a diverged configuration as accuracy 0.1 from then on
            for row in rows:
                row["status"] = "diverged"
            rows.append(
                {
                    **base,
                    "status": "diverged",
                    "epoch": trainer.epoch + 1,
                    "val_acc": math.nan,
                    "train_loss": math.nan,
                    "seconds": math.nan,
                }
            )
            return rows
        rows.append(
            {
                **base,
                "status": "ok",
                "epoch": r.epoch,
                "val_acc": round(r.val_acc, 5),
                "train_loss": round(r.train_loss, 5),
                "seconds": round(r.seconds, 3),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="studies/cifar10-resnet18-tpe.yaml", help="search space and fixed values")
    p.add_argument("--data", default="data/cifar10-jpeg", help="image folder with train/<class>/ (CIFAR-10 copy)")
    p.add_argument("--out", default="benchmarks/curves/cifar10-2k.csv")
    p.add_argument("--configs", type=int, default=150)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train", type=int, default=2000, help="training images (class-balanced)")
    p.add_argument("--val", type=int, default=1000, help="validation images (class-balanced, from train/)")
    p.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (CUDA)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="start no configuration that would end past this many seconds (judged by the last one's time)",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        help="K/N: record only configurations whose number is K mod N (run N processes on one CSV; appends are locked)",
    )
    args = p.parse_args()
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        p.error(f"--shard {args.shard!r}: expected K/N with 0 <= K < N")

    device = resolve_device(args.device)  # before the data: the cheap check first
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_study_file(args.study)
    data = DataConfig(dataset="imagefolder", root=args.data, val_size=args.val, train_subset=args.train, seed=0)
    splits, _ = load_splits(data)
    model = ModelConfig(weights="none", stem=args.stem, image_size=32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = random_points(config.search_space, args.configs, args.seed)
    done = done_configs(out)
    names = list(config.search_space)
    began, last_s = time.perf_counter(), 0.0
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS[:1] + names + FIELDS[1:])
        for number, params in enumerate(points):
            if number in done or number % shards != shard:
                continue
            start = time.perf_counter()
            if args.time_limit_s is not None and start - began + last_s > args.time_limit_s:
                print(f"time limit: {args.time_limit_s:.0f} s would be passed; stopping before config {number}")
                break
            rows = record_one(number, params, config, splits, model, args.epochs, device, args.precision)
            fcntl.flock(f, fcntl.LOCK_EX)  # another shard may be appending to the same file
            try:
                if out.stat().st_size == 0:
                    writer.writeheader()
                writer.writerows(rows)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            last, last_s = rows[-1], time.perf_counter() - start
            print(
                f"config {number}: {last['status']} val_acc {last['val_acc']} after {len(rows)} epochs, {last_s:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a missing study file, data folder or device: one line, as the CLI prints it
        raise SystemExit(f"error: {exc}") from None
