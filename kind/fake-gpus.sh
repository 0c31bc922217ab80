#!/usr/bin/env bash
# Advertise fake NVIDIA GPUs on the kind workers: adds nvidia.com/gpu to each node's status capacity (the
# kubelet derives allocatable from it), so the scheduler places the operator's inference pods (which request
# nvidia.com/gpu) as on real GPU nodes. There is no device plugin: the pods run on the CPU.
#   kind/fake-gpus.sh [COUNT] [NODE...]   COUNT per node (default 2); nodes default to every kubeflash.io/ssd=true node
# Uses the current kubectl context (KUBECONFIG).
set -euo pipefail
count="${1:-2}"
shift || true
nodes=("$@")
if [[ ${#nodes[@]} -eq 0 ]]; then
  mapfile -t nodes < <(kubectl get nodes -l kubeflash.io/ssd=true -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
fi
if [[ ${#nodes[@]} -eq 0 ]]; then
  echo "fake-gpus: no nodes labelled kubeflash.io/ssd=true" >&2
  exit 1
fi

# nodes/status can only be patched through the API; kubectl proxy serves it on loopback with our credentials.
port="${PROXY_PORT:-8011}"
kubectl proxy --port="$port" >/dev/null 2>&1 &
proxy=$!
trap 'kill "$proxy" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$port/api" >/dev/null 2>&1 && break
  sleep 0.2
done

for node in "${nodes[@]}"; do
  curl -fsS -o /dev/null --request PATCH \
    --header "Content-Type: application/json-patch+json" \
    --data "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$count\"}]" \
    "http://127.0.0.1:$port/api/v1/nodes/$node/status"
  # wait until the kubelet's next status update carries it into allocatable
  for _ in $(seq 60); do
    got="$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')"
    [[ "$got" == "$count" ]] && break
    sleep 1
  done
  if [[ "$got" != "$count" ]]; then
    echo "fake-gpus: $node allocatable nvidia.com/gpu is '${got}', expected $count" >&2
    exit 1
  fi
  echo "fake-gpus: $node has nvidia.com/gpu: $count"
done
