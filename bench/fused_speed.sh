#!/usr/bin/env bash
# Issue #22 on a two-GPU host, one process per GPU, side by side: the fused LoRA layer against peft's forward.
# GPU 0: bench/fused_lora_check.py (exactness + fwd/bwd time, rows of 8,192 and 16,384) and bench/profile_train.py
#        (phases + cProfile) on rows of 8,192 with the fused layer.
# GPU 1: useful tokens/s (bench/train_throughput.py) of peft vs fused, rows of 8,192 and 16,384, and fused + torch's
#        fused AdamW.
# Everything lands in $WORK; $DEST/results.tgz is rewritten after each run (a run cut off keeps what it measured).
#   bash bench/fused_speed.sh DEST [CONFIGS]
set -uo pipefail
DEST=$1; CONFIGS=${2:-pack8k-peft,pack8k,pack8k-adamw,default-peft,default,default-adamw}
WORK=${WORK:-/tmp/fused-speed}
cd "$(dirname "$0")/.."
mkdir -p "$DEST" "$WORK"
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"  # once
pack() { tar czf "$DEST/results.tgz" -C "$WORK" . ; }
gpu0() {
  for t in 8192 16384; do
    CUDA_VISIBLE_DEVICES=0 python bench/fused_lora_check.py --tokens $t --out "$WORK/check-$t.json" > "$WORK/check-$t.log" 2>&1
    echo "check $t: exit $?" >> "$WORK/summary.txt"; pack
  done
  CUDA_VISIBLE_DEVICES=0 python bench/profile_train.py --warmup 4 --steps 4 --set max_length=8192 \
    --set pad_to_multiple_of=8192 --out "$WORK/profile-8k-fused.txt" --json "$WORK/profile-8k-fused.json" \
    > "$WORK/profile-8k-fused.log" 2>&1
  echo "profile 8k fused: exit $?" >> "$WORK/summary.txt"; pack
}
gpu1() {
  for c in ${CONFIGS//,/ }; do
    CUDA_VISIBLE_DEVICES=1 python bench/train_throughput.py --configs "$c" --median 490 --steps 16 --warmup 3 \
      --no-loss-check --out "$WORK/tput-$c.json" > "$WORK/tput-$c.log" 2>&1
    echo "throughput $c: exit $?" >> "$WORK/summary.txt"; pack
  done
}
gpu0 & gpu1 & wait
pack
cat "$WORK/summary.txt"
for f in "$WORK"/check-*.json; do cat "$f"; done
python3 - "$WORK" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/tput-*.json")):
    for run in json.load(open(path))["runs"]:
        print(run["config"], run["useful_tok_s"], "tok/s", run["tokens_per_step"], "tok/step", run["checkpointing"].get("checkpointed_layers"))
PY
