"""Datasets: both on-disk formats load, clear errors when missing, splits are stratified and seeded."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_images, write_cifar10, write_imagefolder

from sft_optuna.config import DataConfig
from sft_optuna.errors import DataError
from sft_optuna.training import data as data_mod
from sft_optuna.training.data import (
    dataset_size,
    load_cifar10,
    load_dataset,
    load_imagefolder,
    load_splits,
    make_splits,
    stratified_split,
)


def test_official_cifar10_format_loads_images_and_labels(cifar_root: Path) -> None:
    ds = load_cifar10(cifar_root)
    x, y = make_images(500, 10, seed=1)
    assert ds.train_x.shape == (500, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert torch.equal(ds.train_x, torch.from_numpy(x)) and torch.equal(ds.train_y, torch.from_numpy(y))
    assert ds.test_x.shape == (100, 3, 32, 32)
    assert ds.classes[:2] == ("airplane", "automobile")


def test_missing_cifar10_names_expected_path_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "download: true" in message


def test_cifar10_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(DataError, match=r"cannot download CIFAR-10 .* network unreachable"):
        load_cifar10(tmp_path, download=True)


def test_imagefolder_decodes_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_imagefolder(tmp_path / "f", n_train=40, n_test=8)
    first = load_imagefolder(root)
    assert first.train_x.shape == (40, 3, 32, 32) and first.classes == ("class0", "class1", "class2", "class3")

    def no_decode(*args: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    second = load_imagefolder(root)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)


def test_imagefolder_resizes_to_the_configured_size(folder_root: Path) -> None:
    ds = load_imagefolder(folder_root, image_size=16)
    assert ds.train_x.shape[1:] == (3, 16, 16)


def test_imagefolder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        load_imagefolder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'train' / 'a'}: class folder has no images"):
        load_imagefolder(tmp_path)


def test_an_empty_class_folder_in_both_splits_is_refused_naming_it(tmp_path: Path) -> None:
    # Before: an empty class3/ in train/ and test/ became a fourth class no image shows (a 5x5 matrix here).
    root = write_imagefolder(tmp_path / "d", n_train=40, n_test=8, num_classes=4)
    for split in ("train", "test"):
        (root / split / "class9").mkdir()
    with pytest.raises(DataError, match=f"{root / 'train' / 'class9'}: class folder has no images"):
        load_imagefolder(root)
    with pytest.raises(DataError, match="class9"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root), val_size=8, image_size=32))
    # hidden folders (.ipynb_checkpoints, a cache) are not classes
    for split in ("train", "test"):
        (root / split / "class9").rmdir()
        (root / split / ".ipynb_checkpoints").mkdir()
    assert load_imagefolder(root).classes == ("class0", "class1", "class2", "class3")


def test_a_dataset_with_one_class_is_refused(tmp_path: Path) -> None:
    # Before: one class gave validation accuracy 1.0 as the study's best.
    root = write_imagefolder(tmp_path / "d", n_train=20, n_test=4, num_classes=1)
    with pytest.raises(DataError, match=r"1 class folder.*at least two"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root), val_size=4, image_size=32))
    cifar = write_cifar10(tmp_path / "c", n_train=50, n_test=10, num_classes=1)
    with pytest.raises(DataError, match="fewer than two classes"):
        load_dataset(DataConfig(dataset="cifar10", root=str(cifar)))


def test_load_splits_decodes_only_the_images_the_split_uses_and_matches_make_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_imagefolder(tmp_path / "d", n_train=200, n_test=40, num_classes=4)
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=40, train_subset=60, image_size=32)
    decoded: list[int] = []
    real = data_mod._decode

    def counting(files: list[tuple[Path, int]], size: int, resize: str, out: Path | None, desc: str) -> Any:
        decoded.append(len(files))
        return real(files, size, resize, out, desc)

    monkeypatch.setattr(data_mod, "_decode", counting)
    monkeypatch.setenv("SFT_OPTUNA_CACHE", str(tmp_path / "cache"))
    splits, classes = load_splits(cfg)
    assert decoded == [100], "validation (40) + training subset (60): neither the rest nor the test split"
    whole = make_splits(load_imagefolder(root, 32), cfg)
    for name in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(splits, name), getattr(whole, name)), name
    assert classes == ["class0", "class1", "class2", "class3"] and splits.num_classes == 4


def test_stratified_split_keeps_class_proportions_and_is_seeded() -> None:
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    first, rest = stratified_split(labels, 100, seed=3)
    assert len(first) == 100 and len(rest) == 900
    assert torch.bincount(labels[first]).tolist() == [60, 30, 10]
    assert set(first.tolist()).isdisjoint(rest.tolist())
    again, _ = stratified_split(labels, 100, seed=3)
    other, _ = stratified_split(labels, 100, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_splits_hold_out_validation_cap_training_and_never_contain_test(tmp_path: Path) -> None:
    ds = load_cifar10(write_cifar10(tmp_path))
    splits = make_splits(ds, DataConfig(val_size=100, train_subset=150))
    assert len(splits.val_y) == 100 and len(splits.train_y) == 150
    train_rows = {bytes(r.numpy()) for r in splits.train_x}
    val_rows = {bytes(r.numpy()) for r in splits.val_x}
    test_rows = {bytes(r.numpy()) for r in ds.test_x}
    assert train_rows.isdisjoint(val_rows) and test_rows.isdisjoint(train_rows | val_rows)


def test_val_size_larger_than_the_data_is_a_clear_error(cifar_root: Path) -> None:
    with pytest.raises(DataError, match=r"data\.val_size 5000: the training folder has only 500 images"):
        make_splits(load_cifar10(cifar_root), DataConfig(val_size=5000))


def test_dataset_size_counts_without_decoding(folder_root: Path, tmp_path: Path) -> None:
    assert dataset_size(DataConfig(dataset="imagefolder", root=str(folder_root))) == (200, 4)
    assert dataset_size(DataConfig(dataset="imagefolder", root=str(tmp_path / "absent"))) is None
    assert dataset_size(DataConfig(dataset="cifar10", root=str(tmp_path / "absent"))) == (50_000, 10)


def test_train_and_test_with_different_class_folders_are_refused(tmp_path: Path) -> None:
    import shutil

    root = write_imagefolder(tmp_path / "d", n_train=40, n_test=8, num_classes=4)
    shutil.rmtree(root / "test" / "class3")
    with pytest.raises(DataError, match="train and test have different class folders"):
        load_imagefolder(root)
    with pytest.raises(DataError, match="train and test have different class folders"):
        load_splits(DataConfig(dataset="imagefolder", root=str(root), val_size=8, image_size=32))


def test_a_corrupt_cifar10_archive_in_the_data_folder_is_named_with_its_checksum(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: its checksum is wrong") as err:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    assert "\n" not in str(err.value)


def _photo(path: Path, w: int, h: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).save(path)


def test_a_photo_keeps_its_aspect_ratio_center_crop_or_is_squashed(tmp_path: Path) -> None:
    from PIL import Image

    from sft_optuna.training.decode import decode_image

    _photo(tmp_path / "wide.png", 96, 48, 0)
    with Image.open(tmp_path / "wide.png") as img:
        centre = np.asarray(img.convert("RGB").crop((24, 0, 72, 48)).resize((24, 24), Image.Resampling.BOX))
        squashed = np.asarray(img.convert("RGB").resize((24, 24), Image.Resampling.BOX))
    kept, shorter = decode_image(str(tmp_path / "wide.png"), 24, "center_crop")
    assert shorter == 48 and np.array_equal(kept, centre), "shorter side to 24 px, the centre square kept"
    assert np.array_equal(decode_image(str(tmp_path / "wide.png"), 24, "squash")[0], squashed)
    assert not np.array_equal(kept, squashed)


def test_undecodable_images_are_skipped_counted_and_left_out_of_the_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_imagefolder(tmp_path / "d", n_train=80, n_test=8, num_classes=4)
    broken = sorted((root / "train" / "class1").iterdir())[:3]
    for path in broken:
        path.write_bytes(b"not an image at all")
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=20, image_size=16)
    with caplog.at_level("WARNING"):
        splits, _ = load_splits(cfg)
    assert len(splits.train_y) + len(splits.val_y) == 77, "80 images, 3 of them skipped"
    assert "skipped 3 image(s) that cannot be decoded" in caplog.text and str(broken[0]) in caplog.text
    assert len(load_imagefolder(root, 16).train_y) == 77


def test_decoding_in_processes_gives_the_in_process_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sft_optuna.training import decode

    root = tmp_path / "photos"
    files = []
    for i in range(40):
        _photo(root / f"c{i % 2}" / f"{i}.jpg", 40 + 7 * i, 60 + 3 * (i % 5), i)
        files.append((root / f"c{i % 2}" / f"{i}.jpg", i % 2))
    monkeypatch.setattr(decode, "MIN_PARALLEL", 1)  # 40 images would stay in this process otherwise
    monkeypatch.setattr(decode, "CHUNK", 7)
    parallel = decode.decode_images(files, 32, "center_crop", tmp_path / "p.npy", "p", workers=2)
    alone = decode.decode_images(files, 32, "center_crop", None, "a", workers=1)
    assert parallel.ok.all() and np.array_equal(np.asarray(parallel.x), alone.x)
    assert np.array_equal(np.load(tmp_path / "p.npy"), alone.x), "the cache file holds what was decoded"
    assert parallel.smallest_side == alone.smallest_side == max(60 + 3 * (i % 5) for i in range(40))


def test_a_folder_of_images_all_smaller_than_image_size_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_imagefolder(tmp_path / "d", n_train=40, n_test=8, num_classes=4)  # 32 px images
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=8, image_size=48)
    with caplog.at_level("WARNING"):
        splits, _ = load_splits(cfg)
    assert splits.train_x.shape[-1] == 48, "upsampling is allowed"
    assert "every image is smaller than data.image_size 48 (the largest shorter side is 32 px)" in caplog.text


def test_the_cache_is_a_memory_map_shared_by_later_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_imagefolder(tmp_path / "d", n_train=40, n_test=8, num_classes=4)
    monkeypatch.setenv("SFT_OPTUNA_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=8, image_size=16)
    first, _ = load_splits(cfg)
    pixels = sorted((tmp_path / "cache").glob("train-*.npy"))
    assert len(pixels) == 1 and np.load(pixels[0], mmap_mode="r").shape == (40, 16, 16, 3)  # NHWC, train + val
    other = dataclasses.replace(cfg, resize="squash")  # another setting, another cache: never the wrong pixels
    load_splits(other)
    assert len(sorted((tmp_path / "cache").glob("train-*.npy"))) == 2
    again, _ = load_splits(cfg)
    assert torch.equal(first.train_x, again.train_x)


@pytest.mark.parametrize("side", [60, 400], ids=["decoded whole", "decoded at a smaller scale (draft)"])
@pytest.mark.parametrize(
    ("orientation", "stored_as"), [(3, 2), (6, 1), (8, 3)], ids=["turn 180", "turn 270", "turn 90"]
)
def test_a_photo_stored_turned_comes_out_upright(tmp_path: Path, side: int, orientation: int, stored_as: int) -> None:
    from PIL import Image

    from sft_optuna.training.decode import decode_image

    # upright: red top half, blue bottom half, a green band on the left; stored turned (np.rot90 k times
    # counter-clockwise) with the EXIF orientation that tells a viewer how to show it, as phones store photos
    upright = np.zeros((side, side, 3), dtype=np.uint8)
    upright[: side // 2, :, 0] = 255
    upright[side // 2 :, :, 2] = 255
    upright[:, : side // 5, 1] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.rot90(upright, k=stored_as).copy()).save(tmp_path / "p.jpg", exif=exif, quality=95)
    out, _ = decode_image(str(tmp_path / "p.jpg"), 30, "center_crop")
    top, bottom = out[:10, 10:].mean((0, 1)), out[-10:, 10:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (top, bottom)
    assert out[:, :4, 1].mean() > 200 > out[:, -4:, 1].mean(), "the green band on the left: not mirrored"


def test_a_validation_split_as_large_as_the_folder_is_one_line_naming_the_key(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "d", n_train=30, n_test=4, num_classes=3)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(dataset="imagefolder", root=str(root), val_size=30, image_size=16))
    assert str(err.value).startswith("data.val_size 30: the training folder has only 30 images")
