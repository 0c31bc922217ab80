#!/usr/bin/env bash
# Build the images the real-node harness runs, with no registry: a Debian bookworm base made with debootstrap
# (python3 3.11 + venv, the host's CA bundle and pip config), a pause image (a static Go binary), the operator
# image and the node image (operator/Dockerfile, node-agent/Dockerfile, classic builder, FROM that base).
# Each image is cached as a docker-save tar under ${KUBEFLASH_IMAGE_CACHE:-~/.cache/kubeflash/images}, named by
# a key over what goes into it (Dockerfile, .dockerignore, the sources it copies, its dependency locks, the
# base's key), so a second run reuses the tar without starting Docker, a lock change makes a new key, and a code
# change rebuilds only the last layer (Docker's layer cache lives in ~/.cache/kubeflash/docker).
# The node image's locked wheels (node-agent/requirements/{torch,engine}.lock) are downloaded on the host while the
# base and the operator image build (pip download --require-hashes, into ${KUBEFLASH_WHEELS:-~/.cache/kubeflash/
# wheels}/<lock>-<key>/) and served to the build on 127.0.0.1:${KUBEFLASH_WHEELS_PORT:-48731}; once the node
# image is saved they are deleted (a <lock>-<key>.built file stays, so a code change does not download them again;
# KUBEFLASH_KEEP_WHEELS=1 keeps them). Any failure there falls back to PyPI inside the build; hashes are checked
# either way.
#
#   kind/images.sh          build what is missing; prints one line per image: <ref> <tar>
#   kind/images.sh --keys   print the refs only (builds nothing)
# Needs root, docker.io (dockerd), debootstrap, go. Starts its own dockerd on a private socket and stops it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KUBEFLASH_IMAGE_CACHE:-${HOME}/.cache/kubeflash/images}"
docker_root="${KUBEFLASH_DOCKER_ROOT:-${HOME}/.cache/kubeflash/docker}"
run_dir="${KUBEFLASH_IMAGES_RUN:-/run/kubeflash-images}"  # dockerd socket, pid, build logs
wheels="${KUBEFLASH_WHEELS:-${HOME}/.cache/kubeflash/wheels}"
wheels_port="${KUBEFLASH_WHEELS_PORT:-48731}"
mirror="${KUBEFLASH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
base_packages=python3,python3-venv,python-is-python3,ca-certificates,passwd
# The build context: the working tree, or with KUBEFLASH_IMAGE_SOURCE=<git revision> (e.g. HEAD) that commit's
# files only (a tree with someone's half-done edits still builds what was committed).
ctx="$root"
if [[ -n "${KUBEFLASH_IMAGE_SOURCE:-}" ]]; then
  ctx="$(mktemp -d /var/tmp/kubeflash-context.XXXXXX)"
  trap 'rm -rf "$ctx"' EXIT
  git -C "$root" archive "${KUBEFLASH_IMAGE_SOURCE}" pyproject.toml README.md .dockerignore node-agent operator \
    | tar -x -C "$ctx"
fi
export DOCKER_HOST="unix://${run_dir}/docker.sock" DOCKER_BUILDKIT=0

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sha() { sha256sum | cut -c1-12; }

# The key of an image built from the repository: its Dockerfile, .dockerignore, its locks and every file it may copy.
source_key() { # dockerfile base_ref lock...
  {
    echo "$2"
    cat "$ctx/$1" "$ctx/.dockerignore"
    local lock; for lock in "${@:3}"; do echo "$lock"; cat "$ctx/$lock"; done
    (cd "$ctx" && find pyproject.toml README.md node-agent/kubeflash_* operator/kubeflash_* -type f \
        ! -path '*/__pycache__/*' ! -name '*.py[co]' | LC_ALL=C sort \
      | while read -r f; do echo "$f"; cat "$f"; done)
  } | sha
}

