#!/usr/bin/env bash
# Issue #30: the house was rebuilt (training/run.py, SamplingParams with graph-read temperature/top-p, the notebook's
# middle as library calls); training and evaluation speed must stay within 5% of the tree before it. One GPU, one
# process per measurement, old and new alternating, all in one session.
#
#   bench/redesign_speed.sh OLD_TREE DEST [REQUESTS]
#
# OLD_TREE: the earlier commit's files (git worktree add OLD_TREE <commit>). PYTHONPATH must already name the site
# with the project's other wheels; each tree is put first on it. Also runs `python -m bench check sampling` here.
set -euo pipefail
old=$(cd "$1" && pwd); dest=$2; requests=${3:-600}
mkdir -p "$dest"
PYTHONPATH=$PWD:$PYTHONPATH python -m bench check sampling --out "$dest/sampling-check.json" > "$dest/sampling-check.log" 2>&1 \
  || echo "sampling check FAILED (see $dest/sampling-check.log)"
for round in 1 2; do
  for tree in new old; do
    dir=$([ "$tree" = new ] && echo "$PWD" || echo "$old")
    (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH python bench/eval_engine.py --configs default --requests "$requests" \
       --out "$dest/eval-$tree-$round.json" > "$dest/eval-$tree-$round.log" 2>&1) || echo "eval $tree $round failed"
    tail -n 2 "$dest/eval-$tree-$round.log"
  done
done
for tree in new old; do
  dir=$([ "$tree" = new ] && echo "$PWD" || echo "$old")
  (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH python bench/train_throughput.py --configs default --no-loss-check \
     --out "$dest/train-$tree.json" > "$dest/train-$tree.log" 2>&1) || echo "train $tree failed"
  tail -n 3 "$dest/train-$tree.log"
done
