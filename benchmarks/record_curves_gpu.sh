#!/usr/bin/env bash
# Record learning curves for the replay benchmark (#13) on one GPU inside a time limit: SHARDS recorders share
# the GPU (each its own configurations, --shard K/SHARDS, one torch thread, appends to one CSV under a lock),
# after one process has decoded the images into the data cache. Resumable: run it again with the same CSV and
# it records the configurations still missing.
#
#   TARBALL=../shared/data/cifar10-jpeg.tar.gz OUT=gpu-results LIMIT_S=300 bash benchmarks/record_curves_gpu.sh
#
# Settings (environment): CSV (default $OUT/cifar10-10k-gpu.csv), LIMIT_S (seconds for the recording, after
# the data are unpacked and decoded), SHARDS (12), TRAIN (10000), VAL (2000), EPOCHS (20), CONFIGS (200),
# DEVICE (cuda), PRECISION (bf16), PYTHON (python3).
set -euo pipefail
out=${OUT:-gpu-results}
csv=${CSV:-$out/cifar10-10k-gpu.csv}
limit=${LIMIT_S:-300}
shards=${SHARDS:-12}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
data=$(mktemp -d)/cifar10-jpeg
mkdir -p "$data"
tar -xzf "${TARBALL:?the CIFAR-10 JPEG archive (see ../shared/data/README.md)}" -C "$data"
args=(--data "$data" --out "$csv" --train "${TRAIN:-10000}" --val "${VAL:-2000}" --epochs "${EPOCHS:-20}"
    --configs "${CONFIGS:-200}" --device "${DEVICE:-cuda}" --precision "${PRECISION:-bf16}" --threads 1)
log="$out/curves.log"
"$py" benchmarks/record_curves.py "${args[@]}" --configs 0 2>&1 | tee -a "$log"  # decode once into the cache
echo "recording for up to $limit s with $shards recorders: ${args[*]}" | tee -a "$log"
for ((k = 0; k < shards; k++)); do
    # the recorder stops itself before a configuration that would end past the limit; timeout is the backstop
    timeout -s KILL $((limit + 120)) "$py" benchmarks/record_curves.py "${args[@]}" --shard "$k/$shards" \
        --time-limit-s "$limit" 2>&1 | sed -u "s/^/[$k] /" >>"$log" &
done
wait
echo "recorded: $(($(wc -l <"$csv") - 1)) rows, $(cut -d, -f1 "$csv" | sort -u | grep -c '^[0-9]') configurations" | tee -a "$log"