host_pip_conf() { # the host's pip settings, as a pip.conf for the base image (pip needs PyPI in the build)
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  local idx="${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}"
  [[ -n "$idx" ]] && echo "index-url = $idx"
  local extra="${PIP_EXTRA_INDEX_URL:-$(pip config get global.extra-index-url 2>/dev/null || true)}"
  [[ -n "$extra" ]] && echo "extra-index-url = $extra"
  return 0
}

base_key="$( { echo "$suite $mirror $base_packages"; host_pip_conf; sha256sum /etc/ssl/certs/ca-certificates.crt; } | sha)"
base_ref="kubeflash-base:${suite}-${base_key}"
pause_ref="kubeflash/pause:${base_key}"
operator_ref="kubeflash-operator:op-$(source_key operator/Dockerfile "$base_ref" operator/requirements/operator.lock)"
node_locks=(node-agent/requirements/torch.lock node-agent/requirements/engine.lock node-agent/requirements/kvikio.lock)
node_ref="kubeflash:node-$(source_key node-agent/Dockerfile "$base_ref" "${node_locks[@]}")"
tar_of() { echo "${cache}/${1//[:\/]/_}.tar"; }

if [[ "${1:-}" == --keys ]]; then printf '%s\n' "$pause_ref" "$operator_ref" "$node_ref"; exit 0; fi
[[ $EUID -eq 0 ]] || { log "ERROR: needs root (dockerd, debootstrap)"; exit 1; }
mkdir -p "$cache" "$run_dir"

missing=0
for ref in "$pause_ref" "$operator_ref" "$node_ref"; do [[ -s "$(tar_of "$ref")" ]] || missing=1; done
if (( missing == 0 )); then
  log "all images cached in $cache"
  for ref in "$pause_ref" "$operator_ref" "$node_ref"; do echo "$ref $(tar_of "$ref")"; done
  exit 0
fi

exec 8>"${cache}/.lock"
flock 8

# ---------------------------------------------------------------- the node image's wheels, downloaded on the host
# Started before anything else (network bound: it overlaps debootstrap and the operator build). A lock whose
# wheels an earlier build installed (<lock>-<key>.built: Docker's layer cache has that layer) is not fetched.
wheel_key() { sha256sum <"$ctx/node-agent/requirements/$1.lock" | cut -c1-12; }
fetch_wheels() { # lock: its wheels for the image's CPython 3.11 on Linux x86_64 (glibc 2.36), hashes checked
  local dir; dir="$wheels/$1-$(wheel_key "$1")"
  [[ -d "$dir" ]] && return 0
  local py="$root/.venv/bin/python" plats=() y t0=$SECONDS
  [[ -x "$py" ]] || py=python3
  for y in $(seq 36 -1 17); do plats+=(--platform "manylinux_2_${y}_x86_64"); done
  rm -rf "$dir.tmp"
  "$py" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
      --python-version 3.11 --implementation cp "${plats[@]}" --platform manylinux2014_x86_64 \
      --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
      -d "$dir.tmp" -r "$ctx/node-agent/requirements/$1.lock" >"${run_dir}/wheels-$1.log" 2>&1 || return 1
  mv "$dir.tmp" "$dir"
  log "$1.lock: $(find "$dir" -name "*.whl" | wc -l) wheels ($(du -sh "$dir" | cut -f1)) downloaded in $((SECONDS - t0))s"
}
wheels_pid="" server_pid=""
if [[ ! -s "$(tar_of "$node_ref")" ]]; then
  mkdir -p "$wheels"
  ( rc=0
    for lock in torch engine; do
      [[ -e "$wheels/$lock-$(wheel_key "$lock").built" ]] && continue
      fetch_wheels "$lock" || { log "WARNING: downloading the wheels of $lock.lock failed (${run_dir}/wheels-$lock.log): the build takes them from PyPI"; rc=1; }
    done
    exit $rc ) &
  wheels_pid=$!
