#!/usr/bin/env bash
# GPU benchmark steps for docs/benchmarks.md. Usage: bench/gpu-suite.sh STEP [STEP…]; results JSON in $OUT.
# Cold runs go inside a cgroup v2 with memory.max below the model size, after dropping the page cache, so the
# 125 GB page cache cannot hold the weights; reads use O_DIRECT (auto) which bypasses it anyway.
set -u
source "$(dirname "$0")/device-setup.sh"
STORE=${STORE:-/root/kfb}
OUT=${OUT:-/tmp/out}
KF="python3 -m kubeflash_node.cli"
cgroup() {
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
  mkdir -p /sys/fs/cgroup/kf && echo "$1" > /sys/fs/cgroup/kf/memory.max && echo $$ > /sys/fs/cgroup/kf/cgroup.procs
  echo "cgroup memory.max=$(cat /sys/fs/cgroup/kf/memory.max)"
}
ceil() { [ -f "$STORE/ceilings.json" ] || $KF bench --store "$STORE" --ceilings-only --json "$STORE/ceil-full.json" &&
         python3 -c "import json;d=json.load(open('$STORE/ceil-full.json'))['ceilings'];json.dump(d,open('$STORE/ceilings.json','w'))"; cp "$STORE/ceilings.json" "$OUT/"; }
convert() { [ -f "$STORE/$1/manifest.json" ] || $KF convert "dummy:$1" --out "$STORE/$1" --dtype float16 2>&1 | tail -1; }
run() { # name model args…
  local name=$1 model=$2; shift 2
  echo "=== $name: kubeflash bench --model $STORE/$model $*"
  $KF bench --model "$STORE/$model" --store "$STORE" --ceilings "$STORE/ceilings.json" --json "$OUT/$name.json" "$@" 2>&1 \
    | grep -E "^(workload|measured|roofline|efficiency|peak|device|load_weight|compute_layer)" ; }
for step in "$@"; do case $step in
  parity) python3 bench/gpu_parity.py --device cuda || { echo "parity: FAIL (lines above); fix before benchmarking"; exit 1; } ;;
  ceilings) ceil ;;
  llama) convert llama-3-8b ;;
  opt13) convert opt-13b ;;
  rm-llama) rm -rf "$STORE/llama-3-8b" ;;
  rm-opt13) rm -rf "$STORE/opt-13b" ;;
  cg) cgroup 8G ;;
  llama-prefill) run llama-prefill-cold llama-3-8b --prompts 64 --prompt-len 1024 --gen-len 1 --gpu-batch-size 16 --num-gpu-batches 4 --cold ;;
  llama-decode) run llama-decode-cold llama-3-8b --prompts 8 --prompt-len 512 --gen-len 32 --cold ;;
  opt13-prefill) run opt13-prefill-cold opt-13b --prompts 64 --prompt-len 1024 --gen-len 1 --gpu-batch-size 16 --num-gpu-batches 4 --cold ;;
  opt13-decode) run opt13-decode-cold opt-13b --prompts 8 --prompt-len 512 --gen-len 32 --cold ;;
  llama-5gb) run llama-5gb llama-3-8b --prompts 4 --prompt-len 512 --gen-len 32 --prefetch 1 --cold ;;
  llama-cpu) run llama-cpu-weights llama-3-8b --prompts 8 --prompt-len 512 --gen-len 32 --weights cpu ;;
  premise-stream) run premise-stream llama-3-8b --prompts 256 --prompt-len 2048 --gen-len 1 --gpu-batch-size 8 --num-gpu-batches 32 --cold ;;
  premise-resident) run premise-resident llama-3-8b --prompts 256 --prompt-len 2048 --gen-len 1 --gpu-batch-size 8 --num-gpu-batches 32 --weights gpu ;;
  *) echo "unknown step $step"; exit 2 ;;
esac; done
