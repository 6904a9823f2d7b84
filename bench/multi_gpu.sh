#!/usr/bin/env bash
# 1 GPU against 2 GPUs through the real CLI (accelerate launch -m llmhelpers.train), same global
# batch (16 sequences per optimizer step), R1-1.5B architecture with random weights, synthetic
# MathCodeInstruct-schema data. Prints tokens/s for each and compares the loss curves. The 1-GPU run
# hides the second GPU: one process that sees two would make the Trainer use nn.DataParallel.
#   bash bench/multi_gpu.sh [steps]
set -euo pipefail
STEPS=${1:-40}
cd "$(dirname "$0")/.."
python bench/synth_data.py /tmp/synth_mci.jsonl 3000
python -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"
COMMON=(--set model_id=/tmp/r1-1.5b-random --set math_dataset=/tmp/synth_mci.jsonl --set math_samples=0
        --set science_dataset=data/samples/scibench.jsonl --set max_steps="$STEPS" --set eval_steps=1000
        --set save_steps=1000 --set logging_steps=1 --set accuracy_callback=false)
CUDA_VISIBLE_DEVICES=0 accelerate launch --num_processes 1 --mixed_precision bf16 -m llmhelpers.train "${COMMON[@]}" \
    --set output_dir=/tmp/mg1 --set per_device_train_batch_size=16 > /tmp/mg1.log 2>&1 || { tail -40 /tmp/mg1.log; exit 1; }
grep RESULT /tmp/mg1.log
accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 2 -m llmhelpers.train "${COMMON[@]}" \
    --set output_dir=/tmp/mg2 --set per_device_train_batch_size=8 > /tmp/mg2.log 2>&1 || { tail -40 /tmp/mg2.log; exit 1; }
grep RESULT /tmp/mg2.log
python bench/compare_losses.py /tmp/mg1 /tmp/mg2
