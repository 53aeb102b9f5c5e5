"""Real transfer, offline: pretrain on half of CIFAR-10, fine-tune on the other half with each recipe (#26).

No ImageNet weights can be had here, so the fine-tuning knobs are judged on a transfer made here: ResNet-18 is
pretrained from scratch on CIFAR-10's classes 0-4 (airplane, automobile, bird, cat, deer) from the JPEG copy in
``../shared/data/``, its state dict saved; then each recipe fine-tunes it on classes 5-9 (dog, frog, horse, ship,
truck) — a separate image folder read by the project's own loaders — for the same epochs, over seeds:

- ``plain``: the pretrained weights, every layer at ``lr``;
- ``backbone_lr_scale``: the backbone at ``lr`` x 0.1, the new head at ``lr``;
- ``lp-ft``: the head alone for the first ``--freeze-epochs`` (a linear probe), then everything (Kumar et al.);
- ``frozen bn``: BatchNorm keeps the pretrained statistics;
- ``scratch``: random initialisation (what pretraining is worth).

It prints validation accuracy (mean ± std over seeds) per recipe, and writes the table and every curve as JSON.

    python benchmarks/transfer.py --json benchmarks/results/transfer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

from sft_optuna.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from sft_optuna.training.data import load_splits
from sft_optuna.training.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
SOURCE = ("airplane", "automobile", "bird", "cat", "deer")
TARGET = ("dog", "frog", "horse", "ship", "truck")


def unpack(archive: Path, into: Path) -> Path:
    """The JPEG copy of CIFAR-10 unpacked (once) into ``into``: ``into/train/<class>``, ``into/test/<class>``."""
    if not (into / "train" / "airplane").is_dir():
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    return into


def half(root: Path, classes: tuple[str, ...], into: Path) -> Path:
    """An image folder of ``classes`` only (symbolic links to the unpacked copy)."""
    for split in ("train", "test"):
        for cls in classes:
            link = into / split / cls
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((root / split / cls).resolve(), target_is_directory=True)
    return into


def train(
    root: Path, data: DataConfig, model: ModelConfig, cfg: TrainConfig, seed: int, device: torch.device
) -> tuple[Trainer, list[dict[str, Any]]]:
    splits, _ = load_splits(dataclasses.replace(data, root=str(root)))
    trainer = Trainer(splits, model, cfg, device, seed=seed)
    curve = []
    for _ in range(cfg.epochs):
        r = trainer.run_epoch()
        curve.append({"epoch": r.epoch, "val_acc": r.val_acc, "train_loss": round(r.train_loss, 4)})
        print(f"    epoch {r.epoch}: val {r.val_acc:.4f} loss {r.train_loss:.3f} ({r.seconds:.0f} s)", flush=True)
    return trainer, curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", type=Path, default=SHARED)
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-optuna-transfer"))
    p.add_argument("--pretrain-epochs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs, equal for every recipe")
    p.add_argument("--freeze-epochs", type=int, default=2, help="LP-FT's linear-probe epochs")
    p.add_argument("--train-images", type=int, default=2500, help="fine-tuning images (the target's few labels)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate (every recipe)")
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"error: --archive {args.archive}: not found (the JPEG copy of CIFAR-10, ../shared/data)")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    start = time.perf_counter()
    full = unpack(args.archive, args.work / "cifar10-jpeg")
    source, target = half(full, SOURCE, args.work / "source"), half(full, TARGET, args.work / "target")
    # 32 px with torchvision's own stem (7x7/2 + max-pool): 16x fewer FLOPs than the CIFAR stem, so that the
    # whole table fits a CPU's hour (the CIFAR stem trains better but at ~100 images/s on 2 cores)
    model = ModelConfig(arch="resnet18", stem=args.stem, image_size=32, weights="none")
    common = dict(batch_size=128, optimizer="sgd", momentum=0.9, weight_decay=5e-4, scheduler="cosine")
    weights = args.work / f"resnet18-{args.stem}-source-{args.pretrain_epochs}ep.pt"
    pre_data = DataConfig(dataset="imagefolder", val_size=1000, image_size=32, seed=0)
    out: dict[str, Any] = {"pretrain": {}, "recipes": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    record = weights.with_suffix(".json")
    if not (weights.is_file() and record.is_file()):
        print(f"pretraining ResNet-18 on {', '.join(SOURCE)} for {args.pretrain_epochs} epochs", flush=True)
        pre_cfg = TrainConfig(epochs=args.pretrain_epochs, lr=0.1, warmup_epochs=1, **common)  # type: ignore[arg-type]
        trainer, curve = train(source, pre_data, model, pre_cfg, 0, device)
        torch.save(trainer.model.state_dict(), weights)
        record.write_text(json.dumps({"curve": curve, "val_acc": curve[-1]["val_acc"]}))
    out["pretrain"] = json.loads(record.read_text())
    print(f"pretrained weights: {weights} (val acc {out['pretrain']['val_acc']:.4f} on the source classes)", flush=True)
    data = DataConfig(dataset="imagefolder", val_size=1000, train_subset=args.train_images, image_size=32, seed=0)
    base = TrainConfig(epochs=args.epochs, lr=args.lr, augment=AugmentConfig(), **common)  # type: ignore[arg-type]
    pretrained = dataclasses.replace(model, weights=str(weights))
    recipes = {
        "plain": (pretrained, base),
        "backbone_lr_scale 0.1": (pretrained, dataclasses.replace(base, backbone_lr_scale=0.1)),
        f"lp-ft (freeze_epochs {args.freeze_epochs})": (
            pretrained,
            dataclasses.replace(base, freeze_epochs=args.freeze_epochs),
        ),
        "frozen bn": (pretrained, dataclasses.replace(base, bn="frozen")),
        "scratch": (model, base),
    }
    for name, (m, cfg) in recipes.items():
        finals, curves = [], []
        for seed in range(args.seeds):
            print(f"{name}, seed {seed}", flush=True)
            _, curve = train(target, data, m, cfg, seed, device)
            finals.append(curve[-1]["val_acc"])
            curves.append(curve)
        out["recipes"][name] = {
            "val_acc": finals,
            "mean": statistics.mean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "curves": curves,
        }
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    out["seconds"] = round(time.perf_counter() - start)
    print(
        f"\nfine-tuning on {', '.join(TARGET)}: {args.train_images} training images, 1000 validation, "
        f"{args.epochs} epochs at lr {args.lr}, {args.seeds} seeds; ResNet-18 pretrained {args.pretrain_epochs} "
        f"epochs on {', '.join(SOURCE)}"
    )
    print(f"{'recipe':32s} {'val acc':>16s}")
    for name, r in out["recipes"].items():
        print(f"{name:32s} {r['mean']:.4f} ± {r['std']:.4f}   ({', '.join(f'{v:.4f}' for v in r['val_acc'])})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