fi
serve_wheels() { # a page per lock at http://127.0.0.1:$wheels_port/<lock>/ for pip's --find-links (build args)
  [[ -z "$wheels_pid" ]] || wait "$wheels_pid" || true
  local serve="$wheels/.serve" lock
  rm -rf "$serve"; mkdir -p "$serve"
  for lock in torch engine; do
    [[ -d "$wheels/$lock-$(wheel_key "$lock")" ]] && ln -s "../$lock-$(wheel_key "$lock")" "$serve/$lock"
  done
  python3 -m http.server --bind 127.0.0.1 --directory "$serve" "$wheels_port" >"${run_dir}/wheels-http.log" 2>&1 &
  server_pid=$!
  sleep 0.5
  kill -0 "$server_pid" 2>/dev/null || log "WARNING: could not serve the wheels on 127.0.0.1:$wheels_port (${run_dir}/wheels-http.log): the build takes them from PyPI"
}
wheels_built() { # the node image is saved: mark its locks' wheels as installed in Docker's cache, free their space
  local lock key old
  for lock in torch engine; do
    key="$(wheel_key "$lock")"
    touch "$wheels/$lock-$key.built"
    for old in "$wheels/$lock"-*; do
      [[ "$old" == "$wheels/$lock-$key.built" ]] && continue
      [[ "$old" == "$wheels/$lock-$key" && "${KUBEFLASH_KEEP_WHEELS:-0}" == 1 ]] && continue
      rm -rf "$old"
    done
  done
  rm -rf "$wheels/.serve"
}

dockerd_pid=""
stop_dockerd() {
  if [[ -n "$dockerd_pid" ]]; then
    kill "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "${run_dir}/dockerd.pid"
  fi
  # what a dockerd killed mid-way leaves mounted (its default network namespace)
  if mountpoint -q "${run_dir}/docker-exec/netns/default" 2>/dev/null; then umount "${run_dir}/docker-exec/netns/default" || true; fi
}
stop_helpers() { local p; for p in "$server_pid" "$wheels_pid"; do [[ -z "$p" ]] || kill "$p" 2>/dev/null || true; done; }
trap 'stop_helpers; stop_dockerd; [[ "$ctx" == "$root" ]] || rm -rf "$ctx"' EXIT
trap 'exit 130' INT TERM
# a dockerd left by an interrupted run of this script (the lock says no run is going on): adopt it, stop it below
if [[ -f "${run_dir}/dockerd.pid" ]] && kill -0 "$(cat "${run_dir}/dockerd.pid")" 2>/dev/null; then
  dockerd_pid="$(cat "${run_dir}/dockerd.pid")"
fi
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { log "ERROR: dockerd is not installed (apt-get install docker.io)"; exit 1; }
  mkdir -p "$docker_root"
  log "starting dockerd (data root $docker_root, socket ${run_dir}/docker.sock, no bridge, no iptables)"
  dockerd --data-root "$docker_root" --exec-root "${run_dir}/docker-exec" --pidfile "${run_dir}/docker.pid" \
    --host "$DOCKER_HOST" --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    >"${run_dir}/dockerd.log" 2>&1 &
  dockerd_pid=$!
  echo "$dockerd_pid" >"${run_dir}/dockerd.pid"
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "${run_dir}/dockerd.log" >&2; log "ERROR: dockerd did not start"; exit 1; }
fi

drop_older_tars() { # ref: the tars of older keys of the same image (a new key replaces them)
  local tar old prefix; tar="$(tar_of "$1")"; prefix="$(tar_of "${1%-*}-")"
  for old in "${prefix%.tar}"*.tar; do [[ "$old" == "$tar" || ! -f "$old" ]] || rm -f "$old"; done
}
need_space() { # dir bytes what: fail at once, naming the disk and the numbers, when dir has less free
  local free; free=$(( $(stat -f -c '%a * %S' "$1") ))
  (( free >= $2 )) || { log "ERROR: $3 needs about $(( $2 >> 30 )) GiB free in $1 ($(df -h --output=target "$1" | tail -1 | tr -d ' ')), which has $(( free >> 30 )) GiB; free some (old test runs: rm -rf /tmp/pytest-of-\$USER) and run again"; exit 1; }
}
save() { # ref: the tar (older keys' tars dropped first: one image's tar on disk at a time), then older tags
  local tar; tar="$(tar_of "$1")"
  drop_older_tars "$1"
  need_space "$cache" $(( $(docker image inspect -f '{{.Size}}' "$1") + (1 << 30) )) "saving $1"
  docker save -o "${tar}.tmp" "$1"
  mv -f "${tar}.tmp" "$tar"
  log "$1 saved to $tar ($(du -h "$tar" | cut -f1))"
  docker images --format '{{.Repository}}:{{.Tag}}' "${1%:*}" | grep -vxF "$1" | xargs -r docker rmi >/dev/null || true
}

