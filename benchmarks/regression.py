"""The CIFAR path's speed, before and after a change: ``benchmarks/throughput.py`` of two commits, side by side.

It checks out ``--ref`` (default: the commit before the photo pipeline, f642859) into a temporary worktree and
runs both trees' ``throughput.py`` with the same arguments, alternating ``--rounds`` times so that a machine
getting busier or quieter shifts both alike; it prints the median of each figure and the change. #26's goal: the
CIFAR path (defaults: pad-crop + flip, ResNet-18) within 5% of its speed before.

    python benchmarks/regression.py --device cpu --rounds 5 --json benchmarks/results/regression-cifar-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES = {
    "ours_loader_images_per_s": ("loader images/s (batched pipeline)", lambda f: f["ours_loader_images_per_s"]),
    "ours_train_images_per_s": ("training images/s (pipeline + step)", lambda f: f["ours_train_images_per_s"]),
}


def _run(tree: Path, args: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(
            [sys.executable, str(tree / "benchmarks" / "throughput.py"), *args, "--json", out.name],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="f642859", help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("throughput_args", nargs="*", help="more arguments for throughput.py (after --)")
    args = p.parse_args()
    common = ["--device", args.device, "--memory-epochs", "0", *args.throughput_args]
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref), args.ref], check=True, capture_output=True
        )
        try:
            runs: dict[str, list[dict[str, Any]]] = {"ref": [], "head": []}
            for r in range(args.rounds):
                for name, tree in (("ref", ref), ("head", REPO)) if r % 2 == 0 else (("head", REPO), ("ref", ref)):
                    runs[name].append(_run(tree, common))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref)], check=False)
    table: dict[str, Any] = {}
    print(f"\nthroughput.py {' '.join(common)}: median of {args.rounds} alternating rounds")
    print(f"{'':42s} {args.ref:>12s} {'HEAD':>12s} {'change':>8s}")
    for key, (label, get) in FIGURES.items():
        before = statistics.median(get(f) for f in runs["ref"])
        after = statistics.median(get(f) for f in runs["head"])
        table[key] = {"ref": before, "head": after, "change": after / before - 1}
        print(f"{label:42s} {before:12.0f} {after:12.0f} {after / before - 1:+8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"ref": args.ref, "args": common, "figures": table, "runs": runs}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
