#!/usr/bin/env bash
# Issue #22: does the per-step CPU cost of LoRA dropout matter? Useful tokens/s of rows of 8,192 and 16,384 tokens,
# with the recipe's lora_dropout=0.05 and with 0, on a two-GPU host: GPU 0 runs the 8k pair, GPU 1 the 16k pair
# (bench/train_throughput.py, one process per configuration, synthetic rows of median 490 tokens).
#   bash bench/dropout_rows.sh DEST [STEPS]
set -uo pipefail
DEST=$1; STEPS=${2:-20}
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"
pair() {  # gpu, config, config
  for c in "$2" "$3"; do
    CUDA_VISIBLE_DEVICES=$1 python bench/train_throughput.py --configs "$c" --median 490 --warmup 3 --steps "$STEPS" \
      --no-loss-check --out "$DEST/$c.json" > "$DEST/$c.log" 2>&1
    echo "$c on GPU $1: exit $?" >> "$DEST/summary.txt"
  done
}
pair 0 pack8k pack8k-nodrop & pair 1 default default-nodrop & wait
cat "$DEST/summary.txt"
