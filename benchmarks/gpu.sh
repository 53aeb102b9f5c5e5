#!/usr/bin/env bash
# The GPU check as one prepared command (#3, #26, #27): about 8 minutes on one H100/H200, figures as JSON + one
# log under $OUT (default gpu-results). Prepared and run whole on the CPU first with --dry-run (seconds a stage).
#
#   1. the step, eager vs replayed from a CUDA graph: throughput.py at 32 px (CIFAR stem) and 64 px (the
#      shipped studies), side by side with the textbook loop (images/s, MFU);
#   2. the CUDA graph's loss curve equal to eager's (tests/test_graphs.py, skipped without CUDA);
#   3. packed processes: aggregate training images/s of 1, 2, 4, 8 workers on one GPU (sft_optuna.packing);
#      fused packs: aggregate images/s and MFU of 1, 2, 4, 8 trials trained as one fused model (packs.py);
#   4. a whole study: 24 trials x 3 epochs on 10,000 images at 64 px, sft-optuna with 1 and with auto workers per
#      GPU and with fused packs of 4 against plain Optuna + the textbook loop (study_e2e.py: trials/hour, GPU-s
#      per trial, aggregate MFU);
#   5. the photo loader on the GPU (decode.py, 5,000 JPEGs, RandomResizedCrop 224) against the textbook's.
#
# The device image has torch, torchvision, PyYAML, tqdm, numpy, pillow, pytest; optuna and SQLAlchemy travel as
# wheels (run here once: bash benchmarks/gpu.sh --wheels; then carry .whl). On the device machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   OUT=$OUT bash benchmarks/gpu.sh
set -euo pipefail
if [ "${1:-}" = "--wheels" ]; then  # the packages the device image lacks, for Python 3.12 on x86-64 Linux
    mkdir -p .git/info && (grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude)
    for pkg in optuna==5.1.0 sqlalchemy==2.1.9 alembic==1.20.1 colorlog==6.9.0 mako==1.4.3; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pkg"
    done
    ls .whl
    exit 0
fi
dry=""
if [ "${1:-}" = "--dry-run" ]; then dry=1; fi
out=${OUT:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu.log"
: > "$log"
if [ -n "$dry" ]; then
    device=cpu; images=512; size32="--image-size 32 --stem cifar --train-steps 2 --loader-batches 2"
    size64="--image-size 64 --train-steps 2 --loader-batches 2"; pack="1,2"; seconds=1
    e2e=(--dry-run); decode=(--images 60 --decoder-sample 5)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
    device=cuda; images=20000; size32="--image-size 32 --stem cifar"; size64="--image-size 64"
    pack="1,2,4,8"; seconds=10; e2e=(); decode=(--images 5000 --device cuda)
fi
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>&1 | tee -a "$log"
stage() { echo "=== $*" | tee -a "$log"; }

stage "1. the step, eager vs CUDA graph"
# shellcheck disable=SC2086
"$py" benchmarks/throughput.py --device $device --images $images --memory-epochs 0 --cuda-graph $size32 \
    --json "$out/step32-cifar.json" 2>&1 | tee -a "$log"
# shellcheck disable=SC2086
"$py" benchmarks/throughput.py --device $device --images $images --memory-epochs 0 --cuda-graph $size64 \
    --json "$out/step64.json" 2>&1 | tee -a "$log"

stage "2. the graphed loss curve against eager's"
"$py" -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tee -a "$log" || true

stage "3. packed processes on one GPU"
"$py" - "$device" "$pack" "$seconds" "$out/packing.json" <<'EOF' 2>&1 | tee -a "$log"
import dataclasses, json, sys, yaml
from sft_optuna.config import parse_config
from sft_optuna.packing import calibrate_node
device, counts, seconds, path = sys.argv[1], [int(k) for k in sys.argv[2].split(",")], float(sys.argv[3]), sys.argv[4]
raw = yaml.safe_load(open("studies/cifar10-resnet18-tpe.yaml"))
raw["model"]["weights"] = "none"  # the shipped study's shape: 64 px, batch up to 256
config = parse_config(raw)
# cached: stage 4's launch --workers-per-gpu auto reads it (the same study shape)
c = calibrate_node(config, "0" if device == "cuda" else None, counts=counts, seconds=seconds, stop_early=False)
print(c.describe())
json.dump(dataclasses.asdict(c), open(path, "w"), indent=1)
EOF
if [ -n "$dry" ]; then packs=(--dry-run); else packs=(--device cuda --packs 1,2,4,8); fi
"$py" benchmarks/packs.py "${packs[@]}" --json "$out/packs.json" 2>&1 | tee -a "$log"

stage "4. a whole study: sft-optuna against plain Optuna + the textbook loop"
"$py" benchmarks/study_e2e.py "${e2e[@]}" --json "$out/study.json" 2>&1 | tee -a "$log"

stage "5. the photo loader"
"$py" benchmarks/decode.py --dir /tmp/sft-optuna-photos "${decode[@]}" --json "$out/decode.json" 2>&1 | tee -a "$log"
echo "done: $out" | tee -a "$log"
