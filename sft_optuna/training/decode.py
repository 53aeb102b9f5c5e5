"""Decoding a folder of photos into one uint8 array, fast: the node's cores, JPEG's own downscaling, a cache.

A user's photos are thousands to hundreds of thousands of JPEGs of any size; a trial wants squares of
``data.image_size``. Each image is decoded once: in worker processes (one per core), with PIL's ``draft`` —
for a large JPEG, the decoder itself scales by 1/2, 1/4 or 1/8 in the DCT domain, several times less work than
decoding every pixel and resizing after (decoders measured: ``benchmarks/decode.py``) — then
its shorter side is resized to the stored size and the centre square kept (``data.resize: center_crop``; or
both sides, ``squash``). The workers write straight into a memory-mapped ``.npy`` file (``N x H x W x 3``),
which is the cache: a re-run memory-maps it instead of decoding, and so do the other workers of the node (the
first one decodes, under a file lock, while the rest wait for it). An image that cannot be decoded is skipped
and counted, never fatal.

Imports only numpy and PIL: the decoding processes start without torch (seconds and ~400 MB each).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PROGRESS_EVERY_S", "Decoded", "decode_image", "decode_images", "decode_workers"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""How often a long decode or epoch says how far it got in a log file (no progress bar there)."""
CHUNK = 64
"""Images per task handed to a decoding process: large enough that the task's overhead (a pickled list of
paths, one reply) is small beside decoding 64 JPEGs, small enough that a progress bar moves."""
MIN_PARALLEL = 256
"""Fewer images than this are decoded in the calling process: starting processes would cost more."""


@dataclass(frozen=True)
class Decoded:
    """What decoding a list of files gave: the images (``N x size x size x 3``, a memory map when cached), their
    labels, which ones decoded, and what a person should hear about the folder."""

    x: np.ndarray
    y: np.ndarray
    ok: np.ndarray
    """False for an image that could not be decoded (its row of ``x`` is zeros): skipped by every split."""
    failures: list[str]
    """``path: reason`` of the first few images that could not be decoded."""
    smallest_side: int
    """The largest shorter side among the images (0 when none decoded): below ``size``, every image was upsampled."""


def decode_image(path: str, size: int, resize: str) -> tuple[np.ndarray, int]:
    """One image file -> (``size x size x 3`` uint8 RGB, its original shorter side), its EXIF orientation applied
    (a portrait phone photo stored sideways comes out upright). Raises ``OSError`` (or ``ValueError``,
    ``SyntaxError`` from PIL's parsers) when it cannot be decoded.

    ``resize``: ``center_crop`` scales the shorter side to ``size`` and keeps the centre square (the aspect ratio
    is kept); ``squash`` scales both sides to ``size``. An image already ``size`` x ``size`` is kept as it is.

    PIL decodes: with ``draft``, a JPEG at least twice the stored size is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain (a 4,000-px photo read as 500 px: a fraction of the work). torchvision's ``decode_jpeg`` is 1.2x
    faster on one core for small JPEGs, but a decoding process that imports torch for it costs seconds and
    ~400 MB more (one per core), and decoded no faster here in a pool of processes (``benchmarks/decode.py``).
    """
    from PIL import Image

    with Image.open(path) as img:
        shorter = min(img.size)
        orientation = img.getexif().get(0x0112, 1)
        # JPEG only (a no-op otherwise): decode at the smallest 1/2^k scale that still covers size x size
        img.draft("RGB", (size, size))
        rgb = img.convert("RGB")
        w, h = rgb.size
        if (w, h) != (size, size):
            box = None
            if resize == "center_crop":
                s = min(w, h)
                box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            # downscaling: area averaging (BOX, OpenCV's INTER_AREA), 1.7x faster than PIL's BILINEAR filter,
            # whose support widens with the scale; enlarging a small photo: bilinear
            shrink = min(w, h) > size
            rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR, box=box)
        # EXIF orientation last, on the small square: the centre square (and a squash to a square) commutes with
        # each of the eight flips and turns, and turning 256 px costs nothing beside turning the whole photo
        turn = _ORIENTATIONS.get(orientation)
        return np.asarray(rgb.transpose(Image.Transpose(turn)) if turn is not None else rgb), shorter


_ORIENTATIONS = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}
"""EXIF orientation -> PIL's ``Image.Transpose`` value that shows the photo upright (as ``ImageOps.exif_transpose``:
2 mirror, 3 turn 180, 4 flip, 5 transpose, 6 turn 270, 7 transverse, 8 turn 90); 1 and unknown: as stored."""


