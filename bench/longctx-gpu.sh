#!/usr/bin/env bash
# Issue 18 on one GPU, the current tree only: the GPU long-context tests, the ceilings, then the long-context steps
# of bench/peers.sh (ourslc, ours32k, ourslcc by default; STEPS overrides). Every step has its own time limit so
# one slow step still leaves the others' results. Results JSON and the log go to $OUT.
# Usage: OUT=/some/dir [STEPS="ourslc ours32k"] bench/longctx-gpu.sh
set -u
OUT=${OUT:-/tmp/longctx}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
source bench/device-setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_long_context.py 2>&1 | tail -15
RES="$OUT" timeout 150 bench/peers.sh ceilings || echo "ceilings: exit $?"
for step in ${STEPS:-ourslc ours32k ourslcc}; do
  start=$(date +%s)
  RES="$OUT" timeout "${STEP_LIMIT:-200}" bench/peers.sh "$step" || echo "$step: exit $?"
  echo "$step: $(( $(date +%s) - start )) s wall"
done
