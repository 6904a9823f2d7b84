#!/usr/bin/env bash
# Evaluation engine speed of this tree against an earlier checkout, on the realistic workload of
# bench/eval_engine.py (--configs default), in one session: one process per GPU, side by side on a two-GPU host.
#
#   bench/eval_engine_compare.sh OLD_TREE DEST [SWAP]
#
# OLD_TREE: the earlier commit's files (git archive <commit> | tar -x -C OLD_TREE). SWAP=1 runs this tree on GPU 1
# and the old one on GPU 0 (run both orders: two processes share the host's CPUs). PYTHONPATH must already name
# the site with transformers & co (the GPU machine's wheel set); each tree is put first on it.
set -euo pipefail
old=$(cd "$1" && pwd); dest=$2; swap=${3:-0}
mkdir -p "$dest"
new_gpu=$swap; old_gpu=$((1 - swap))
tag=$([ "$swap" = 1 ] && echo swapped || echo first)
(CUDA_VISIBLE_DEVICES=$new_gpu PYTHONPATH=$PWD:$PYTHONPATH python bench/eval_engine.py --configs default \
   --out "$dest/new-$tag.json" > "$dest/new-$tag.log" 2>&1) &
(cd "$old" && CUDA_VISIBLE_DEVICES=$old_gpu PYTHONPATH=$old:$PYTHONPATH python bench/eval_engine.py --configs default \
   --out "$dest/old-$tag.json" > "$dest/old-$tag.log" 2>&1) &
wait
tail -n 3 "$dest"/*-"$tag".log
