"""A folder of photos: first decode, cached re-read and the training loader, side by side with torchvision's
``ImageFolder`` + ``RandomResizedCrop`` + ``DataLoader(num_workers=N)`` on the same cores (#26).

It generates (once, into ``--dir``) a folder of ``--images`` JPEGs of mixed sizes (300-1,000 px a side, mixed
aspect ratios, ten classes), then measures in one run:

- **decoders**: images/s of one process decoding to a 256-px square — sft-optuna's (PIL with ``draft``, JPEG's
  DCT-domain downscaling, and area resampling), PIL without them, and ``torchvision.io.decode_jpeg`` + resize
  (after a warm-up: its first call in a process pays for importing torch);
- **first decode**: sft-optuna's decode of the whole folder into its cache (``--workers`` processes);
- **cached read**: the same call again, reading the memory-mapped cache into memory (what every later
  worker and run pays);
- **loader**: training batches at 224 px with RandomResizedCrop + flip from the decoded uint8 split
  (``BatchPipeline`` on ``--device``, every image of an epoch);
- **baseline**: one epoch of ``ImageFolder`` + ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` +
  ``PILToTensor`` through ``DataLoader(num_workers=--workers, batch_size=256)`` — decoding every JPEG, every epoch.

Goals: loader >= 10x the baseline once cached; first decode at least as fast as the baseline's one epoch.

    python benchmarks/decode.py --dir /tmp/photos --images 10000 --json benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sft_optuna.training.decode import decode_image, decode_images

# torch is imported inside the functions that use it: the decoding processes start by importing this script
# (spawn), and a worker's own main module (the sft-optuna command) does not import torch either.

SIZE, CROP, BATCH = 256, 224, 256
CLASSES = 10


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``root/train/class<k>/<i>.jpg``: smooth random photos-to-be with a class colour, 300-1,000 px a side."""
    split = root / "train"
    if split.is_dir() and sum(1 for _ in split.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(300, 1001, size=2))
        label = i % CLASSES
        coarse = rng.integers(0, 256, size=(max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        tint = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)) if label else (200, 40, 40))
        img = Image.blend(img, tint, 0.3)
        d = split / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root


def _list(root: Path) -> list[tuple[Path, int]]:
    """(file, label) of ``root/train/<class>/*.jpg``, classes in name order."""
    classes = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    return [(f, label) for label, d in enumerate(classes) for f in sorted(d.glob("*.jpg"))]


def _decoders(files: list[tuple[Path, int]], n: int) -> dict[str, float]:
    """Images/s of one process decoding ``n`` files to SIZE x SIZE with each decoder available here."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_jpeg, read_file

    sample = [str(p) for p, _ in files[:n]]
    out: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        start = time.perf_counter()
        for path in sample:
            fn(path)
        out[name] = n / (time.perf_counter() - start)

    def pil_plain(path: str) -> np.ndarray:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            w, h = rgb.size
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            return np.asarray(rgb.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box))

    def tv_decode(path: str) -> Any:
        img = decode_jpeg(read_file(path))
        img = TF.resize(img, [SIZE], antialias=True)
        return TF.center_crop(img, [SIZE, SIZE])

    timed("sft-optuna: PIL + draft + area resize + EXIF", lambda p: decode_image(p, SIZE, "center_crop"))
    timed("PIL, no draft, bilinear resize", pil_plain)
    tv_decode(sample[0])  # warm-up
    timed("torchvision.io.decode_jpeg + resize", tv_decode)
    return out


def _baseline(root: Path, workers: int, images: int) -> float:
    """Images/s of one epoch through torchvision's textbook pipeline."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(root / "train"), tf), batch_size=BATCH, shuffle=True, num_workers=workers
    )
    start = time.perf_counter()
    seen = sum(len(y) for _, y in loader)
    assert seen == images
    return seen / (time.perf_counter() - start)


