#!/usr/bin/env bash
# The GPU check of issue #3 as one prepared command (a few minutes on one GPU): benchmarks/throughput.py side
# by side with the textbook loop at each candidate image size of the shipped studies, plus torch.compile.
# Needs only torch, torchvision, PyYAML and tqdm (no optuna, no database), so it runs on a bare CUDA image;
# the data are generated (throughput does not depend on what the pixels show).
#
#   OUT=gpu-results bash benchmarks/gpu.sh          # figures as JSON + one log under $OUT
set -euo pipefail
out=${OUT:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$log"
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' 2>&1 | tee -a "$log"
run() {  # name, then throughput.py arguments
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$log"
    "$py" benchmarks/throughput.py --device cuda --images 50000 --json "$out/$name.json" "$@" 2>&1 | tee -a "$log"
}
run size32-cifar --image-size 32 --stem cifar
run size64 --image-size 64
run size96 --image-size 96
run size64-compile --image-size 64 --compile --memory-epochs 0
