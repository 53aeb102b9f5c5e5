"""The CIFAR path's speed before and after a change, measured side by side in one process.

It checks out ``--ref`` (default: f642859, the commit before the photo pipeline) into a temporary worktree,
imports that tree's package as ``sft_optuna_ref`` beside this one, and times the two alternately in short
chunks — the loader (training batches with the defaults: pad-crop + flip, normalise, resize) and the training
step (ResNet-18, the ``Trainer``) — so that a shared machine getting busier or quieter slows both alike. It
prints the median of each side's chunk rates and their ratio. #26's goal: the CIFAR path within 5% of before.

    python benchmarks/regression.py --json benchmarks/results/regression-cifar-cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def import_ref(ref: str, tmp: Path) -> Any:
    """``--ref``'s package, importable as ``sft_optuna_ref`` (its own imports rewritten to point at itself)."""
    tree = tmp / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True, capture_output=True
    )
    try:
        dest = tmp / "sft_optuna_ref"
        shutil.copytree(tree / "sft_optuna", dest)
        for path in dest.rglob("*.py"):
            path.write_text(re.sub(r"\bsft_optuna\b", "sft_optuna_ref", path.read_text()))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("sft_optuna_ref")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="f642859")
    p.add_argument("--rounds", type=int, default=30, help="alternations of the two sides")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loader-batches", type=int, default=20, help="loader batches per chunk")
    p.add_argument("--train-steps", type=int, default=3, help="training steps per chunk")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        import_ref(args.ref, Path(tmp))
        sides: dict[str, Any] = {}
        for name, pkg in (("ref", "sft_optuna_ref"), ("head", "sft_optuna")):
            config = importlib.import_module(f"{pkg}.config")
            augment = importlib.import_module(f"{pkg}.training.augment")
            data = importlib.import_module(f"{pkg}.training.data")
            trainer_mod = importlib.import_module(f"{pkg}.training.trainer")
            mean, std = augment.channel_stats(x)
            pipe = augment.BatchPipeline(x, y, mean, std, device, 32)
            splits = data.Splits(x, y, x[:256], y[:256], 10)
            model = config.ModelConfig(weights="none", image_size=32)
            train = config.TrainConfig(batch_size=args.batch_size, lr=0.05, precision="fp32")
            trainer = trainer_mod.Trainer(splits, model, train, device, seed=0)
            trainer.train_steps(1)  # warm-up
            sides[name] = (pipe, trainer)
        rates: dict[str, dict[str, list[float]]] = {
            "ref": {"loader": [], "train": []},
            "head": {"loader": [], "train": []},
        }
        for r in range(args.rounds):
            order = ("ref", "head") if r % 2 == 0 else ("head", "ref")
            for name in order:
                pipe, trainer = sides[name]
                g = torch.Generator().manual_seed(r)
                start, seen = time.perf_counter(), 0
                for k, (xb, _) in enumerate(pipe.batches(args.batch_size, shuffle=True, augment=True, generator=g)):
                    seen += len(xb)
                    if k + 1 == args.loader_batches:
                        break
                rates[name]["loader"].append(seen / (time.perf_counter() - start))
                _, _, images, seconds, _ = trainer.train_steps(args.train_steps)
                rates[name]["train"].append(images / seconds)
    figures: dict[str, Any] = {}
    print(f"{args.rounds} alternating rounds on {torch.get_num_threads()} CPU threads: median images/s")
    print(f"{'':40s} {args.ref:>12s} {'HEAD':>12s} {'change':>8s}")
    for key, label in (("loader", "loader (pad-crop + flip, 32 px)"), ("train", "training step (ResNet-18, fp32)")):
        before, after = statistics.median(rates["ref"][key]), statistics.median(rates["head"][key])
        # the ratio of each round's pair: the drift of the machine cancels within a round
        pairs = sorted(h / b for h, b in zip(rates["head"][key], rates["ref"][key], strict=True))
        figures[key] = {"ref": before, "head": after, "median_pair_ratio": statistics.median(pairs)}
        print(f"{label:40s} {before:12.0f} {after:12.0f} {statistics.median(pairs) - 1:+8.1%}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ref": args.ref,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "figures": figures,
                    "rates": rates,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