# ---------------------------------------------------------------- base (debootstrap)
if ! docker image inspect "$base_ref" >/dev/null 2>&1; then
  if [[ -s "$(tar_of "$base_ref")" ]]; then
    docker load -i "$(tar_of "$base_ref")" >&2
  else
    command -v debootstrap >/dev/null || { log "ERROR: debootstrap is not installed"; exit 1; }
    t0=$SECONDS
    rootfs="$(mktemp -d /var/tmp/kubeflash-base.XXXXXX)"
    log "debootstrap $suite ($base_packages) from $mirror"
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" >"${run_dir}/debootstrap.log" 2>&1 \
      || { tail -20 "${run_dir}/debootstrap.log" >&2; rm -rf "$rootfs"; log "ERROR: debootstrap failed"; exit 1; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    host_pip_conf >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base_ref" >/dev/null
    rm -rf "$rootfs"
    log "base $base_ref made in $((SECONDS - t0))s"
    save "$base_ref"
  fi
fi

# ---------------------------------------------------------------- pause (the pods' sandbox)
if [[ ! -s "$(tar_of "$pause_ref")" ]]; then
  src="$(mktemp -d)"
  cat >"$src/main.go" <<'GO'
// pause: holds a pod's namespaces; exits on SIGINT/SIGTERM, reaps children.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				if pid, _ := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
GO
  printf 'module kubeflash.local/pause\n\ngo 1.22\n' >"$src/go.mod"
  (cd "$src" && CGO_ENABLED=0 GOFLAGS='' go build -ldflags "-s -w" -o pause .)
  tar -C "$src" -c pause | docker import --change 'ENTRYPOINT ["/pause"]' - "$pause_ref" >/dev/null
  rm -rf "$src"
  save "$pause_ref"
fi

# ---------------------------------------------------------------- operator and node images
build() { # ref dockerfile [--build-arg ...]
  local t0=$SECONDS
  log "building $1 from $2 (FROM $base_ref)"
  docker build --force-rm --network host --build-arg "PYTHON_IMAGE=$base_ref" "${@:3}" -f "$ctx/$2" -t "$1" "$ctx" >"${run_dir}/build-${2%%/*}.log" 2>&1 \
    || { tail -40 "${run_dir}/build-${2%%/*}.log" >&2; log "ERROR: building $1 failed (log ${run_dir}/build-${2%%/*}.log)"; exit 1; }
  log "$1 built in $((SECONDS - t0))s"
  save "$1"
}
[[ -s "$(tar_of "$operator_ref")" ]] || build "$operator_ref" operator/Dockerfile
if [[ ! -s "$(tar_of "$node_ref")" ]]; then
  # a new node image (torch and its CUDA wheels: ~6 GB) is built as layers under $docker_root, then saved beside it
  drop_older_tars "$node_ref"
  need_space "$cache" $(( 8 << 30 )) "building $node_ref (its layers and its tar)"
  serve_wheels
  # the same URLs on every run (a build arg's value is part of Docker's layer cache key)
  build "$node_ref" node-agent/Dockerfile --build-arg "TORCH_WHEELS=http://127.0.0.1:$wheels_port/torch/" \
    --build-arg "WHEELS=http://127.0.0.1:$wheels_port/engine/"
  stop_helpers
  wheels_built
fi
docker container prune -f >/dev/null  # what failed builds leave (dangling images stay: they are the build stages' cache)
for ref in "$pause_ref" "$operator_ref" "$node_ref"; do echo "$ref $(tar_of "$ref")"; done
