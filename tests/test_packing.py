"""Workers per GPU (#27): the count after which the aggregate stops growing by 10%, capped by memory; measured
with real concurrent processes (on the CPU here: the cores split between them) and cached per node."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import study_dict

from sft_optuna import packing
from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.packing import cached_calibration, calibrate_node, choose_workers, memory_cap


def test_workers_are_added_while_each_doubling_adds_ten_percent() -> None:
    assert choose_workers({1: 100.0, 2: 190.0, 4: 260.0, 8: 270.0}) == 4  # 8 adds 4%: stop at 4
    assert choose_workers({1: 100.0, 2: 109.0, 4: 300.0}) == 1  # the first doubling adds 9%: one worker
    assert choose_workers({1: 100.0, 2: 110.0}) == 2  # exactly 10% pays
    assert choose_workers({1: 100.0, 2: 190.0, 4: 360.0, 8: 700.0}, cap=4) == 4  # memory holds 4
    assert choose_workers({1: 100.0}) == 1


def test_the_memory_cap_counts_whole_workers_in_most_of_the_free_memory() -> None:
    gb = 10**9
    assert memory_cap(80 * gb, 9 * gb) == 8  # 72 GB usable
    assert memory_cap(80 * gb, 10 * gb) == 7
    assert memory_cap(4 * gb, 9 * gb) == 1, "at least one worker, as today"


def test_a_cpu_node_is_calibrated_with_concurrent_processes_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(study_dict(tmp_path, train={"batch_size": 16}, data={"image_size": 16}))
    cache = tmp_path / "packing.json"
    calibration = calibrate_node(config, None, counts=(1, 2), seconds=1.0, cores=2, cache=cache)
    assert set(calibration.rates) <= {1, 2} and all(r > 0 for r in calibration.rates.values())
    assert calibration.workers == choose_workers(calibration.rates, cap=2) and calibration.cap == 2
    assert "workers per node on cpu: aggregate training images/s 1:" in calibration.describe()

    def measured_again(*args: object) -> tuple[float, int]:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(packing, "_run_together", measured_again)
    assert calibrate_node(config, None, counts=(1, 2), seconds=1.0, cores=2, cache=cache) == calibration
    assert cached_calibration(config, "cpu", cache) == calibration
    other = parse_config(study_dict(tmp_path, train={"batch_size": 32}, data={"image_size": 16}))
    assert cached_calibration(other, "cpu", cache) is None, "another study shape is measured on its own"


def test_workers_per_gpu_is_auto_or_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "many"):
        with pytest.raises(SystemExit) as done:
            main(["launch", "x", "--workers-per-gpu", bad])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert "argument --workers-per-gpu" in err and len(err.strip().splitlines()) == 1
