#!/usr/bin/env bash
# Copy the CRDs (crds/*.yaml, the API's single source of truth) into the chart, which templates them from
# helm/kubeflash/files/crds/ (Helm's .Files cannot read outside the chart directory).
#   kind/sync-crds.sh           copy
#   kind/sync-crds.sh --check   exit 1 if the chart's copies differ from crds/ (tests/cluster/test_helm.py checks too)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/crds"
dst="$root/helm/kubeflash/files/crds"

if [[ "${1:-}" == "--check" ]]; then
  if diff -r "$src" "$dst" >/dev/null; then
    echo "chart CRDs match crds/"
  else
    diff -r "$src" "$dst" >&2 || true
    echo "chart CRDs differ from crds/: run kind/sync-crds.sh" >&2
    exit 1
  fi
  exit 0
fi

mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
echo "copied $(find "$src" -maxdepth 1 -name '*.yaml' | wc -l) CRDs into ${dst#"$root"/}"
