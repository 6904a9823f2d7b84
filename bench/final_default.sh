#!/usr/bin/env bash
# After the recipe moved to torch's fused AdamW (issue #22): the two-rank resume check (bench/multi_gpu_resume.sh,
# whose uninterrupted run A is also 2 GPUs x rows of 8,192) and one GPU on rows of 16,384 with the same CLI flags,
# the same 24 steps. Everything under $DEST.
#   bash bench/final_default.sh DEST
set -uo pipefail
DEST=${1:?}; cd "$(dirname "$0")/.."
mkdir -p "$DEST"
timeout 300 bash bench/multi_gpu_resume.sh "$DEST/resume"
CUDA_VISIBLE_DEVICES=0 timeout 150 accelerate launch --num_processes 1 --mixed_precision bf16 -m llmhelpers \
  --model_id /tmp/r1-1.5b-random --math_dataset /tmp/synth_mci.jsonl --math_samples 0 \
  --science_dataset data/samples/scibench.jsonl --max_steps 24 --save_steps 8 --eval_strategy no \
  --load_best_model_at_end false --logging_steps 1 --accuracy_callback false --report_to none \
  --output_dir /tmp/mr-1gpu > "$DEST/1gpu-16k.log" 2>&1
echo "1gpu-16k: exit $?"; grep -h RESULT "$DEST/resume/a.log" "$DEST/1gpu-16k.log"