def _decode_chunk(
    paths: Sequence[str], start: int, size: int, resize: str, out: str | None, arr: np.ndarray | None = None
) -> tuple[int, list[bool], list[str], int]:
    """Decode ``paths`` into rows ``start..`` of ``arr`` or of the ``.npy`` file ``out`` (a decoding process
    opens it as a memory map). Returns (start, ok per image, failures, largest shorter side)."""
    target = arr if arr is not None else np.load(out, mmap_mode="r+")  # type: ignore[arg-type]
    ok: list[bool] = []
    failures: list[str] = []
    side = 0
    for i, path in enumerate(paths):
        try:
            target[start + i], shorter = decode_image(path, size, resize)
            side = max(side, shorter)
            ok.append(True)
        except Exception as exc:  # noqa: BLE001 - whatever one file does (truncated, a decompression bomb), skip it
            ok.append(False)
            failures.append(f"{path}: {exc}")
    # no flush: the rows sit in the page cache, which the caller's own memory map of the file shares (an msync
    # per chunk wrote the whole cache to disk synchronously and halved the decoding rate)
    return start, ok, failures, side


def decode_workers() -> int:
    """Decoding processes: one per core this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


class _Progress:
    """A bar at a terminal; plain lines every ~30 s in a log file (no carriage returns there)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="img", mininterval=1.0, leave=False, disable=not self.tty)
        self.desc, self.total, self.done = desc, total, 0
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if not self.tty and time.monotonic() - self.last >= PROGRESS_EVERY_S:
            log.info("%s: %d/%d images decoded", self.desc, self.done, self.total)
            self.last = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def decode_images(
    files: Sequence[tuple[Path, int]],
    size: int,
    resize: str,
    out: Path | None,
    desc: str,
    workers: int | None = None,
) -> Decoded:
    """Decode ``files`` (path, label) into ``size`` x ``size`` squares: into the ``.npy`` file ``out`` (created
    here, memory-mapped) or, with ``out=None``, into memory. ``workers`` processes (default: one per core; the
    calling process alone below :data:`MIN_PARALLEL` images)."""
    n = len(files)
    shape = (n, size, size, 3)
    x: np.ndarray = (
        np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=shape)
        if out is not None
        else np.zeros(shape, dtype=np.uint8)
    )
    y = np.array([label for _, label in files], dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    failures: list[str] = []
    side = 0
    workers = decode_workers() if workers is None else workers
    paths = [str(p) for p, _ in files]
    progress = _Progress(n, desc)
    start_time = time.perf_counter()
    try:
        if workers <= 1 or n < MIN_PARALLEL or out is None:
            results = (_decode_chunk(paths[s : s + CHUNK], s, size, resize, None, x) for s in range(0, n, CHUNK))
            for result in results:
                side = _collect(result, ok, failures, side, progress)
        else:
            # spawn, not fork: the caller may hold torch's threads, which a forked child would inherit half-locked
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    futures = [
                        pool.submit(_decode_chunk, paths[s : s + CHUNK], s, size, resize, str(out))
                        for s in range(0, n, CHUNK)
                    ]
                    for future in as_completed(futures):
                        side = _collect(future.result(), ok, failures, side, progress)
            except BrokenProcessPool as exc:
                # a decoding process could not start or died (a __main__ that spawn cannot import, memory): the
                # images are decoded here instead, slower but whole
                log.warning("%s: decoding processes failed (%s); decoding in this process", desc, exc)
                for s in range(0, n, CHUNK):
                    chunk = _decode_chunk(paths[s : s + CHUNK], s, size, resize, None, x)
                    side = _collect(chunk, ok, failures, side, None)
    finally:
        progress.close()
    seconds = time.perf_counter() - start_time
    log.info(
        "%s: %d images in %.1f s (%.0f images/s, %d process%s)",
        desc,
        n,
        seconds,
        n / max(seconds, 1e-9),
        workers if n >= MIN_PARALLEL and out is not None else 1,
        "es" if workers > 1 and n >= MIN_PARALLEL and out is not None else "",
    )
    return Decoded(x, y, ok, failures, side)


def _collect(
    result: tuple[int, list[bool], list[str], int],
    ok: np.ndarray,
    failures: list[str],
    side: int,
    progress: _Progress | None,
) -> int:
    start, flags, errors, chunk_side = result
    ok[start : start + len(flags)] = flags
    failures += errors[: max(0, 5 - len(failures))]
    if progress is not None:
        progress.update(len(flags))
    return max(side, chunk_side)
