#!/usr/bin/env bash
# Build csi-sanity (github.com/kubernetes-csi/csi-test/v5) from its Go module, for `make csi-sanity`
# and tests/csi.
#
# Output: ${KUBEFLASH_CSI_CACHE:-$HOME/.cache/kubeflash/csi-test}/<version>/bin/csi-sanity
# Nothing is written into the repository. Idempotent: a built binary is reused, keyed by version.
#
# Usage:
#   kind/build-csi-sanity.sh                 build if missing; the last stdout line is the binary's path
#   kind/build-csi-sanity.sh --print-bin     print the binary's path only (builds nothing)
#   kind/build-csi-sanity.sh --check         exit 0 when the binary is present, 1 otherwise
#
# The version can be overridden with KUBEFLASH_CSI_TEST_VERSION (a new cache key).
# Exit status 3 means Go is not installed.
set -euo pipefail

VERSION="${KUBEFLASH_CSI_TEST_VERSION:-v5.6.0}"
CACHE_ROOT="${KUBEFLASH_CSI_CACHE:-${HOME}/.cache/kubeflash/csi-test}"
CACHE_DIR="${CACHE_ROOT}/${VERSION}"
BIN="${CACHE_DIR}/bin/csi-sanity"

log() { printf '[build-csi-sanity %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

case "${1:-}" in
  --print-bin) echo "${BIN}"; exit 0 ;;
  --check) [[ -x "${BIN}" ]]; exit $? ;;
  "") ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

if [[ -x "${BIN}" ]]; then log "csi-sanity ${VERSION} present"; echo "${BIN}"; exit 0; fi
command -v go >/dev/null 2>&1 || { log "ERROR: go is not installed (needed to build csi-sanity)"; exit 3; }

mkdir -p "${CACHE_DIR}/bin"
exec 9>"${CACHE_DIR}/.lock"
command -v flock >/dev/null 2>&1 && { flock -n 9 || { log "another build holds the lock; waiting"; flock 9; }; }
[[ -x "${BIN}" ]] && { echo "${BIN}"; exit 0; }

t0=$SECONDS
tmpbin="$(mktemp -d "${CACHE_DIR}/.gobin.XXXXXX")"
trap 'rm -rf "${tmpbin}"' EXIT
log "go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${VERSION}"
# GOFLAGS=-mod=mod is not allowed with 'go install pkg@version'; -p 2 suits a small machine.
CGO_ENABLED=0 GOWORK=off GOFLAGS="" GOBIN="${tmpbin}" \
  go install -p "${KUBEFLASH_BUILD_JOBS:-2}" -ldflags "-s -w -X main.version=${VERSION}" \
  "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${VERSION}" >&2
chmod +x "${tmpbin}/csi-sanity"
mv -f "${tmpbin}/csi-sanity" "${BIN}"
printf 'csi-test=%s\ngo=%s\nbuilt=%s\n' "${VERSION}" "$(go env GOVERSION)" "$(date -u +%FT%TZ)" > "${CACHE_DIR}/VERSIONS"
log "built in $((SECONDS - t0))s: ${BIN}"
echo "${BIN}"
