"""Datasets -> uint8 tensors: the official CIFAR-10 release and folders of images.

Images are decoded once into one uint8 array (cached next to the data for image folders) and from then on
live as a single ``N x 3 x H x W`` uint8 tensor; augmentation happens on whole batches on the training
device (``augment.py``), never per image in Python.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sft_optuna.config import DataConfig
from sft_optuna.errors import DataError
from sft_optuna.training.decode import PROGRESS_EVERY_S, Decoded, decode_images

__all__ = [
    "CIFAR10_CLASSES",
    "PROGRESS_EVERY_S",
    "Dataset",
    "Splits",
    "dataset_size",
    "load_cifar10",
    "load_dataset",
    "load_imagefolder",
    "load_splits",
    "make_splits",
    "split_indices",
    "stratified_split",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory: uint8 images ``N x 3 x H x W``, int64 labels, class names."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    def checksum(self) -> str:
        """sha256 of the images and labels (for model cards: which data a result came from)."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    """What a trial trains and validates on; the test split is not here on purpose."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int


def _unpickle(path: Path) -> dict[bytes, object]:
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="bytes")  # noqa: S301 - the official CIFAR-10 format is pickled


def load_cifar10(root: str | Path, download: bool = False) -> Dataset:
    """The official CIFAR-10 python release under ``root/cifar-10-batches-py`` (torchvision's layout)."""
    base = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((base / n).is_file() for n in names):
        if not download:
            raise DataError(
                f"CIFAR-10 not found: expected {base}/data_batch_1..5 and test_batch (data.download: false); "
                f"set data.download: true (needs network), or unpack cifar-10-python.tar.gz from {CIFAR10_URL} "
                f"into {Path(root)}"
            )
        _download_cifar10(Path(root))
    try:
        batches = [_unpickle(base / n) for n in names]
        meta = _unpickle(base / "batches.meta") if (base / "batches.meta").is_file() else {}
        xs = [np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches]
        ys = [np.asarray(b[b"labels"], dtype=np.int64) for b in batches]
    except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{base}: not the CIFAR-10 python format ({exc!r})") from None
    label_names = meta.get(b"label_names") if isinstance(meta, dict) else None
    classes = tuple(n.decode() for n in label_names) if isinstance(label_names, list) else CIFAR10_CLASSES
    return Dataset(
        train_x=torch.from_numpy(np.concatenate(xs[:5])),
        train_y=torch.from_numpy(np.concatenate(ys[:5])),
        test_x=torch.from_numpy(xs[5]),
        test_y=torch.from_numpy(ys[5]),
        classes=classes,
    )


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets.utils import check_integrity, download_url

    archive = root / "cifar-10-python.tar.gz"
    if archive.is_file() and not check_integrity(str(archive), CIFAR10_MD5):
        raise DataError(
            f"{archive}: its checksum is wrong (not the official cifar-10-python.tar.gz, or a partial copy); "
            f"copy it again from {CIFAR10_URL}, or delete it to download it"
        )
    log.info("downloading CIFAR-10 from %s into %s", CIFAR10_URL, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_url(CIFAR10_URL, str(root), filename="cifar-10-python.tar.gz", md5=CIFAR10_MD5)
        with tarfile.open(root / "cifar-10-python.tar.gz", "r:gz") as tar:
            tar.extractall(root, filter="data")
    except Exception as exc:  # noqa: BLE001 - any network/disk failure is the same message to a user
        raise DataError(
            f"cannot download CIFAR-10 into {root} ({type(exc).__name__}: {str(exc)[:100]}); offline, either copy "
            f"cifar-10-python.tar.gz (from {CIFAR10_URL}, fetched on a machine with network) into {root} and run "
            "again, or use your own images: studies/smoke-imagefolder.yaml with --data-root DIR holding "
            "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg"
        ) from None


def _list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders (hidden ones skipped) and their image files; a class folder without images is refused:
    it would become a class no image ever shows, skewing the head and the confusion matrix."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = [p for p in sorted((split_dir / cls).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise DataError(
                f"{split_dir / cls}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        files += [(p, label) for p in found]
    if len(classes) < 2:
        raise DataError(f"{split_dir}: {len(classes)} class folder(s); a classifier needs at least two")
    return classes, files


def _decode(files: list[tuple[Path, int]], size: int, resize: str, out: Path | None, desc: str) -> Decoded:
    """Decode ``files`` (see :func:`decode.decode_images`); one name for tests to watch."""
    return decode_images(files, size, resize, out, desc)


CACHE_VERSION = 2
"""Bumped whenever the cached pixels of the same files would differ (v2: the aspect ratio kept, NHWC .npy)."""


def _cache_key(files: list[tuple[Path, int]], size: int, resize: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{resize}".encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.name}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _list_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"image folder not found: expected {split_dir}/<class>/*.jpg (or {', '.join(IMAGE_EXTENSIONS[:2])}, ...): "
            "set data.root, or give this command --data-root"
        )
    return _list_images(split_dir)


def _list_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Class names and the image files of ``train/`` and ``test/``; both splits must have the same classes."""
    classes, train_files = _list_split(root, "train")
    test_classes, test_files = _list_split(root, "test")
    if test_classes != classes:
        raise DataError(f"{root}: train and test have different class folders ({classes} vs {test_classes})")
    return classes, train_files, test_files


def _decode_cached(
    root: Path, split: str, files: list[tuple[Path, int]], size: int, resize: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``files`` decoded once into ``N x size x size x 3`` uint8 (a read-only memory map of the cache), their
    labels and which decoded; later calls with the same files (names, sizes, mtimes) and settings read the
    cache. Workers of one node that start together decode once: the first holds the cache's lock, the rest
    wait for it and read what it wrote."""
    from filelock import FileLock

    split_dir = root / split
    cache_dir = Path(os.environ.get("SFT_OPTUNA_CACHE", root / ".sft-optuna-cache"))
    base = cache_dir / f"{split}-{_cache_key(files, size, resize)}"
    pixels, meta = base.with_name(base.name + ".npy"), base.with_name(base.name + ".labels.npz")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / ".gitignore").write_text("*\n")  # a derived cache: never shows up in a user's git status
        lock = FileLock(str(base) + ".lock")
        lock.acquire()
    except OSError as exc:
        log.warning("cannot cache decoded images in %s (%s); decoding into memory, again next time", cache_dir, exc)
        decoded = _decode(files, size, resize, None, f"decoding {split_dir}")
        _report(decoded, split_dir, size)
        return decoded.x, decoded.y, decoded.ok
    decoded_now = False
    try:
        if not (pixels.is_file() and meta.is_file()):
            decoded_now = True
            tmp = base.with_name(f"{base.name}.{os.getpid()}.tmp.npy")
            tmp_meta = base.with_name(f"{base.name}.{os.getpid()}.tmp.npz")
            try:
                decoded = _decode(files, size, resize, tmp, f"decoding {split_dir}")
                _report(decoded, split_dir, size)
                np.savez(tmp_meta, y=decoded.y, ok=decoded.ok)
                tmp_meta.replace(meta)
                tmp.replace(pixels)  # last: a cache with pixels is whole
            finally:  # a decode cut short (Ctrl-C, a full disk) leaves no half-written file of the split's size
                tmp.unlink(missing_ok=True)
                tmp_meta.unlink(missing_ok=True)
    finally:
        lock.release()
    with np.load(meta) as labels:
        y, ok = labels["y"], labels["ok"]
    if not ok.all() and not decoded_now:  # (a fresh decode has said so, naming them)
        log.warning(
            "%s: %d image(s) that could not be decoded are skipped (cached in %s)",
            split_dir,
            int((~ok).sum()),
            cache_dir,
        )
    elif not decoded_now:
        log.info("%s: decoded images read from the cache in %s", split_dir, cache_dir)
    # copy-on-write: torch wants writable arrays; nothing writes, so the pages stay the shared page cache's
    return np.load(pixels, mmap_mode="c"), y, ok


def _report(decoded: Decoded, split_dir: Path, size: int) -> None:
    """What a person should hear about a freshly decoded folder: skipped images, and a folder too small."""
    bad = int((~decoded.ok).sum())
    if bad:
        log.warning(
            "%s: skipped %d image(s) that cannot be decoded (first: %s)", split_dir, bad, "; ".join(decoded.failures)
        )
    if decoded.ok.any() and decoded.smallest_side < size:
        log.warning(
            "%s: every image is smaller than data.image_size %d (the largest shorter side is %d px): all are "
            "upsampled; a smaller data.image_size trains faster on the same pixels",
            split_dir,
            size,
            decoded.smallest_side,
        )


def _nchw(x: np.ndarray) -> torch.Tensor:
    """Stored NHWC images (in memory or memory-mapped) -> the N x C x H x W tensor the rest of the code sees: a
    view, no copy (the pipeline turns it back into NHWC for free)."""
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def load_imagefolder(
    root: str | Path, image_size: int = 32, train_subset: tuple[int, int] | None = None, resize: str = "center_crop"
) -> Dataset:
    """``root/train/<class>/*`` and ``root/test/<class>/*``, decoded once and cached as uint8; images that
    cannot be decoded are left out.

    ``train_subset=(n, seed)``: only a stratified, seeded ``n`` of the training images are decoded — the same
    ones ``stratified_split(train_y, n, seed)`` would pick from the whole decoded set."""
    root = Path(root)
    classes, train_files, test_files = _list_folders(root)
    if train_subset is not None and 0 < train_subset[0] < len(train_files):
        labels = torch.tensor([label for _, label in train_files], dtype=torch.int64)
        keep, _ = stratified_split(labels, train_subset[0], train_subset[1])
        train_files = [train_files[i] for i in keep.tolist()]
    out = []
    for split, files in (("train", train_files), ("test", test_files)):
        x, y, ok = _decode_cached(root, split, files, image_size, resize)
        out += [_nchw(x if ok.all() else x[ok]), torch.from_numpy(y if ok.all() else y[ok])]
    return Dataset(train_x=out[0], train_y=out[1], test_x=out[2], test_y=out[3], classes=tuple(classes))


def load_dataset(cfg: DataConfig, root: str | Path | None = None, train_subset: int | None = None) -> Dataset:
    """The dataset a config names, test split included; ``root`` overrides ``cfg.root`` (a node's own data
    location). Only ``retrain`` needs this; a search needs :func:`load_splits`. ``train_subset``: an image
    folder decodes only that many training images (stratified, seeded by ``cfg.seed``), not all of them."""
    where = _root(cfg, root)
    if cfg.dataset == "cifar10":
        data = load_cifar10(where, download=cfg.download)
        if len(torch.unique(data.train_y)) < 2:
            raise DataError(f"{where}: the training images have fewer than two classes")
        return data
    subset = None if train_subset is None else (train_subset, cfg.seed)
    return load_imagefolder(where, cfg.image_size, subset, cfg.resize)


def dataset_size(cfg: DataConfig, root: str | Path | None = None) -> tuple[int, int] | None:
    """(training images before the validation split, classes) without decoding anything; None when the data is
    not on this node yet. The official CIFAR-10 release has its published sizes."""
    where = _root(cfg, root)
    if cfg.dataset == "cifar10":
        return 50_000, len(CIFAR10_CLASSES)
    if not (where / "train").is_dir():
        return None
    classes, files = _list_split(where, "train")
    return len(files), len(classes)


def _root(cfg: DataConfig, root: str | Path | None) -> Path:
    """``--data-root`` (this node's copy) over the study's ``data.root``."""
    return Path(root if root is not None else cfg.root)


def load_splits(cfg: DataConfig, root: str | Path | None = None) -> tuple[Splits, list[str]]:
    """What a trial trains and validates on, and the class names; the test split is never read.

    Image folders: the labels come from the folder listing, so the split is drawn before decoding and only
    the images it uses are decoded (with ``train_subset: 1000`` a thousand and the validation images, not
    60,000) — the same split :func:`make_splits` draws from the whole decoded set.
    """
    where = _root(cfg, root)
    if cfg.dataset == "cifar10":
        data = load_dataset(cfg, where)
        return make_splits(data, cfg), list(data.classes)
    classes, files, _ = _list_folders(where)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    val_idx, train_idx = split_indices(labels, cfg)
    # Decoded (and cached) in split order, training images first: each split is then one contiguous range of
    # the cache, used in place (a view of the memory map, read from the page cache as batches need it).
    order = torch.cat([train_idx, val_idx]).tolist()
    x, y, ok = _decode_cached(where, "train", [files[i] for i in order], cfg.image_size, cfg.resize)
    parts = []
    for rows in (slice(0, len(train_idx)), slice(len(train_idx), len(order))):
        xs, ys, oks = x[rows], y[rows], ok[rows]
        if not oks.all():  # an image that cannot be decoded is left out of its split (a copy of the rest)
            xs, ys = xs[oks], ys[oks]
        parts += [_nchw(xs), torch.from_numpy(ys)]
    splits = Splits(parts[0], parts[1], parts[2], parts[3], num_classes=len(classes))
    if len(splits.train_y) == 0 or len(splits.val_y) == 0:
        raise DataError(f"{where / 'train'}: no image of the training or validation split could be decoded")
    return splits, classes


def stratified_split(labels: torch.Tensor, n_first: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, rest): ``n_first`` of them in the class proportions of ``labels``, seeded."""
    n = len(labels)
    if not 0 < n_first < n:
        raise DataError(f"cannot take {n_first} of {n} images (data.val_size / data.train_subset)")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n_first / n
    take = quota.floor().long()
    # largest remainders get the leftover slots, so the total is exactly n_first
    leftover = n_first - int(take.sum())
    take[torch.argsort(quota - take.double(), descending=True)[:leftover]] += 1
    first: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    shuffled = labels[perm]
    for cls, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = perm[shuffled == cls]
        first.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(first).sort().values, torch.cat(rest).sort().values


def split_indices(labels: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (validation, training) into the training set: ``val_size`` held out, the rest capped at
    ``train_subset``; both stratified and seeded."""
    if cfg.val_size >= len(labels):
        raise DataError(
            f"data.val_size {cfg.val_size}: the training folder has only {len(labels)} images, which would leave "
            f"none to train on; set data.val_size below {len(labels)} (about a tenth of them)"
        )
    val_idx, train_idx = stratified_split(labels, cfg.val_size, cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < len(train_idx):
        keep, _ = stratified_split(labels[train_idx], cfg.train_subset, cfg.seed + 1)
        train_idx = train_idx[keep]
    return val_idx, train_idx


def make_splits(data: Dataset, cfg: DataConfig) -> Splits:
    """Hold ``val_size`` images out of the training set; cap the rest at ``train_subset``."""
    val_idx, train_idx = split_indices(data.train_y, cfg)
    return Splits(
        train_x=data.train_x[train_idx],
        train_y=data.train_y[train_idx],
        val_x=data.train_x[val_idx],
        val_y=data.train_y[val_idx],
        num_classes=len(data.classes),
    )
