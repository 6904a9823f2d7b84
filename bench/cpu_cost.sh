#!/usr/bin/env bash
# Issue #22: where the CPU time of a training step goes, on a two-GPU host (one process per GPU, side by side).
# GPU 0: bench/profile_train.py (profiler phases + cProfile) on rows of 8,192 tokens, then with torch's fused Adam.
# GPU 1: useful tokens/s of configurations that change the per-step CPU cost (bench/train_throughput.py).
#   bash bench/cpu_cost.sh DEST [CONFIGS]
set -uo pipefail
DEST=$1; CONFIGS=${2:-pack8k,pack8k-adamw,pack8k-noliger,default,default-adamw}
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"  # once
profiles() {
  for spec in "8k:--set max_length=8192 --set pad_to_multiple_of=8192" \
              "8k-adamw:--set max_length=8192 --set pad_to_multiple_of=8192 --set optim='adamw_torch_fused'"; do
    name=${spec%%:*}
    CUDA_VISIBLE_DEVICES=0 python bench/profile_train.py --warmup 4 --steps 4 ${spec#*:} \
      --out "$DEST/profile-$name.txt" --json "$DEST/profile-$name.json" > "$DEST/profile-$name.log" 2>&1
    echo "profile $name: exit $?" >> "$DEST/summary.txt"
  done
}
throughput() {
  for c in ${CONFIGS//,/ }; do
    CUDA_VISIBLE_DEVICES=1 python bench/train_throughput.py --configs "$c" --median 490 --steps 12 --warmup 3 \
      --no-loss-check --out "$DEST/tput-$c.json" > "$DEST/tput-$c.log" 2>&1
    echo "throughput $c: exit $?" >> "$DEST/summary.txt"
  done
}
profiles & throughput & wait
cat "$DEST/summary.txt"
