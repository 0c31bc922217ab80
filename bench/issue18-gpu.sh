#!/usr/bin/env bash
# Issue 18 on one GPU, before and after: the Llama-3-8B layer at 8K/32K (bench/longctx_layer.py) and the 8K
# long-context decode end to end (bench/peers.sh ourslc). "Before" is the tree of the commit before the change,
# unpacked from $BEFORE_TAR (default .h18/before.tar; git archive <commit> node-agent operator). Results and the log
# go to $OUT.
# Usage: OUT=/some/dir [BEFORE_TAR=.h18/before-decode.tar] bench/issue18-gpu.sh
set -u
OUT=${OUT:-/tmp/issue18}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
HERE=$PWD
B=/tmp/kf-before
mkdir -p $B && tar -xf "${BEFORE_TAR:-.h18/before.tar}" -C $B
source bench/device-setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
for tree in before after; do
  t=$HERE; [ $tree = before ] && t=$B
  PYTHONPATH=/tmp/site:$t/node-agent:$t/operator timeout 120 python3 bench/longctx_layer.py --label $tree \
    --json "$OUT/layer-$tree.json" || echo "layer $tree: exit $?"
done
RES=/tmp/res-ceil timeout 150 bench/peers.sh ceilings && cp /tmp/res-ceil/ceilings.json "$OUT/"
for tree in before after; do
  t=$HERE; [ $tree = before ] && t=$B
  KF_TREE=$t RES=/tmp/res-$tree timeout 150 bench/peers.sh ourslc || echo "ourslc $tree: exit $?"
  cp /tmp/res-$tree/ours-lc8k-opt1.3b.json "$OUT/ourslc-$tree.json" 2>/dev/null
done
