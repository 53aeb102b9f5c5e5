"""The benchmark scripts run and write every figure they promise (their speed is not asserted here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import PYTHON, REPO, worker_env


def _bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` as a user would; fail the test with its stderr if it fails."""
    proc = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / script), *args],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_throughput_benchmark_runs_on_cpu_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = ["--device", "cpu", "--images", "256", "--batch-size", "32", "--loader-batches", "2"]
    proc = _bench("throughput.py", *args, "--train-steps", "1", "--memory-epochs", "2", "--json", str(out))
    figures = json.loads(out.read_text())
    for key in (
        "loader_speedup",
        "train_speedup",
        "textbook_loader_images_per_s",
        "ours_loader_images_per_s",
        "textbook_train_images_per_s",
        "ours_train_images_per_s",
        "mfu_ours",
        "rss_mb_per_epoch",
    ):
        assert key in figures
    ratio = figures["ours_loader_images_per_s"] / figures["textbook_loader_images_per_s"]
    assert abs(figures["loader_speedup"] - ratio) < 0.02 * ratio
    assert len(figures["rss_mb_per_epoch"]) == 2
    assert "loader images/s" in proc.stdout and "ratio" in proc.stdout


def test_the_prepared_gpu_script_parses_and_passes_only_options_the_benchmark_has() -> None:
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    helped = _bench("throughput.py", "--help")
    lines = [ln for ln in script.read_text().splitlines() if "throughput.py" in ln or ln.startswith("run ")]
    used = set(re.findall(r"(--[a-z][a-z-]+)", "\n".join(lines)))
    assert used and used <= set(re.findall(r"(--[a-z][a-z-]+)", helped.stdout)), used


def test_storage_benchmark_runs_both_variants_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    args = ["--storages", "sqlite,journal", "--workers", "1", "--sizes", "5", "--trials-per-worker", "1"]
    _bench("storage.py", *args, "--epoch-seconds", "0.01", "--json", str(out))
    rows = json.loads(out.read_text())
    assert {(r["storage"], r["variant"]) for r in rows} == {
        (s, p) for s in ("sqlite", "journal") for p in ("optuna", "sft-optuna")
    }
    for r in rows:
        assert r["trials_before"] >= 5 and r["workers"] == 1  # the study grows by the trials each case runs
        assert r["epoch_cost_ms_median"] > 0 and r["trials_per_s"] > 0
