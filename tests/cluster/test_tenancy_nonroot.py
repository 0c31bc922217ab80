"""The chart's default node agent is non-root (issue 17, item 6): rendered with `helm template`, the agent
container runs as uid 1000 with every capability dropped, only the privileged `csi` container does mount
work, and the one root step (the `store-owner` init container: CHOWN and DAC_READ_SEARCH, nothing else) is
run here, under exactly those capabilities, on a real store tree that holds what pods could have planted: it
hands the store to uid 1000 without entering a job or KV cache directory, following a link, or touching csi/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_helm import CHART, by_kind, render

UID = 1000


def agent_pod(docs: list[dict]) -> dict:
    (ds,) = by_kind(docs, "DaemonSet")
    return ds["spec"]["template"]["spec"]


def test_default_agent_is_non_root_without_capabilities(control_plane):
    pod = agent_pod(render(control_plane))
    by_name = {c["name"]: c for c in pod["containers"]}
    agent = by_name["agent"]["securityContext"]
    assert (agent["runAsUser"], agent["runAsGroup"], agent["runAsNonRoot"]) == (UID, UID, True)
    assert agent["capabilities"] == {"drop": ["ALL"]} and agent["allowPrivilegeEscalation"] is False
    assert agent["readOnlyRootFilesystem"] is True and agent["seccompProfile"] == {"type": "RuntimeDefault"}
    assert by_name["metrics"]["securityContext"]["runAsUser"] == 65534
    # root: only the init container (two capabilities, exits first) and the csi container (mounts)
    root = [c["name"] for c in [*pod["containers"], *pod["initContainers"]]
            if c["securityContext"].get("runAsUser", 0) == 0]
    assert sorted(root) == ["csi", "store-owner"]
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_READ_SEARCH"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    assert init["command"][3:] == [str(UID), "/var/lib/kubeflash"]
    assert "--kv-owner=1000:1000" in by_name["csi"]["command"]
    # the agent mounts no host path but the store: no /dev, no kubelet directories
    host = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert {m["name"] for m in by_name["agent"]["volumeMounts"]} & host == {"store-0"}


def test_agent_user_must_be_the_pods_user_and_root_is_opt_out(control_plane):
    refused = control_plane.helm("template", "kf", str(CHART), "--set", "csi.kvOwner=2000:2000", check=False)
    assert refused.returncode != 0
    assert "agent.runAsNonRootUser (1000) must be the uid of csi.kvOwner (2000:2000)" in refused.stderr
    both = agent_pod(render(control_plane, "--set", "csi.kvOwner=2000:2000", "--set", "agent.runAsNonRootUser=2000"))
    assert both["initContainers"][0]["command"][3] == "2000"
    old = agent_pod(render(control_plane, "--set", "agent.runAsNonRootUser=0"))
    assert "initContainers" not in old
    agent = next(c for c in old["containers"] if c["name"] == "agent")["securityContext"]
    assert agent["runAsUser"] == 0 and agent["capabilities"]["add"] == ["CHOWN", "DAC_OVERRIDE", "FOWNER"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_store_owner_script_under_its_two_capabilities(control_plane, tmp_path):
    """An old root-owned store with a job directory and a KV cache directory whose pods planted links to a
    root-only directory outside the store and to csi/, and a file they own: after the rendered script (run as
    root with only CHOWN and DAC_READ_SEARCH), everything the agent owns is uid 1000; the pods' directories
    themselves are too, their contents and every link target untouched."""
    init = agent_pod(render(control_plane))["initContainers"][0]
    store, outside = tmp_path / "store", tmp_path / "outside"
    job, cache = store / "jobs" / "team" / "run-1", store / "kvcache" / "ns" / "team" / "m-1"
    for d in (store / "models" / "m-1", store / "csi" / "kv", store / "lost+found", job / "kv", cache, outside):
        d.mkdir(parents=True)
    (store / "lost+found").chmod(0o700)
    (store / "models" / "m-1" / "layer-000.bin").write_bytes(b"x")
    staged = store / "models" / "m-2"  # staged by a non-root agent (0700), then written by a root one
    staged.mkdir(mode=0o700)
    (staged / "layer-000.bin").write_bytes(b"y")
    os.chown(staged, UID, UID)
    (store / "catalog.json").write_text("{}")
    (store / "csi" / "kv" / "a.img").write_bytes(b"")
    (outside / "token").write_text("t")
    outside.chmod(0o700)
    for pods_dir in (job, cache):  # what the pods made: their directory (uid 1000 from the CSI plugin), links
        os.chown(pods_dir, UID, UID)
        (pods_dir / "to-outside").symlink_to(outside)
        (pods_dir / "to-csi").symlink_to(store / "csi")
        (pods_dir / "root-file").write_text("r")  # stands for anything not theirs: must not be entered
    (job / "kv" / "x").write_text("k")
    before = {p: (p.lstat().st_uid, p.lstat().st_mode) for p in [*job.rglob("*"), *cache.rglob("*"),
                                                                  outside, outside / "token", *(store / "csi").rglob("*")]}

    subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all,+chown,+dac_read_search",
                    sys.executable, "-c", init["command"][2], str(UID), str(store)], check=True)

    after = {p: (p.lstat().st_uid, p.lstat().st_mode) for p in before}
    assert after == before, "a pod's directory was entered or a link followed"
    mine = [store, *(p for p in store.rglob("*") if p not in before)]
    assert {p.relative_to(store).as_posix(): p.lstat().st_uid for p in mine if p.lstat().st_uid != UID} == {
        "csi": 0}
    assert (store / "csi").lstat().st_uid == 0 and (store / "csi" / "kv" / "a.img").lstat().st_uid == 0

    # without DAC_READ_SEARCH a 0700 directory of uid 1000 holding a root file cannot be handed over: the
    # capability set is not larger than the store needs
    os.chown(staged / "layer-000.bin", 0, 0)
    failed = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all,+chown",
                             sys.executable, "-c", init["command"][2], str(UID), str(store)],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "Permission denied" in failed.stderr, failed.stderr
