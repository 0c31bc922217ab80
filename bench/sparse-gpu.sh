#!/usr/bin/env bash
# Issues 20 and 19 on one GPU, on one llama-3-8b-shaped store (random fp16 weights, 16 GB on the SSD):
#   sparse B   bench/sparse_decode.py: dense against activation-sparse decode at batch B, every step's weights
#              from the disk (the store's page cache dropped before each step), target sparsity 0.5
#   teal B     the same with input sparsity (--method input: FFN input and intermediate thresholded, kept columns
#              read from the input-channel files; docs/sparsity.md), target 0.5, dense run skipped (SPARSE_NO_DENSE);
#              SCOPE=all (or the step teal-attn B) thresholds the attention's inputs too (--method input+attn: q/k/v
#              and o columns read from the attention channel files)
#   teal-attn B  the teal step with the attention's inputs thresholded too
#   prefix     bench/prefix_cache.py: 64 prompts = one 2,048-token document + 64-token questions, no reuse / first
#              job / second job (the node cache's pages dropped first), one micro-batch of 64
# Usage: OUT=/some/dir bench/sparse-gpu.sh STEP [ARG] …   (JSON per step and log.txt in $OUT)
set -u
OUT=${OUT:-/tmp/sparse}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
source "$(dirname "$0")/device-setup.sh"
W=${W:-/root/sd}
date
while [ $# -gt 0 ]; do step=$1; shift; case $step in
  sparse) b=$1; shift
          echo "=== sparse_decode --batch $b"
          timeout "${STEP_LIMIT:-300}" python3 bench/sparse_decode.py --model dummy:llama-3-8b --work "$W" --device cuda \
            --targets "${TARGETS:-0.5}" --batch "$b" --prompt 32 --new "${NEW:-2}" --cold --json "$OUT/sparse-b$b.json" ;;
  teal|teal-attn) b=$1; shift
          m=input; name=teal
          if [ "$step" = teal-attn ] || [ "${SCOPE:-ffn}" = all ]; then m=input+attn; name=teal-attn; fi
          echo "=== sparse_decode --method $m --batch $b"
          SPARSE_NO_DENSE=${SPARSE_NO_DENSE:-1} timeout "${STEP_LIMIT:-300}" python3 bench/sparse_decode.py \
            --model dummy:llama-3-8b --work "$W" --device cuda --targets "${TARGETS:-0.5}" --batch "$b" --prompt 32 \
            --new "${NEW:-2}" --cold --method "$m" --json "$OUT/$name-b$b.json" ;;
  prefix) mkdir -p /root/pc && ln -sfn "$W/store" /root/pc/model
          echo "=== prefix_cache --batch 64 --drop-cache"
          timeout "${STEP_LIMIT:-300}" python3 bench/prefix_cache.py --model dummy:llama-3-8b --store /root/pc \
            --cache /root/pc/kv --batch 64 --drop-cache | tee "$OUT/prefix.jsonl" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac; date; done
