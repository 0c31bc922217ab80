#!/usr/bin/env bash
# Peers side by side on one GPU machine (docs/benchmarks.md, "Peers"): kubeflash's auto policy, FlexGen and
# transformers + accelerate disk offload on the same OPT shape, prompt/generation lengths and memory budgets.
# Usage: bench/peers.sh STEP [STEP…]   (results JSON in $RES, default /root/peers; logs on stdout)
#
# Budgets of the opt-13b "weights on disk" workload (26 GB of fp16 weights): every timed run sits in a cgroup v2
# with memory.max=16G (host memory and page cache together, below the model) with the page cache dropped first,
# and its CUDA allocator capped at 12 GiB. Conversions and weight set-up run outside the cgroup and untimed.
set -u
source "$(dirname "$0")/device-setup.sh"
STORE=${STORE:-/root/kfb}
RES=${RES:-/root/peers}
CG=${CG:-16G}
GPU=${GPU:-12GiB}
PLEN=${PLEN:-512}
mkdir -p "$STORE" "$RES"
KF="python3 -m kubeflash_node.cli"
ceilings() { # the machine's ceilings, measured once into $STORE/ceilings.json (every `ours` run prices from it)
  [ -f "$STORE/ceilings.json" ] || { $KF bench --store "$STORE" --ceilings-only --json "$STORE/c.json" &&
    python3 -c "import json;json.dump(json.load(open('$STORE/c.json'))['ceilings'],open('$STORE/ceilings.json','w'))"; }
  cp "$STORE/ceilings.json" "$RES/"
}
ours() { # name prompts [bench args…]: kubeflash bench, auto policy unless args pin one
  local name=$1 n=$2; shift 2
  ceilings
  echo "=== $name: kubeflash bench --prompts $n $*"
  incg $KF bench --store "$STORE" --ceilings "$STORE/ceilings.json" --prompts "$n" --prompt-len "$PLEN" --gen-len "${GEN:-32}" \
    --gpu-memory "$GPU" --cpu-memory "${CPUMEM:-14GiB}" --cold --json "$RES/$name.json" "$@" 2>&1 \
    | grep -E "^(policy auto|  |workload|measured|cost model|roofline|efficiency|peak|load_|store_|compute_layer|prefill|decode|block)|rror"
}
flexgen() { # name [FlexGen args…]
  local name=$1; shift
  echo "=== $name: FlexGen $*"
  incg python3 bench/peers/flexgen_opt.py --json "$RES/$name.json" --gpu-memory "$GPU" --cold "${FG_OPTS[@]}" -- \
    --path _DUMMY_ --offload-dir /root/fgoff --prompt-len "$PLEN" --gen-len 32 --cut-gen-len 4 "$@" 2>&1 | tail -4
  rm -rf /root/fgoff
}
FG_OPTS=()
for step in "$@"; do case $step in
  ceilings) ceilings ;;
  # ours, fp16: converted outside the cgroup, then the auto policy under the budgets
  ours13) $KF convert dummy:opt-13b --out "$STORE/opt13" --dtype float16 2>&1 | tail -1
          CPUMEM=10GiB ours ours-opt13-fp16 16 --model "$STORE/opt13"; rm -rf "$STORE/opt13" ;;
  # ours on the workload of acc13, air13 and zero13 (16 prompts x 512 tokens, 4 generated), host budget 12 GiB of
  # the 16G cgroup (the ZeRO comparison in docs/benchmarks.md, session 11)
  ours13z) $KF convert dummy:opt-13b --out "$STORE/opt13" --dtype float16 2>&1 | tail -1
           GEN=4 CPUMEM=12GiB ours ours-opt13-fp16-gen4-cpu12 16 --model "$STORE/opt13"; rm -rf "$STORE/opt13" ;;
  # ours, compression allowed: the cost model may pick int8/int4 weights and 8/4-bit KV (converted first)
  ours13c) ours ours-opt13-auto-compress 64 --model dummy:opt-13b --allow-compression
           rm -rf "$STORE/models" ;;
  # FlexGen, fp16 weights on disk, KV and activations on the GPU (its best fit under 12 GiB for 16 prompts)
  fg13) flexgen fg-opt13-fp16-disk --model facebook/opt-13b --percent 0 0 100 0 100 0 --gpu-batch-size 16 ;;
  # FlexGen, 4-bit group-wise weights and KV (--compress-weight --compress-cache), weights in CPU memory, KV on
  # the GPU; 2 copy threads (4 GiB pinned) so weights + buffers fit the cgroup
  fg13c) FG_OPTS=(--copy-threads 2)
         flexgen fg-opt13-compress-cpu --model facebook/opt-13b --percent 0 100 100 0 100 0 --gpu-batch-size 32 \
           --num-gpu-batches 2 --compress-weight --compress-cache
         FG_OPTS=() ;;
  # transformers + accelerate disk offload, 4 layers resident on the GPU, 16 prompts, 4 tokens (every token
  # re-reads the offloaded weights, so tokens/s barely depends on the generation length)
  acc13) incg python3 bench/peers/accelerate_opt.py --model opt-13b --offload-folder /root/acc13 \
           --json "$RES/acc-opt13-disk.json" --prompts 16 --prompt-len 512 --gen-len 4 --gpu-layers 4 \
           --gpu-memory "$GPU" --cold 2>&1 | tail -3
         rm -rf /root/acc13 ;;
  # AirLLM 4.0.0 (its wheel carried in .whl): fp16 opt-13b streamed layer by layer from AirLLM's own per-module
  # files, which the script writes directly outside the cgroup (25.7 GB on disk, no HF checkpoint; AirLLM finds its
  # split complete and skips it), then the workload of acc13 (16 prompts x 512 tokens, 4 generated) in the cgroup.
  # AirLLM keeps a KV cache but re-reads every layer for each token: 4 x 25.7 GB read. Every phase and forward is
  # logged with timestamps on stdout and in $RES/air-opt13.log; the run stops itself after AIR_LIMIT seconds
  # (default 360) and then writes a partial JSON ("complete": false, the forwards done).
  air13) rm -f "$RES/air-opt13.log"
         python3 bench/peers/airllm_peer.py --model opt-13b --dir /root/air13 --log "$RES/air-opt13.log" --setup-only &&
         incg python3 bench/peers/airllm_peer.py --model opt-13b --dir /root/air13 --json "$RES/air-opt13.json" \
           --log "$RES/air-opt13.log" --prompts 16 --prompt-len 512 --gen-len 4 --gpu-memory "$GPU" --cold \
           --time-limit "${AIR_LIMIT:-360}"
         rm -rf /root/air13 ;;
  # DeepSpeed ZeRO-Inference 0.19.8 (wheels and libaio carried in .whl, bench/device-setup.sh): ZeRO-3 with every
  # parameter on NVMe through its async I/O, fp16 opt-13b, the workload of acc13 and air13
  zero13) incg python3 bench/peers/zero_inference.py --model opt-13b --nvme-dir /root/zero13 --json "$RES/zero-opt13.json" \
            --prompts 16 --prompt-len 512 --gen-len 4 --gpu-memory "$GPU" --cold --log "$RES/zero-opt13-phases.log" \
            --time-limit "${ZERO_LIMIT:-560}" 2>&1 | tee "$RES/zero-opt13.log" \
            | grep -v "^\[20" | tail -5
          rm -rf /root/zero13 ;;
  # long-context decode: opt-1.3b with 32K learned positions (a shape; FlexGen's max_seq_len raised to match),
  # 16 prompts of 8192 tokens + 32 generated; the KV cache (26 GB) is offloaded to CPU memory: GPU capped at 16 GiB,
  # cgroup at 64G (the cache lives in host memory for both systems).
  ourslc) PLEN=8192 GPU=16GiB CG=64G CPUMEM=56GiB ours ours-lc8k-opt1.3b 16 --model dummy:opt-1.3b-32k ;;
  # the same with the KV cache pinned to CPU memory (--policy auto --kv cpu: the rest planned), as FlexGen's is
  ourslcc) PLEN=8192 GPU=16GiB CG=64G CPUMEM=56GiB ours ours-lc8k-opt1.3b-kvcpu 16 --model dummy:opt-1.3b-32k \
             --policy auto --kv cpu ;;
  # FlexGen: weights on the GPU, KV cache 100% in CPU memory (GPU attention), one sequence per micro-batch (its
  # prefill materializes the 32 x 8192 x 8192 attention scores of a sequence: ~8.6 GB at its peak)
  fglc) (PLEN=8192 GPU=16GiB CG=64G FG_OPTS=(--max-seq-len 8224)
         flexgen fg-lc8k-opt1.3b --model facebook/opt-1.3b --percent 100 0 0 100 100 0 --gpu-batch-size 1 \
           --num-gpu-batches 16) ;;
  # 32K prompts (issue 18): Llama-3-8B with 32K positions (GQA), 4 prompts of 32,736 tokens + $GEN generated (default
  # 4: every decode step reads the whole 16 GiB cache back from the SSD), the KV cache pinned to the SSD (--kv disk,
  # the rest planned), GPU capped at 40 GiB, cgroup 12G (below the cache, so the page cache cannot hold it).
  # FlexGen has no GQA: its side by side is fglc's OPT shape.
  ours32k) PLEN=32736 GPU=40GiB CG=12G CPUMEM=10GiB GEN=${GEN:-4} ours ours-lc32k-llama3-8b-kvdisk 4 \
             --model dummy:llama-3-8b-32k --policy auto --kv disk ;;
  # opt-30b with its weights in CPU memory (60 GB fp16, more than the ~45 GB free disk: an all-zero store, sparse
  # files, same shapes and bytes moved), 32 prompts of 512 + 32, GPU capped at 12 GiB, no cgroup limit (host
  # memory holds the weights and the KV cache for both systems). 64 prompts do not fit FlexGen in the machine's
  # 125 GB: its pinned weights are rounded up by PyTorch's pinned allocator, its 48 GB cache is pageable.
  ours30) GPU=12GiB CG=max CPUMEM=100GiB ours ours-opt30-cpu 32 --model dummy:opt-30b@zeros ;;
  ours30x64) GPU=12GiB CG=max CPUMEM=100GiB ours ours-opt30-cpu-64 64 --model dummy:opt-30b@zeros ;;
  ours30x96) GPU=12GiB CG=max CPUMEM=100GiB ours ours-opt30-cpu-96 96 --model dummy:opt-30b@zeros ;;
  ours30x128) GPU=12GiB CG=max CPUMEM=104GiB ours ours-opt30-cpu-128 128 --model dummy:opt-30b@zeros ;;
  # FlexGen: weights 100% in (pinned) CPU memory, KV cache 100% in CPU memory (GPU attention), 32 x 1
  fg30) (GPU=12GiB CG=max
        flexgen fg-opt30-cpu --model facebook/opt-30b --percent 0 100 0 100 100 0 --gpu-batch-size 32 \
          --num-gpu-batches 1) ;;
  # the same with 48 prompts in one micro-batch: FlexGen's largest batch that the 125 GB host might hold
  fg30x48) (GPU=12GiB CG=max
        flexgen fg-opt30-cpu-48 --model facebook/opt-30b --percent 0 100 0 100 100 0 --gpu-batch-size 48 \
          --num-gpu-batches 1) ;;
  fg30x56) (GPU=12GiB CG=max
        flexgen fg-opt30-cpu-56 --model facebook/opt-30b --percent 0 100 0 100 100 0 --gpu-batch-size 56 \
          --num-gpu-batches 1) ;;
  *) echo "unknown step $step"; exit 2 ;;
esac; done
