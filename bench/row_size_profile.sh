#!/usr/bin/env bash
# Why a packed row of 8,192 tokens trains at half the tokens/s of one of 16,384 (issue #22): the training step
# profiled (bench/profile_train.py: R1-1.5B architecture, random weights, NF4 + LoRA, the default recipe) with rows
# of 8,192 and of 16,384 tokens, side by side on a two-GPU host (one process per GPU), then swapped.
#   bash bench/row_size_profile.sh DEST [WARMUP] [STEPS]
set -uo pipefail
DEST=$1; WARMUP=${2:-3}; STEPS=${3:-4}
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"  # once
run() {  # gpu, tokens per row, tag
  CUDA_VISIBLE_DEVICES=$1 python bench/profile_train.py --warmup "$WARMUP" --steps "$STEPS" \
    --set max_length="$2" --set pad_to_multiple_of="$2" --out "$DEST/rows$2-$3.txt" > "$DEST/rows$2-$3.log" 2>&1
  echo "rows $2 on GPU $1 ($3): exit $?" >> "$DEST/summary.txt"
}
run 0 8192 first & run 1 16384 first & wait
run 1 8192 swapped & run 0 16384 swapped & wait
grep -h "profiled\|Self CUDA time total\|Self CPU time total" "$DEST"/rows*.txt >> "$DEST/summary.txt"
cat "$DEST/summary.txt"
