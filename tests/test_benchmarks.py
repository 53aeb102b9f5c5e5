"""The benchmark scripts run and write every figure they promise (their speed is not asserted here)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PYTHON, REPO, need_postgres, worker_env


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


def test_the_fused_pack_benchmark_measures_one_trial_and_each_pack_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "packs.json"
    proc = _bench("packs.py", "--dry-run", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["one trial, plain eager step", "fused pack of 1", "fused pack of 2"]
    assert all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0


def _record(tarball: Path, out: Path, limit_s: int, configs: int) -> str:
    """``record_curves_gpu.sh`` on the CPU, as small as it goes; its log."""
    env = worker_env(
        TARBALL=str(tarball), OUT=str(out), LIMIT_S=str(limit_s), SHARDS="2", TRAIN="24", VAL="16", EPOCHS="2",
        CONFIGS=str(configs), DEVICE="cpu", PRECISION="fp32", PYTHON=PYTHON,
    )  # fmt: skip
    script = REPO / "benchmarks" / "record_curves_gpu.sh"
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "curves.log").read_text()


def test_the_gpu_curve_recorder_shards_resumes_and_stops_at_its_time_limit(tmp_path: Path) -> None:
    import csv
    import tarfile

    from conftest import write_imagefolder

    folder = write_imagefolder(tmp_path / "folder", n_train=40, n_test=8)
    tarball = tmp_path / "images.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder / "train", arcname="train")
        tar.add(folder / "test", arcname="test")
    out = tmp_path / "out"

    def configs() -> list[int]:
        with (out / "cifar10-10k-gpu.csv").open(newline="") as f:
            return sorted(int(row["config"]) for row in csv.DictReader(f) if row["epoch"] == "2")

    _record(tarball, out, limit_s=600, configs=3)
    assert configs() == [0, 1, 2]  # two shards, every configuration once, each with both epochs
    log = _record(tarball, out, limit_s=0, configs=5)  # a limit already passed: nothing new starts
    assert configs() == [0, 1, 2] and log.count("time limit") == 2
    _record(tarball, out, limit_s=600, configs=5)  # resumed: only the missing ones
    assert configs() == [0, 1, 2, 3, 4]


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


def test_reads_benchmark_times_both_readers_on_the_same_trials(tmp_path: Path) -> None:
    out = tmp_path / "reads.json"
    _bench(
        "reads.py", "--storages", "sqlite", "--finished", "12", "--running", "3", "--repeat", "1", "--json", str(out)
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["read"], r["trials"]) for r in rows] == [("unfinished", 3), ("get_trial", 1), ("all", 15)]
    assert all(r["optuna_ms"] > 0 and r["sft_optuna_ms"] > 0 for r in rows)


def test_scale_benchmark_claims_exactly_through_both_storages_with_the_samplers_cost_modelled(tmp_path: Path) -> None:
    need_postgres()
    out = tmp_path / "scale.json"
    args = ["--storages", "postgresql,grpc", "--workers", "3", "--trials", "12", "--claims", "5", "--procs", "1"]
    _bench("scale.py", *args, "--epochs", "1", "--epoch-s", "0", "--sampler-ms", "300", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["storage"], r["method"]) for r in rows] == [
        (s, m) for s in ("postgresql", "grpc") for m in ("sft-optuna", "optuna")
    ]
    for r in rows:
        assert r["claims"] >= 5 and r["left_running"] == 0 and not r["errors"], r  # plain Optuna may overshoot
        assert r["sampler"] == "random, waits 300 ms" and r["claim_p50_ms"] >= 300, r  # the wait is in each claim
        assert r["epoch_p50_ms"] is not None  # (connections are sampled from 1 s in: this row is over by then)
    for r in rows[::2]:  # ours: exact
        assert r["claims"] == 5 and r["overshoot"] == 0 and r["duplicates"] == 0, r


def _tiny_curves(path: Path, n: int = 16, epochs: int = 4, seed: int = 0) -> Path:
    """Curves in record_curves.py's format: accuracy grows with the learning rate's closeness to 0.05."""
    import math
    import random

    rng = random.Random(seed)
    names = ["lr", "batch_size", "weight_decay", "momentum", "scheduler", "lr_decay", "label_smoothing"]
    with path.open("w") as fh:
        fh.write(",".join(["config", *names, "status", "epoch", "val_acc", "train_loss", "seconds"]) + "\n")
        for c in range(n):
            lr = math.exp(rng.uniform(math.log(1e-4), math.log(0.3)))
            quality = max(0.0, 1 - abs(math.log(lr / 0.05)) / 6)
            params = [lr, rng.choice([64, 128, 256]), 1e-4, 0.9, rng.choice(["constant", "cosine"]), 0.1, 0.0]
            for e in range(1, epochs + 1):
                acc = 0.1 + 0.6 * quality * (1 - math.exp(-e / 2))
                fh.write(",".join(map(str, [c, *params, "ok", e, round(acc, 4), 1.0, 2.0])) + "\n")
    return path


def test_replay_runs_methods_through_the_real_claims_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    table = _tiny_curves(tmp_path / "tiny.csv")
    methods = "random+none,tpe+median,tpe+asha"
    proc = _bench(
        "hpo_replay.py",
        "--table",
        str(table),
        "--methods",
        methods,
        "--workers",
        "1,2",
        "--seeds",
        "2",
        "--json",
        str(out),
        "--full-json",
        "--plot",
        str(tmp_path / "replay.png"),
    )
    figures = json.loads(out.read_text())
    assert (tmp_path / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures["configs"] == 16 and figures["budget_epochs"] == 80 and figures["horizon_epochs"] == 240
    # the target: what a search can find on the surrogate (random points), never above the table's best
    assert figures["target"] == pytest.approx(figures["surrogate_best"] - 0.005)
    assert 0.1 < figures["surrogate_best"] <= figures["table_best"]
    # the second target: the top 1% of the space's final accuracies, reached by more seeds than the first
    assert figures["top_quantile"] == 0.99 and 0.1 < figures["top_target"] <= figures["surrogate_best"]
    assert set(figures["methods"]) == {f"{m} K={k}" for m in methods.split(",") for k in (1, 2)}
    for name, m in figures["methods"].items():
        assert {"epochs_to_target", "epochs_to_top", "best_at_budget", "false_prune_rate"} <= set(m)
        for anytime in m["anytime_runs"]:  # epochs consumed never pass the horizon; the best never decreases
            assert all(e <= 240 for e, _ in anytime) and [b for _, b in anytime] == sorted(b for _, b in anytime)
            assert max(e for e, _ in anytime) > 80, "studies run past the fixed budget, to the horizon"
        band = m["anytime"]  # mean over seeds on a grid of epochs, up to the horizon
        assert band["epochs"][-1] == 240 and band["mean"] == sorted(band["mean"])
        at_80 = band["mean"][band["epochs"].index(80)]
        assert at_80 == pytest.approx(m["best_at_budget"]["mean"], abs=1e-4), "the best at the budget, from the curve"
        assert 0.1 <= m["best_at_budget"]["mean"] <= 0.7, name
        reached = {which: int(m[which]["reached"].split("/")[0]) for which in ("epochs_to_target", "epochs_to_top")}
        for which, hits in reached.items():
            assert (m[which]["median"] is None) == (hits < 2), "with 2 seeds, a median needs both"
        assert reached["epochs_to_top"] >= reached["epochs_to_target"]
        assert 1 <= m["distinct_curves"] <= min(16, m["configurations"]), name
    assert figures["methods"]["random+none K=1"]["false_prune_rate"] is None, "nothing is stopped without a pruner"
    # without a pruner every configuration runs to the end: 240 epochs of 4-epoch curves are 60 configurations
    assert figures["methods"]["random+none K=1"]["configurations"] == 60
    # the share of those 60 new configurations in the top 1%, by when they were proposed: no window past the 60th
    shares = figures["methods"]["random+none K=1"]["proposals_in_top"]
    assert list(shares) == ["0-10", "10-30", "30-60"] and all(0 <= v <= 1 for v in shares.values())
    # under ASHA a promotion continues a configuration: it is not a new one (fewer than 200 per study here)
    asha = figures["methods"]["tpe+asha K=1"]
    assert asha["configurations"] < 200 and asha["proposals_counted"] == round(2 * asha["configurations"])
    assert "epochs to target" in proc.stdout


def test_the_replay_measures_a_warm_start_from_the_last_study_with_and_without(tmp_path: Path) -> None:
    out = tmp_path / "warm.json"
    # the last study ran on the same curves, 3 epochs a trial; a space of the learning rate alone (the tiny
    # curves depend on it only), so that its 60 trials find the best curve and carry it over
    source = _tiny_curves(tmp_path / "source.csv", n=16, epochs=3, seed=0)
    target = _tiny_curves(tmp_path / "target.csv", n=16, epochs=4, seed=0)
    study = tmp_path / "lr.yaml"
    raw = yaml.safe_load((REPO / "studies" / "cifar10-resnet18-tpe.yaml").read_text())
    raw["search_space"] = {"lr": raw["search_space"]["lr"]}
    study.write_text(yaml.safe_dump(raw))
    args = ["--study", str(study), "--table", str(target), "--warm-start-table", str(source), "--warm-top", "2"]
    args += ["--warm-source-trials", "60", "--methods"]
    proc = _bench("hpo_replay.py", *args, "random+none", "--workers", "1", "--seeds", "3", "--json", str(out))
    rows = json.loads(out.read_text())["warm_start"]
    assert rows["source_table"] == str(source) and rows["top"] == 2 and rows["source_trials"] == 60
    row = rows["rows"]["random+none K=1"]
    assert set(row) == {
        "epochs_to_top",
        "epochs_to_top_per_seed",
        "ratio_with_over_without",
        "best_at_budget_difference",
    }
    # a warm-started study runs the last study's best first: the top with its first trial (4 epochs); random
    # search alone takes longer on some seed
    with_, without = row["epochs_to_top_per_seed"]["with"], row["epochs_to_top_per_seed"]["without"]
    assert with_ == [4, 4, 4], with_
    assert sum(with_) < sum(without), (with_, without)
    assert row["ratio_with_over_without"]["interval"][0] is not None
    assert "warm start (2 from" in proc.stdout


def _replay_module() -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("hpo_replay", REPO / "benchmarks" / "hpo_replay.py")
    assert spec is not None and spec.loader is not None
    replay = importlib.util.module_from_spec(spec)
    sys.modules["hpo_replay"] = replay  # its dataclass looks its module up
    spec.loader.exec_module(replay)
    return replay


def test_the_replay_json_keeps_per_seed_figures_not_whole_curves_unless_asked() -> None:
    replay = _replay_module()
    runs = [[(4, 0.5), (8, 0.7), (12, 0.72)], [(4, 0.3), (8, 0.4)]]
    out = {"target": 0.71, "top_target": 0.6, "budget_epochs": 8, "methods": {"m K=1": {"anytime_runs": runs}}}
    slim = replay.compact(out)
    assert "anytime_runs" not in slim["methods"]["m K=1"] and "anytime_runs" in out["methods"]["m K=1"]
    assert slim["methods"]["m K=1"]["per_seed"] == {
        "epochs_to_target": [12, None],
        "epochs_to_top": [8, None],
        "best_at_budget": [0.7, 0.4],
    }


def test_the_replay_quantile_is_the_nearest_rank() -> None:
    quantile = _replay_module().quantile
    values = [0.1, 0.2, 0.3, 0.4]
    assert [quantile(values, q) for q in (0.0, 0.25, 0.5, 0.51, 0.99, 1.0)] == [0.1, 0.1, 0.2, 0.3, 0.4, 0.4]


def test_the_replay_costs_every_epoch_of_a_curve_at_its_median_so_a_paused_recorder_distorts_nothing(
    tmp_path: Path,
) -> None:
    from sft_optuna.study_file import load_study_file

    table = _tiny_curves(tmp_path / "tiny.csv", n=2)
    text = table.read_text().splitlines()
    # configuration 0's epoch 3 spanned a pause of the recorder: 500 s where its other epochs took 2 s
    text[3] = ",".join([*text[3].split(",")[:-1], "500.0"])
    table.write_text("\n".join(text) + "\n")
    space = load_study_file(REPO / "studies" / "cifar10-resnet18-tpe.yaml").search_space
    curves = _replay_module().load_table(table, space)
    assert [c.seconds for c in curves] == [[2.0] * 4, [2.0] * 4]


def test_the_replay_surrogate_returns_recorded_curves_and_weighted_means_between_them() -> None:
    replay = _replay_module()
    from sft_optuna.study_file import load_study_file

    space = {"lr": load_study_file(REPO / "studies" / "cifar10-resnet18-tpe.yaml").search_space["lr"]}
    low = replay.Curve({"lr": 1e-4}, [0.1, 0.2], [1.0, 1.0])
    high = replay.Curve({"lr": 0.3}, [0.5, 0.7], [3.0, 3.0])
    far = replay.Curve({"lr": 0.01}, [0.9, 0.9], [9.0, 9.0])
    nearest = replay.Surrogate([low, high, far], space)
    assert nearest({"lr": 2e-4}) is low and nearest({"lr": 0.2}) is high
    smooth = replay.Surrogate([low, high], space, neighbours=2)
    assert smooth({"lr": 0.3}) is high  # a recorded point keeps its own curve
    middle = smooth({"lr": math.sqrt(1e-4 * 0.3)})  # halfway on the log scale: the plain mean
    assert middle.values == pytest.approx([0.3, 0.45]) and middle.seconds == pytest.approx([2.0, 2.0])
    quarter = smooth({"lr": math.exp(math.log(1e-4) + 0.25 * math.log(0.3 / 1e-4))})  # 3:1 towards low
    assert quarter.values == pytest.approx([0.75 * 0.1 + 0.25 * 0.5, 0.75 * 0.2 + 0.25 * 0.7])


def test_the_smooth_replay_surrogate_interpolates_between_recorded_curves_and_averages_noise_out() -> None:
    replay = _replay_module()
    from sft_optuna.study_file import load_study_file

    space = {"lr": load_study_file(REPO / "studies" / "cifar10-resnet18-tpe.yaml").search_space["lr"]}
    lo, hi = math.log(1e-4), math.log(0.3)

    def truth(u: float) -> list[float]:  # u: lr on the normalised log scale; a bump peaking at u = 0.6
        return [0.1 + e * 0.2 * math.exp(-((u - 0.6) ** 2) / 0.08) for e in (1, 2)]

    rng = random.Random(0)
    curves = []
    for i in range(41):
        u = i / 40
        noisy = [v + rng.gauss(0, 0.01) for v in truth(u)]
        curves.append(replay.Curve({"lr": math.exp(lo + u * (hi - lo))}, noisy, [1.0 + u, 1.0 + u]))
    smooth = replay.SmoothSurrogate(curves, space)
    assert smooth.width in smooth.WIDTHS and smooth.ridge in smooth.RIDGES and smooth.loo_rmse < 0.02
    for u in (0.2125, 0.5875, 0.6125, 0.9):  # between recorded points: the truth, not a neighbour's noise
        curve = smooth({"lr": math.exp(lo + u * (hi - lo))})
        assert curve.values == pytest.approx(truth(u), abs=0.01), u
    # its epochs cost the nearest recorded curve's seconds
    assert smooth({"lr": math.exp(lo + 0.6 * (hi - lo))}).seconds == [1.6, 1.6]


def test_replay_methods_are_named_sampler_plus_pruner_with_ashas_rungs_in_the_name() -> None:
    parse = _replay_module().parse_method
    assert parse("random+none") == ({"name": "random"}, {"name": "none"})
    assert parse("tpe+asha")[1] == {"name": "asha", "min_epochs": 1, "reduction_factor": 3}
    assert parse("gp+asha3")[1] == {"name": "asha", "min_epochs": 3, "reduction_factor": 3}
    assert parse("tpe+asha3x2") == (parse("tpe+median")[0], {"name": "asha", "min_epochs": 3, "reduction_factor": 2})
    for bad in ("tpe+ashax", "tpe", "cma+median", "tpe+asha3x"):
        with pytest.raises(SystemExit, match=re.escape(repr(bad))):
            parse(bad)


def test_the_replay_ratio_interval_says_met_not_met_or_undecided_from_the_seeds() -> None:
    replay = _replay_module()
    inf, horizon = math.inf, 1200
    # every seed the same: the interval is the ratio itself
    clear = replay.ratio_interval([100.0] * 20, [300.0] * 20, horizon)
    assert clear["ratio"] == pytest.approx(1 / 3, abs=1e-3) and clear["interval"] == [clear["ratio"]] * 2
    assert replay.verdict(clear, 0.5) == "met" and replay.verdict(clear, 0.3) == "not met"
    # seeds spread over 3x: a ratio of medians near the goal cannot be decided from 20 of them
    rng = random.Random(1)
    spread = replay.ratio_interval(
        [rng.uniform(100, 300) for _ in range(20)], [rng.uniform(200, 600) for _ in range(20)], horizon
    )
    lo, hi = spread["interval"]
    assert lo < spread["ratio"] < hi and lo < 0.5 < hi and replay.verdict(spread, 0.5) == "undecided"
    below = replay.ratio_interval([200.0] * 20, [rng.uniform(200, 600) for _ in range(20)], horizon)
    assert below["interval"][0] < below["ratio"] < below["interval"][1], "each side is resampled"
    # a side that misses in most seeds reached the target beyond the horizon, if ever: a bound, not a ratio
    late = replay.ratio_interval([inf] * 15 + [50.0] * 5, [200.0] * 20, horizon)
    assert late["ratio"] is None and late["bounds"] == [6.0, None] and late["interval"] == [6.0, None]
    assert replay.verdict(late, 0.5) == "not met"
    early = replay.ratio_interval([100.0] * 20, [inf] * 20, horizon)  # at most 100/1200
    assert early["bounds"] == [0.0, pytest.approx(0.083, abs=1e-3)] and replay.verdict(early, 0.5) == "met"
    unknown = replay.ratio_interval([700.0] * 20, [inf] * 20, horizon)  # at most 0.58: maybe above 0.5
    assert replay.verdict(unknown, 0.5) == "undecided"
    both = replay.ratio_interval([inf] * 20, [inf] * 20, horizon)
    assert both["undefined_share"] == 1.0 and replay.verdict(both, 0.5) == "undecided"


def test_the_replay_critical_path_bound_charges_the_winners_epochs_to_every_other_worker() -> None:
    bound = _replay_module().critical_path_bound
    # 8 workers: while the winner's 20 epochs run one after another, 7 others train 140 epochs more
    assert bound(560, 20, 8) == 1.25 and bound(280, 20, 8) == 1.5 and bound(400, 20, 1) == 1.0


def test_the_replay_difference_interval_tells_ahead_behind_and_a_tie() -> None:
    replay = _replay_module()
    ahead = replay.difference_interval([0.70] * 20, [0.65] * 20)
    assert ahead["difference"] == pytest.approx(0.05) and ahead["verdict"] == "met"
    assert replay.difference_interval([0.65] * 20, [0.70] * 20)["verdict"] == "not met"
    rng = random.Random(2)
    noisy = replay.difference_interval(
        [rng.gauss(0.70, 0.03) for _ in range(20)], [rng.gauss(0.70, 0.03) for _ in range(20)]
    )
    lo, hi = noisy["interval"]
    assert lo < noisy["difference"] < hi and lo < 0 < hi and noisy["verdict"] == "tie"
    one = replay.difference_interval([rng.gauss(0.70, 0.03) for _ in range(20)], [0.70] * 20)
    other = replay.difference_interval([0.70] * 20, [rng.gauss(0.70, 0.03) for _ in range(20)])
    for each in (one, other):
        assert each["interval"][0] < each["difference"] < each["interval"][1], "each side is resampled"


def test_the_replay_names_a_bad_table_in_one_line(tmp_path: Path) -> None:
    headless = tmp_path / "headless.csv"
    headless.write_text("a,b\n1,2\n")
    empty = tmp_path / "empty.csv"
    lines = _tiny_curves(tmp_path / "tiny.csv").read_text().splitlines()
    empty.write_text(lines[0] + "\n")
    garbled = tmp_path / "garbled.csv"  # an epoch that is not a number
    row = lines[1].split(",")
    row[lines[0].split(",").index("epoch")] = "three"
    garbled.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    for table, why in (
        (tmp_path / "nope.csv", "No such file"),
        (headless, "not a table of learning curves"),
        (empty, "no learning curves"),
        (garbled, "not a table of learning curves"),
    ):
        proc = subprocess.run(
            [PYTHON, str(REPO / "benchmarks" / "hpo_replay.py"), "--table", str(table), "--seeds", "1"],
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert (
            proc.stderr.strip().splitlines() == [proc.stderr.strip()]
            and str(table) in proc.stderr
            and why in proc.stderr
        )


def test_the_replay_names_a_missing_study_file_in_one_line(tmp_path: Path) -> None:
    study = tmp_path / "nope.yaml"
    proc = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "hpo_replay.py"), "--study", str(study)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(study) in proc.stderr, proc.stderr


def test_the_curve_recorder_names_a_missing_data_folder_or_device_in_one_line(tmp_path: Path) -> None:
    base = [PYTHON, str(REPO / "benchmarks" / "record_curves.py"), "--out", str(tmp_path / "c.csv"), "--configs", "1"]
    for extra, named in (
        (["--data", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        (["--device", "cuda:99", "--data", str(tmp_path)], "--device cuda:99"),
        (["--study", str(tmp_path / "nope.yaml")], "nope.yaml"),
    ):
        proc = subprocess.run([*base, *extra], env=worker_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "c.csv").exists(), "nothing recorded"


@pytest.mark.slow
def test_the_soak_runs_a_round_with_its_events_and_counts_what_was_lost(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = _bench("soak.py", "--rounds", "1", "--storages", "sqlite", "--load", "1", "--json", str(out))
    (row,) = json.loads(out.read_text())["rounds"]
    assert row["storage"] == "sqlite" and row["budget_exact"]
    assert row["lost"] == row["twice"] == row["running"] == row["waiting"] == row["retries_by_outages"] == 0
    assert set(row["events"]) | set(row["events_missed"]) == {"kill", "freeze", "sqlite exclusive lock"}
    assert re.search(r"^sqlite\s+1\s+0\s+0\s+0\s+0\s", proc.stdout, re.MULTILINE), proc.stdout
