"""Fused packs (``worker --pack K``): aggregate training images/s of K trials trained as one fused model, K = 1,
2, 4, 8, side by side in one run, with the MFU of each.

Each member is a :class:`~sft_optuna.training.trainer.Trainer` on a thread of its own (as in a packed worker),
with its own learning rate and seed; all K in one :class:`~sft_optuna.training.packs.Pack`. K = 1 is one
trial's eager step through the same fused path; ``--plain`` adds one trial's plain eager step (no pack) as the
baseline the issue's figures compare with.

    python benchmarks/packs.py --device cuda --json out.json      # the shipped studies' shape: 64 px, batch 256
    python benchmarks/packs.py --dry-run                          # every part for seconds on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_rate, step_flops, sync

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.training.data import Splits
from sft_optuna.training.packs import Pack
from sft_optuna.training.trainer import Trainer


def measure(
    splits: Splits,
    model_cfg: ModelConfig,
    k: int,
    bs: int,
    steps: int,
    warmup: int,
    device: torch.device,
    plain: bool = False,
) -> float:
    """Aggregate training images/s of ``k`` members stepping together (``plain``: one trainer, no pack)."""
    pack = None if plain else Pack()
    trainers = [
        Trainer(splits, model_cfg, TrainConfig(batch_size=bs, lr=0.05 * (1 + i / 10), seed=i), device, pack=pack)
        for i in range(k)
    ]
    barrier = threading.Barrier(k + 1)

    def run(t: Trainer) -> None:
        t.train_steps(warmup)
        barrier.wait()  # all warmed up
        barrier.wait()  # the clock started
        t.train_steps(steps)

    threads = [threading.Thread(target=run, args=(t,)) for t in trainers]
    for th in threads:
        th.start()
    barrier.wait()
    sync(device)
    start = time.perf_counter()
    barrier.wait()
    for th in threads:
        th.join()
    sync(device)
    seconds = time.perf_counter() - start
    for t in trainers:
        t.close()
    return k * steps * bs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--packs", default="1,2,4,8", help="pack sizes to measure")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each member")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks every part runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.packs, args.image_size, args.batch_size, args.steps = "cpu", "1,2", 16, 8, 2
    device = torch.device(args.device)
    counts = [int(k) for k in args.packs.split(",")]
    warmup = 2 if args.dry_run else 5
    gen = torch.Generator().manual_seed(0)
    n = args.batch_size * 4
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    splits = Splits(x, y, x[: args.batch_size], y[: args.batch_size], 10)
    model_cfg = ModelConfig(weights="none", stem=args.stem, image_size=args.image_size)
    flops = step_flops(model_cfg, 10, args.batch_size, device) / args.batch_size
    peak = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); ResNet-18 stem {args.stem} at {args.image_size} px, batch {args.batch_size}")
    rows: list[dict[str, Any]] = []
    plain = measure(splits, model_cfg, 1, args.batch_size, args.steps, warmup, device, plain=True)
    rows.append({"setting": "one trial, plain eager step", "k": 1, "images_per_s": plain})
    for k in counts:
        try:
            rate = measure(splits, model_cfg, k, args.batch_size, args.steps, warmup, device)
        except torch.cuda.OutOfMemoryError:
            print(f"fused pack of {k}: out of memory")
            torch.cuda.empty_cache()
            break
        rows.append({"setting": f"fused pack of {k}", "k": k, "images_per_s": rate})
    print(f"{'setting':<30} {'images/s':>10} {'vs one trial':>13} {'MFU':>7}")
    for r in rows:
        r["speedup"] = r["images_per_s"] / plain
        r["mfu"] = r["images_per_s"] * flops / peak
        print(f"{r['setting']:<30} {r['images_per_s']:>10.0f} {r['speedup']:>12.2f}x {r['mfu']:>6.1%}")
    if args.json:
        figures = {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "image_size": args.image_size,
            "stem": args.stem,
            "batch_size": args.batch_size,
            "flops_per_image_train": flops,
            "matmul_flops_per_s": peak,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
