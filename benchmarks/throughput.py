"""Throughput of sft-optuna's input pipeline and training step vs the textbook PyTorch loop, side by side.

Textbook: torchvision transforms on PIL images (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
Normalize) in a ``DataLoader(num_workers=2)``, fp32 ResNet-18, ``loss.item()`` every step.
Ours: the uint8 split resident on the device, crop/flip/normalize on whole batches there, no host sync in the
step loop, bf16 autocast + channels_last on CUDA (``sft_optuna.training.trainer.Trainer``).

Same data, same model, same batch size, same device, one run. On a GPU it also reports model FLOP utilisation:
FLOPs of one training step (``torch.utils.flop_counter``) x steps/s / a measured bf16 matmul rate.

    python benchmarks/throughput.py --device cpu                # CI-sized, a couple of minutes on 2 cores
    python benchmarks/throughput.py --device cuda --json out.json
    python benchmarks/throughput.py --data ROOT                 # an image folder (e.g. the CIFAR-10 JPEG copy)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.training.augment import BatchPipeline, channel_stats
from sft_optuna.training.data import Splits, load_imagefolder
from sft_optuna.training.model import build_model
from sft_optuna.training.trainer import Trainer


class TextbookDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """What ``torchvision.datasets.CIFAR10`` does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Any) -> None:
        self.x = x.transpose(0, 2, 3, 1).copy()  # CIFAR10.data is N x H x W x C
        self.y = y
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def textbook_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, mean: torch.Tensor, std: torch.Tensor, device: torch.device
) -> DataLoader:  # type: ignore[type-arg]
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean.tolist(), std.tolist()),
        ]
    )
    return DataLoader(
        TextbookDataset(x.numpy(), y.numpy(), tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_textbook(loader: DataLoader, device: torch.device, n_batches: int) -> float:  # type: ignore[type-arg]
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    sync(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(n_batches):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        seen += len(yb)
    sync(device)
    return seen / (time.perf_counter() - start)


def loader_ours(pipe: BatchPipeline, batch_size: int, n_batches: int) -> float:
    gen = torch.Generator(device=pipe.device).manual_seed(0)
    sum(1 for _ in pipe.batches(batch_size, shuffle=True, augment=True, generator=gen, drop_last=True))  # warm-up
    sync(pipe.device)
    start = time.perf_counter()
    seen = 0
    while seen < n_batches * batch_size:
        for xb, _yb in pipe.batches(batch_size, shuffle=True, augment=True, generator=gen, drop_last=True):
            seen += len(xb)
            if seen >= n_batches * batch_size:
                break
    sync(pipe.device)
    return seen / (time.perf_counter() - start)


def train_textbook(
    loader: DataLoader,
    model_cfg: ModelConfig,
    num_classes: int,
    device: torch.device,  # type: ignore[type-arg]
    steps: int,
    warmup: int,
    lr: float,
) -> float:
    torch.manual_seed(0)
    model = build_model(num_classes, model_cfg).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    crit = torch.nn.CrossEntropyLoss()
    it = iter(loader)
    running = 0.0
    start, seen = 0.0, 0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start, seen = time.perf_counter(), 0
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        xb, yb = xb.to(device), yb.to(device)
        if model_cfg.image_size != xb.shape[-1]:
            xb = F.interpolate(xb, size=model_cfg.image_size, mode="bilinear", align_corners=False)
        opt.zero_grad()
        loss = crit(model(xb), yb)
        loss.backward()
        opt.step()
        running += loss.item()
        seen += len(yb)
    sync(device)
    return seen / (time.perf_counter() - start)


def train_ours(trainer: Trainer, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, compile seconds) over ``steps`` steps after ``warmup`` steps."""
    _, _, _, _, compile_s = trainer.train_steps(warmup)
    seen_total, seconds_total = 0, 0.0
    while seen_total < steps * trainer.cfg.batch_size:
        remaining = steps - seen_total // trainer.cfg.batch_size
        _, _, seen, seconds, _ = trainer.train_steps(remaining)
        seen_total += seen
        seconds_total += seconds
    return seen_total / seconds_total, compile_s


def step_flops(model_cfg: ModelConfig, num_classes: int, batch_size: int, device: torch.device) -> float:
    """FLOPs of one forward + backward pass of a batch (as counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(num_classes, model_cfg).to(device)
    x = torch.randn(batch_size, 3, model_cfg.image_size, model_cfg.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s on the device (the denominator of MFU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def rss_mb() -> float:
    """Current resident set size of this process (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    if args.data:
        ds = load_imagefolder(args.data)
        n = min(args.images, len(ds.train_y))
        pick = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(0))[:n]
        return ds.train_x[pick], ds.train_y[pick], len(ds.classes), f"{args.data} ({n} random training images)"
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    return x, y, 10, f"generated, {args.images} images 32x32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None, help="image folder root (default: generated images)")
    parser.add_argument("--images", type=int, default=4096, help="training images to use")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    parser.add_argument("--loader-batches", type=int, default=None, help="default: 30 on CPU, 200 on CUDA")
    parser.add_argument("--train-steps", type=int, default=None, help="default: 8 on CPU, 100 on CUDA")
    parser.add_argument("--image-size", type=int, default=32, help="model input side (upsampled on device)")
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also our step replayed from a CUDA graph (train.cuda_graph: on)"
    )
    parser.add_argument("--memory-epochs", type=int, default=5, help="epochs of the host-memory check (0: skip)")
    parser.add_argument(
        "--memory-images",
        type=int,
        default=None,
        help="images per memory-check epoch (default: 1024 on CPU, all on CUDA)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = args.batch_size or (256 if cuda else 128)
    loader_batches = args.loader_batches or (200 if cuda else 30)
    steps = args.train_steps or (100 if cuda else 8)
    warmup = 10 if cuda else 2
    rss_start = rss_mb()

    x, y, num_classes, data_desc = load_data(args)
    mean, std = channel_stats(x)
    model_cfg = ModelConfig(weights="none", stem=args.stem, image_size=args.image_size)
    loader = textbook_loader(x, y, bs, mean, std, device)
    pipe = BatchPipeline(x, y, mean, std, device, args.image_size, channels_last=True)

    print(
        f"device {device} ({torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}), "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; data: {data_desc}; batch {bs}; "
        f"model ResNet-18 stem {args.stem} at {args.image_size}px",
        flush=True,
    )

    tb_loader = loader_textbook(loader, device, loader_batches)
    our_loader = loader_ours(pipe, bs, loader_batches)
    tb_train = train_textbook(loader, model_cfg, num_classes, device, steps, warmup, lr=0.05)

    splits = Splits(x, y, x[:bs], y[:bs], num_classes)
    results: dict[str, Any] = {}
    # Ours at the textbook's precision (fp32) and, on CUDA, at our default (bf16 autocast).
    ours_cfgs = {"fp32": TrainConfig(batch_size=bs, lr=0.05, precision="fp32", compile=args.compile)}
    if cuda:
        ours_cfgs["bf16"] = TrainConfig(batch_size=bs, lr=0.05, precision="bf16", compile=args.compile)
    if args.cuda_graph:  # on the CPU the step stays eager (graphs are CUDA's): the row then measures eager again
        ours_cfgs["graph"] = TrainConfig(batch_size=bs, lr=0.05, precision="bf16" if cuda else "fp32", cuda_graph="on")
    graph_failed = None
    for name, cfg in ours_cfgs.items():
        trainer = Trainer(splits, model_cfg, cfg, device, seed=0)
        results[name] = train_ours(trainer, steps, warmup)
        if name == "graph":
            graph_failed = trainer.graph.failed if trainer.graph is not None else None
    default = "bf16" if cuda else "fp32"
    our_train, compile_s = results[default]

    flops = step_flops(model_cfg, num_classes, bs, device) / bs  # per image, forward + backward
    peak = matmul_rate(device, torch.bfloat16 if cuda else torch.float32)
    mfu = {k: v[0] * flops / peak for k, v in results.items()}
    mfu_textbook = tb_train * flops / peak

    memory: list[float] = []
    if args.memory_epochs:
        n_mem = args.memory_images or (len(y) if cuda else min(1024, len(y)))
        mem_splits = Splits(x[:n_mem], y[:n_mem], x[:bs], y[:bs], num_classes)
        trainer = Trainer(mem_splits, model_cfg, TrainConfig(batch_size=bs, lr=0.05), device, seed=0)
        for _ in range(args.memory_epochs):
            trainer.train_steps()
            memory.append(rss_mb())
    dataset_mb = x.numel() / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in build_model(num_classes, model_cfg).parameters()) / 2**20

    figures = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": data_desc,
        "batch_size": bs,
        "image_size": args.image_size,
        "stem": args.stem,
        "textbook_loader_images_per_s": round(tb_loader, 1),
        "ours_loader_images_per_s": round(our_loader, 1),
        "loader_speedup": round(our_loader / tb_loader, 2),
        "textbook_train_images_per_s": round(tb_train, 1),
        "ours_train_images_per_s": round(our_train, 1),
        "ours_train_fp32_images_per_s": round(results["fp32"][0], 1),
        "train_speedup": round(our_train / tb_train, 2),
        "train_speedup_same_precision": round(results["fp32"][0] / tb_train, 2),
        "compile_seconds": round(compile_s, 2),
        "flops_per_image_train": flops,
        "matmul_flops_per_s": peak,
        "mfu_textbook": round(mfu_textbook, 4),
        "mfu_ours": round(mfu[default], 4),
        "ours_train_graphed_images_per_s": round(results["graph"][0], 1) if "graph" in results else None,
        "mfu_ours_graphed": round(mfu["graph"], 4) if "graph" in results else None,
        "graph_capture_failed": graph_failed,
        "rss_mb_after_import": round(rss_start, 1),
        "rss_mb_per_epoch": [round(m, 1) for m in memory],
        "dataset_uint8_mb": round(dataset_mb, 1),
        "model_params_mb": round(model_mb, 1),
    }

    rows = [
        ("loader images/s", tb_loader, our_loader),
        (f"train images/s (ours {default})", tb_train, our_train),
        ("train images/s (both fp32)", tb_train, results["fp32"][0]),
        (f"MFU vs {'bf16' if cuda else 'fp32'} matmul {peak / 1e12:.2f} TFLOP/s", mfu_textbook, mfu[default]),
    ]
    if "graph" in results:
        rows += [
            ("train images/s (ours, CUDA graph)", tb_train, results["graph"][0]),
            ("MFU (ours, CUDA graph)", mfu_textbook, mfu["graph"]),
        ]
    print(f"\n{'figure':<48}{'textbook':>14}{'sft-optuna':>14}{'ratio':>9}")
    for label, a, b in rows:
        fmt = "{:>14.1%}" if label.startswith("MFU") else "{:>14.0f}"
        print(f"{label:<48}" + fmt.format(a) + fmt.format(b) + f"{b / a:>8.2f}x")
    if memory:
        print(
            f"\nhost RSS after import {rss_start:.0f} MiB; after each of {len(memory)} epochs: "
            + ", ".join(f"{m:.0f}" for m in memory)
            + f" MiB (uint8 data {dataset_mb:.0f} MiB, model {model_mb:.0f} MiB)"
        )
    if args.compile:
        print(f"torch.compile took {compile_s:.1f} s (not counted in images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
