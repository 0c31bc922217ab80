#!/usr/bin/env bash
# Build the node binaries (kubelet, kube-proxy) from Go modules, next to the control plane that
# kind/build-control-plane.sh builds: same cache dir, same version key, same wrapper module.
#
# Output: the bin dir of kind/build-control-plane.sh (…/k8s/<version-key>/bin/{kubelet,kube-proxy}).
# Idempotent: a binary that is already built is skipped. Runs kind/build-control-plane.sh first
# (which is itself a no-op when everything is cached) so its resolved module is there.
#
# Usage:
#   kind/build-node.sh            build what is missing; the last stdout line is the bin dir
#   kind/build-node.sh --check    exit 0 when kubelet and kube-proxy are present, 1 otherwise
# Exit status 3 means Go is not installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN_DIR="$(bash "${here}/build-control-plane.sh" --print-bin-dir)"
CACHE_DIR="$(dirname "${BIN_DIR}")"
K8S_SRC="${CACHE_DIR}/src/kubernetes"
K8S_VERSION="$(basename "${CACHE_DIR}" | sed -n 's/^k8s-\(v[^_]*\)_.*/\1/p')"
BINARIES=(kubelet kube-proxy)

log() { printf '[build-node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
all_present() { local b; for b in "${BINARIES[@]}"; do [[ -x "${BIN_DIR}/${b}" ]] || return 1; done; }

case "${1:-}" in
  --check) all_present; exit $? ;;
  "") ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

if all_present; then log "kubelet and kube-proxy present in ${BIN_DIR}"; echo "${BIN_DIR}"; exit 0; fi
command -v go >/dev/null 2>&1 || { log "ERROR: go is not installed (needed to build kubelet and kube-proxy)"; exit 3; }

# The control plane first: it resolves the k8s.io/kubernetes wrapper module we build from.
bash "${here}/build-control-plane.sh" >/dev/null

exec 9>"${CACHE_DIR}/.lock"
if ! flock -n 9; then log "another build holds ${CACHE_DIR}/.lock; waiting"; flock 9; fi

export CGO_ENABLED=0 GOWORK=off GOFLAGS="-mod=mod" GO111MODULE=on
JOBS="${KUBEFLASH_BUILD_JOBS:-2}"
K8S_MINOR="${K8S_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
LDFLAGS="-s -w"
LDFLAGS+=" -X k8s.io/component-base/version.gitVersion=${K8S_VERSION}"
LDFLAGS+=" -X k8s.io/component-base/version.gitMajor=1"
LDFLAGS+=" -X k8s.io/component-base/version.gitMinor=${K8S_MINOR}"
LDFLAGS+=" -X k8s.io/component-base/version.gitTreeState=clean"
LDFLAGS+=" -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION}"
TOTAL_START=$SECONDS
for c in "${BINARIES[@]}"; do
  if [[ -x "${BIN_DIR}/${c}" ]]; then log "${c}: already built, skipping"; continue; fi
  t0=$SECONDS
  log "${c}: building ${K8S_VERSION}"
  (cd "${K8S_SRC}" && go get "k8s.io/kubernetes/cmd/${c}@${K8S_VERSION}" >&2 \
    && go build -p "${JOBS}" -tags=selinux,notest -ldflags "${LDFLAGS}" \
         -o "${BIN_DIR}/.${c}.tmp" "k8s.io/kubernetes/cmd/${c}" >&2)
  chmod +x "${BIN_DIR}/.${c}.tmp"
  mv -f "${BIN_DIR}/.${c}.tmp" "${BIN_DIR}/${c}"
  log "${c}: built in $((SECONDS - t0))s"
done
echo "node_build_seconds_this_run=$((SECONDS - TOTAL_START))" >> "${CACHE_DIR}/VERSIONS"
all_present || { log "ERROR: kubelet or kube-proxy missing in ${BIN_DIR}"; exit 1; }
log "done in $((SECONDS - TOTAL_START))s: ${BIN_DIR}"
echo "${BIN_DIR}"
