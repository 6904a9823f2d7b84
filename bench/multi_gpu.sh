#!/usr/bin/env bash
# 1 GPU against 2 GPUs through the real CLI (accelerate launch -m llmhelpers) on packed rows, R1-1.5B
# architecture with random weights, synthetic MathCodeInstruct-schema data. Three runs, results under $DEST:
#   1gpu-16k    1 GPU,  rows of 16,384 tokens             (16,384 tokens per optimizer step)
#   2gpu-8k     2 GPUs, rows of 8,192 tokens each          (the same 16,384 tokens per step: the same global batch)
#   2gpu-16k    2 GPUs, rows of 16,384 tokens each         (32,768 tokens per step: the same per-GPU batch)
# The 1-GPU run hides the second GPU: one process that sees two would make the Trainer use nn.DataParallel.
#   bash bench/multi_gpu.sh [steps] [dest]
set -uo pipefail
STEPS=${1:-40}; DEST=${2:-/tmp/multi-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
python3 bench/synth_data.py /tmp/synth_mci.jsonl 6000
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"
COMMON=(--model_id /tmp/r1-1.5b-random --math_dataset /tmp/synth_mci.jsonl --math_samples 0
        --science_dataset data/samples/scibench.jsonl --max_steps "$STEPS" --eval_steps 1000
        --save_steps 1000 --logging_steps 1 --accuracy_callback false --report_to none)
run() {  # name, gpus, tokens per packed row
  local launch=(accelerate launch --num_processes "$2" --mixed_precision bf16)
  [ "$2" = 2 ] && launch=(accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 2)
  CUDA_VISIBLE_DEVICES=$([ "$2" = 1 ] && echo 0 || echo 0,1) "${launch[@]}" -m llmhelpers "${COMMON[@]}" \
    --output_dir "/tmp/mg-$1" --max_length "$3" --pad_to_multiple_of "$3" > "/tmp/mg-$1.log" 2>&1
  echo "== $1 (exit $?)" >> "$DEST/multi-gpu.txt"
  grep -h "RESULT\|activation checkpointing" "/tmp/mg-$1.log" >> "$DEST/multi-gpu.txt" || tail -20 "/tmp/mg-$1.log" >> "$DEST/multi-gpu.txt"
}
run 1gpu-16k 1 16384
run 2gpu-8k 2 8192
run 2gpu-16k 2 16384
python3 bench/compare_losses.py /tmp/mg-1gpu-16k /tmp/mg-2gpu-8k >> "$DEST/multi-gpu.txt" 2>&1
cat "$DEST/multi-gpu.txt"
