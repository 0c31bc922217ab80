#!/usr/bin/env bash
# End-to-end on kind: a two-worker cluster with fake GPUs and host directories as NVMe SSDs, both images
# built and loaded, the chart installed, and the ready example answered ("Paris").
#   kind/e2e.sh            up, run, then down (unless KEEP=1)
#   kind/e2e.sh up         cluster + fake GPUs + images + chart (idempotent: reuses a running cluster)
#   kind/e2e.sh run        the example job: wait for Succeeded, print the results, check for "Paris"
#   kind/e2e.sh down       delete the cluster and the fake SSD directories
# Env: CLUSTER (kubeflash-e2e), KEEP=1 (leave the cluster up), KUBECONFIG_FILE (where the cluster's kubeconfig
# goes; default /tmp/kubeflash-<cluster>.kubeconfig), SKIP_BUILD=1 (reuse the images), TIMEOUT (job wait, s).
# Needs docker, kind, kubectl, curl and helm (helm: $HELM, on PATH, or the one kind/build-control-plane.sh built).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${CLUSTER:-kubeflash-e2e}"
export KUBECONFIG="${KUBECONFIG_FILE:-/tmp/kubeflash-${cluster}.kubeconfig}"
timeout="${TIMEOUT:-900}"
namespace=kubeflash-system
job=capital-of-france
operator_image=kubeflash-operator:e2e
node_image=kubeflash:e2e-cpu
# The workers' fake SSDs: kind/cluster.yaml's hostPaths, made per cluster so two clusters never share a store.
nvme_dirs=("/tmp/${cluster}-nvme-1" "/tmp/${cluster}-nvme-2")

log() { echo "[e2e $(date +%H:%M:%S)] $*" >&2; }

find_helm() {
  if [[ -n "${HELM:-}" ]]; then echo "$HELM"; return; fi
  if command -v helm >/dev/null; then command -v helm; return; fi
  local built
  built="$(bash "$root/kind/build-control-plane.sh" --print-bin-dir)/helm"
  [[ -x "$built" ]] || { log "helm not found (set HELM, install helm, or run kind/build-control-plane.sh)"; exit 1; }
  echo "$built"
}

require() {
  local missing=()
  for tool in docker kind kubectl curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [[ ${#missing[@]} -gt 0 ]]; then log "missing: ${missing[*]}"; exit 1; fi
  docker info >/dev/null 2>&1 || { log "docker is not running"; exit 1; }
}

up() {
  require
  local helm
  helm="$(find_helm)"
  mkdir -p "${nvme_dirs[@]}"
  local reused=0
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    log "reusing kind cluster $cluster"
    reused=1
  else
    log "creating kind cluster $cluster"
    local config
    config="$(mktemp)"
    sed "s#/tmp/kubeflash-nvme-#/tmp/${cluster}-nvme-#" "$root/kind/cluster.yaml" >"$config"
    kind create cluster --name "$cluster" --config "$config" --wait 180s
    rm -f "$config"
  fi
  kind get kubeconfig --name "$cluster" >"$KUBECONFIG"
  "$root/kind/fake-gpus.sh" 2
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building $operator_image and $node_image"
    docker build -f "$root/operator/Dockerfile" -t "$operator_image" "$root"
    docker build -f "$root/node-agent/Dockerfile" --build-arg VARIANT=cpu -t "$node_image" "$root"
  fi
  log "loading the images into the nodes"
  kind load docker-image --name "$cluster" "$operator_image" "$node_image"
  log "installing the chart"
  "$helm" upgrade --install kubeflash "$root/helm/kubeflash" -n "$namespace" --create-namespace \
    -f "$root/kind/values.yaml" --wait --timeout 10m
  if [[ $reused == 1 ]]; then  # same tags, new images: restart to pick them up
    kubectl -n "$namespace" rollout restart deployment/kubeflash-operator daemonset/kubeflash-agent >/dev/null
  fi
  kubectl -n "$namespace" rollout status deployment/kubeflash-operator --timeout=5m
  kubectl -n "$namespace" rollout status daemonset/kubeflash-agent --timeout=5m
  log "waiting for both workers' FlashNodes to report GPU<->SSD pairs"
  local deadline=$((SECONDS + 300))
  until [[ "$(kubectl get nodes -l kubeflash.io/gpu-ssd-pairs=2 -o name | wc -l)" -eq 2 ]]; do
    (( SECONDS < deadline )) || { kubectl get flashnodes -o yaml >&2; log "agents did not report"; exit 1; }
    sleep 3
  done
  kubectl get flashnodes
}

run() {
  log "submitting examples/$job.yaml"
  kubectl delete ij "$job" --ignore-not-found --wait=true >/dev/null
  kubectl apply -f "$root/examples/$job.yaml"
  local deadline=$((SECONDS + timeout)) phase=""
  while :; do
    phase="$(kubectl get ij "$job" -o jsonpath='{.status.phase}')"
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    (( SECONDS < deadline )) || break
    sleep 5
  done
  kubectl get ij "$job" -o wide
  if [[ "$phase" != Succeeded ]]; then
    kubectl describe ij "$job" >&2
    kubectl logs -l "kubeflash.io/job=$job" --tail=100 >&2 || true
    log "job ended $phase (waited ${timeout}s at most)"
    exit 1
  fi
  # The results live in the job's directory on the node's SSD: <disk path>/jobs/<namespace>/<job>/results.jsonl
  local node disk path
  node="$(kubectl get ij "$job" -o jsonpath='{.status.node}')"
  disk="$(kubectl get ij "$job" -o jsonpath='{.status.disk}')"
  path="$(kubectl get flashnode "$node" -o jsonpath="{.status.disks[?(@.name==\"$disk\")].path}")"
  log "results from $node:$path/jobs/default/$job/results.jsonl"
  local results
  results="$(docker exec "$node" cat "$path/jobs/default/$job/results.jsonl")"
  echo "$results"
  kubectl logs -l "kubeflash.io/job=$job" --tail=30 || true
  grep -q Paris <<<"$results" || { log "no 'Paris' in the results"; exit 1; }
  log "ok: the example answered Paris"
}

down() {
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    log "deleting kind cluster $cluster"
    # the fake SSDs' contents belong to root inside the nodes: empty them from there first
    for node in $(kind get nodes --name "$cluster"); do
      docker exec "$node" sh -c 'rm -rf /var/lib/kubeflash/* /var/lib/kubeflash/.[!.]*' 2>/dev/null || true
    done
    kind delete cluster --name "$cluster"
  fi
  rmdir "${nvme_dirs[@]}" 2>/dev/null || true
  rm -f "$KUBECONFIG"
}

case "${1:-all}" in
  up) up ;;
  run) run ;;
  down) down ;;
  all)
    if [[ "${KEEP:-0}" != 1 ]]; then trap down EXIT; fi
    up
    run
    ;;
  *) echo "usage: $0 [up|run|down|all]" >&2; exit 2 ;;
esac
