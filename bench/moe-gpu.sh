#!/usr/bin/env bash
# Issue 21 on one GPU: a Qwen3-30B-A3B-shaped model (random weights at real size, int8, ~31 GB) streamed from the
# SSD, routed experts against every expert, the hot-expert cache on a synthetic skewed router, and DeepSpeed
# ZeRO-Inference on the same shape (step zeromoe).
# Usage: OUT=/some/dir bench/moe-gpu.sh STEP [STEP…]   (JSON per run and log.txt in $OUT)
# Every timed run sits in a cgroup v2 with memory.max=$CG (default 12G, below the model) after the page cache is
# dropped (--cold); conversions run outside it, untimed.
set -u
OUT=${OUT:-/tmp/moe}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
source "$(dirname "$0")/device-setup.sh"
STORE=${STORE:-/root/kfb}
CG=${CG:-12G}
KF="python3 -m kubeflash_node.cli"
mkdir -p "$STORE"
run() { # name model batch gen [bench args…]
  local name=$1 model=$2 b=$3 gen=$4; shift 4
  echo "=== $name: kubeflash bench --model $STORE/$model --prompts $b --prompt-len ${PLEN:-8} --gen-len $gen $* (cgroup $CG)"
  incg timeout "${STEP_LIMIT:-200}" $KF bench --model "$STORE/$model" --store "$STORE" --ceilings "$STORE/ceilings.json" \
    --policy explicit --weights disk --quantization int8 --prompts "$b" --prompt-len "${PLEN:-8}" --gen-len "$gen" --cold \
    --json "$OUT/$name.json" "$@" 2>&1 | grep -E "^(workload|measured|cost model|roofline|efficiency|peak|weights read|decode weights|decode latency|prefill latency)|rror"
}
date
for step in "$@"; do case $step in
  ceil) [ -f "$STORE/ceilings.json" ] || { $KF bench --store "$STORE" --ceilings-only --json "$STORE/c.json" | tail -6 &&
        python3 -c "import json;json.dump(json.load(open('$STORE/c.json'))['ceilings'],open('$STORE/ceilings.json','w'))"; }
        cp "$STORE/ceilings.json" "$OUT/" ;;
  convert) time $KF convert dummy:qwen3-30b-a3b --out "$STORE/q3" --quantization int8 2>&1 | tr '\r' '\n' | tail -2; du -sh "$STORE/q3" ;;
  skewed) rm -rf "$STORE/q3"; time $KF convert dummy:qwen3-30b-a3b@skewed --out "$STORE/q3s" --quantization int8 2>&1 | tr '\r' '\n' | tail -2 ;;
  b1|b4|b16|b64) run "moe-routed-${step}" q3 "${step#b}" 3 ;;
  all1|all4|all16|all64) run "moe-all-b${step#all}" q3 "${step#all}" 2 --all-experts ;;
  skew0) run moe-skewed-b4-nocache q3s 4 3 ;;          # also writes the routing counts that seed the cache below
  skewcache) run moe-skewed-b4-cache6g q3s 4 3 --expert-cache 6GiB ;;
  # DeepSpeed ZeRO-Inference 0.19.8 on the same Qwen3-30B-A3B shape (transformers' Qwen3MoeForCausalLM, random fp16
  # weights; ZeRO-3 with every parameter on NVMe through its async I/O; wheels and libaio from .whl, device-setup.sh),
  # in the cgroup of the runs above, as bench/peers.sh's zero13. Its first ZLAYERS (default 16) of the 48 layers only:
  # fp16 swap files of all 48 would take ~61 GB beside the 31 GB int8 store; compare seconds per token per layer.
  # ZeRO gathers whole parameters, and transformers keeps a layer's 128 experts in two 3-D parameters, so every
  # forward reads every expert (docs/moe.md, "ZeRO-Inference on Qwen3-MoE").
  zeromoe) echo "=== zeromoe: zero_inference.py --model qwen3-30b-a3b --layers ${ZLAYERS:-16} --prompts ${ZB:-4} (cgroup $CG)"
           incg timeout "${ZERO_LIMIT:-540}" python3 bench/peers/zero_inference.py --model qwen3-30b-a3b \
             --layers "${ZLAYERS:-16}" --nvme-dir "$STORE/zeromoe" --json "$OUT/zero-moe-b${ZB:-4}.json" --prompts "${ZB:-4}" \
             --prompt-len "${PLEN:-8}" --gen-len 3 ${GPU:+--gpu-memory "$GPU"} --cold --log "$OUT/zero-moe-b${ZB:-4}.log" \
             --time-limit "$(( ${ZERO_LIMIT:-540} - 20 ))" 2>&1 | grep -v "^\[20" | tail -5
           rm -rf "$STORE/zeromoe" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac; date; done
