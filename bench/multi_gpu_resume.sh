#!/usr/bin/env bash
# Exact resume on two GPUs (issue #22): the real CLI under accelerate (DDP, configs/accelerate_ddp.yaml), R1-1.5B
# architecture with random weights, rows of 8,192 tokens per GPU, a checkpoint every 8 steps.
#   A: 24 steps uninterrupted.
#   B: the same run, rank 1 killed with SIGKILL a few steps after checkpoint 8, then the same command again: it must
#      take over the dead run's lock, resume from checkpoint 8 and finish step 24.
# Then every logged step of B after the checkpoint is compared with A's (loss, grad_norm): equal bit for bit when the
# resume is exact (same data order, same RNG, same weights and optimizer state).
#   bash bench/multi_gpu_resume.sh DEST
set -uo pipefail
DEST=${1:-/tmp/mg-resume}
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
python3 bench/synth_data.py /tmp/synth_mci.jsonl 6000 > /dev/null
python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_r1_model; random_r1_model()"
ARGS=(--model_id /tmp/r1-1.5b-random --math_dataset /tmp/synth_mci.jsonl --math_samples 0
      --science_dataset data/samples/scibench.jsonl --max_steps 24 --save_steps 8 --eval_strategy no
      --load_best_model_at_end false --logging_steps 1 --accuracy_callback false --report_to none
      --max_length 8192 --pad_to_multiple_of 8192)
launch() {  # output dir, log
  CUDA_VISIBLE_DEVICES=0,1 accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 2 \
    -m llmhelpers "${ARGS[@]}" --output_dir "$1" >> "$2" 2>&1
}
rm -rf /tmp/mr-a /tmp/mr-b
launch /tmp/mr-a "$DEST/a.log"; echo "A: exit $?" >> "$DEST/resume.txt"
launch /tmp/mr-b "$DEST/b.log" & LAUNCHER=$!
until ls /tmp/mr-b/runs/*/checkpoint-8/checkpoint_complete.json > /dev/null 2>&1; do
  kill -0 $LAUNCHER 2> /dev/null || break; sleep 0.2
done
sleep 1.5  # a few steps past the checkpoint, before the next one
for p in $(pgrep -f "llmhelpers"); do
  if tr '\0' '\n' < /proc/$p/environ 2> /dev/null | grep -qx LOCAL_RANK=1; then
    kill -9 "$p" && echo "B: SIGKILL to rank 1 (pid $p) at $(date +%T)" >> "$DEST/resume.txt"
  fi
done
wait $LAUNCHER; echo "B, killed: exit $?" >> "$DEST/resume.txt"
ls /tmp/mr-b/runs/*/ >> "$DEST/resume.txt"
launch /tmp/mr-b "$DEST/b.log"; echo "B, relaunched: exit $?" >> "$DEST/resume.txt"
grep -h "resuming\|starting a new run\|lock" "$DEST/b.log" >> "$DEST/resume.txt"
python3 - /tmp/mr-a /tmp/mr-b >> "$DEST/resume.txt" <<'PY'
import glob, json, sys
def rows(out):
    (path,) = glob.glob(f"{out}/runs/*/log_history.json")
    return {r["step"]: (r["loss"], r.get("grad_norm")) for r in json.load(open(path)) if "loss" in r}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
after = [s for s in sorted(a) if s > 8]
same = [s for s in after if s in b and a[s] == b[s]]
print(json.dumps({"steps_compared": len(after), "steps_equal_bit_for_bit": len(same),
                  "max_abs_loss_diff": max(abs(a[s][0] - b[s][0]) for s in after if s in b),
                  "missing_in_b": [s for s in after if s not in b],
                  "a": {s: a[s] for s in after[:3]}, "b": {s: b.get(s) for s in after[:3]}}))
PY
cat "$DEST/resume.txt"