def _loader(x: np.ndarray, y: np.ndarray, device_name: str, threads: int) -> float:
    """Images/s of one epoch of training batches (RandomResizedCrop 224 + flip) from the uint8 split."""
    import torch

    from sft_optuna.config import AugmentConfig
    from sft_optuna.training.augment import BatchPipeline, channel_stats

    torch.set_num_threads(threads)
    device = torch.device(device_name)

    xs = torch.from_numpy(x).permute(0, 3, 1, 2)
    mean, std = channel_stats(xs[:500])
    pipe = BatchPipeline(xs, torch.from_numpy(y), mean, std, device, CROP, True, AugmentConfig(crop="resized"))
    gen = torch.Generator(device=device).manual_seed(0)
    next(iter(pipe.batches(BATCH, shuffle=True, augment=True, generator=gen, drop_last=True)))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    seen = 0
    for xb, _ in pipe.batches(BATCH, shuffle=True, augment=True, generator=gen, drop_last=True):
        seen += len(xb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sft-optuna-photos"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoder-sample", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of sft-optuna's side and the baseline")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    root = make_folder(args.dir, args.images)
    print(f"folder: {args.images} JPEGs under {root} ({time.perf_counter() - start:.0f} s to make or find)")
    files = _list(root)
    cache = args.dir / "cache.npy"
    # rounds alternate the two sides: a shared machine that gets busier or quieter slows both alike
    firsts, cacheds, loaders, baselines = [], [], [], []
    for r in range(args.rounds):
        cache.unlink(missing_ok=True)
        start = time.perf_counter()
        decoded = decode_images(files, SIZE, "center_crop", cache, "decoding", workers=args.workers)
        firsts.append(len(files) / (time.perf_counter() - start))
        start = time.perf_counter()
        x = np.array(np.load(cache, mmap_mode="r"))  # what a re-run reads: the memory map, into memory
        cacheds.append(len(files) / (time.perf_counter() - start))
        loaders.append(_loader(x, decoded.y, args.device, args.workers))
        baselines.append(_baseline(root, args.workers, args.images))
        print(f"round {r + 1}: first decode {firsts[-1]:.0f}, baseline {baselines[-1]:.0f} images/s", flush=True)
    first, cached = statistics.median(firsts), statistics.median(cacheds)
    loader, baseline = statistics.median(loaders), statistics.median(baselines)
    decoders = _decoders(files, args.decoder_sample)
    rows = [
        ("baseline: ImageFolder + RandomResizedCrop + DataLoader, one epoch", baseline, ""),
        ("sft-optuna first decode (into the cache)", first, f"goal >= {baseline:.0f} (baseline epoch)"),
        ("sft-optuna cached read (memory map -> memory)", cached, ""),
        ("sft-optuna loader, RandomResizedCrop 224 + flip", loader, f"goal >= {10 * baseline:.0f} (10x baseline)"),
    ]
    print(
        f"\nmedians of {args.rounds} rounds; {args.images} JPEGs 300-1,000 px, stored at {SIZE} px, trained at "
        f"{CROP} px; {args.workers} cores; loader on {args.device}"
    )
    print(f"{'':66s} {'images/s':>9s}  {'x baseline':>10s}")
    for name, ips, goal in rows:
        print(f"{name:66s} {ips:9.0f}  {ips / baseline:9.2f}x  {goal}")
    print("\ndecoders (one process, to 256 px squares):")
    for name, ips in decoders.items():
        print(f"  {name:52s} {ips:7.0f} images/s")
    result = {
        "images": args.images,
        "stored_px": SIZE,
        "crop_px": CROP,
        "workers": args.workers,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "images_per_s": {"baseline_epoch": baseline, "first_decode": first, "cached_read": cached, "loader": loader},
        "rounds": {"first_decode": firsts, "cached_read": cacheds, "loader": loaders, "baseline_epoch": baselines},
        "decoders_images_per_s": decoders,
        "goals": {"loader_vs_baseline": loader / baseline, "first_decode_vs_baseline": first / baseline},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
