#!/usr/bin/env bash
# Issue #20's comparison on one GPU: every configuration in its own process (a memory cap or Unsloth's patches never
# leak into the next), the merged results written to $DEST after each one, so a run cut off keeps what it measured.
#
#   bash bench/train_compare.sh MEDIAN DEST [CONFIGS]      # CONFIGS: default,fits-24gb,padded,seed (the default)
#   UNSLOTH=1 bash bench/train_compare.sh MEDIAN DEST       # Unsloth's configurations instead (bench/train_unsloth.py)
#
#   UNSLOTH=1 STEPS=30 bash bench/train_compare.sh 490 DEST packed,packed-gc      # issue #31's peers, then:
#   PEER=/tmp/bench-parts/490-unsloth-packed.json STEPS=30 bash bench/train_compare.sh 490 DEST default,fits-24gb,equal-memory,pack8k
#   (equal-memory: the default under the memory Unsloth's packed run took; the parts stay in /tmp/bench-parts while
#   the machine is warm, so DEST/train-490.json then holds all six)
# MEDIAN: median row length of the synthetic rows (490 = the real MathCodeInstruct rows, 700 = the old bench's).
# A configuration named NAME@K runs NAME again as its own part (round K): CONFIGS=pack8k,pack8k-compiled,pack8k@2,
# pack8k-compiled@2 interleaves two rounds, for host-bound rows whose rate varies between runs of one machine; each
# merged run carries its part's name ("part").
# Project runs need the project's wheels on PYTHONPATH (e.g. /tmp/site:/tmp/bsite); Unsloth's need its own set.
set -uo pipefail
MEDIAN=${1:?median}; DEST=${2:?destination folder}; CONFIGS=${3:-default,fits-24gb,padded,seed}
STEPS=${STEPS:-12}; WARMUP=${WARMUP:-3}
cd "$(dirname "$0")/.."
mkdir -p "$DEST" /tmp/bench-parts
merge() {
  python3 - "$MEDIAN" "$DEST" <<'PY'
import glob, json, sys
median, dest = sys.argv[1], sys.argv[2]
merged = {"median": int(median), "runs": []}
for path in sorted(glob.glob(f"/tmp/bench-parts/{median}-*.json")):
    part = json.load(open(path))
    merged.update({k: v for k, v in part.items() if k not in ("runs", "loss_equivalence")})
    name = path.rsplit("/", 1)[-1][len(median) + 1:-len(".json")]
    merged["runs"] += [dict(run, part=name) for run in part["runs"]]
json.dump(merged, open(f"{dest}/train-{median}.json", "w"), indent=1)
PY
}
if [ "${UNSLOTH:-0}" = 1 ]; then
  for c in $(echo "${3:-mb16x1,mb8x2}" | tr , " "); do
    python3 bench/train_unsloth.py --configs "$c" --median "$MEDIAN" --steps "$STEPS" --warmup "$WARMUP" \
      --out "/tmp/bench-parts/$MEDIAN-unsloth-$c.json" > "/tmp/bench-parts/$MEDIAN-unsloth-$c.log" 2>&1
    echo "== unsloth $c (exit $?)" >> "$DEST/log-$MEDIAN.txt"; tail -5 "/tmp/bench-parts/$MEDIAN-unsloth-$c.log" >> "$DEST/log-$MEDIAN.txt"
    merge
  done
  exit 0
fi
for c in ${CONFIGS//,/ }; do
  python3 bench/train_throughput.py --configs "${c%@*}" --median "$MEDIAN" --steps "$STEPS" --warmup "$WARMUP" \
    --no-loss-check ${PEER:+--peer "$PEER"} --out "/tmp/bench-parts/$MEDIAN-$c.json" > "/tmp/bench-parts/$MEDIAN-$c.log" 2>&1
  echo "== $c (exit $?)" >> "$DEST/log-$MEDIAN.txt"; tail -5 "/tmp/bench-parts/$MEDIAN-$c.log" >> "$DEST/log-$MEDIAN.txt"
  merge
done
