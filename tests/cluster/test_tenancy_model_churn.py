"""A 256-model churn on one node keeps staging (issue 17, item 4), with the real operator on a real control plane.

FlashNode.spec.models is capped by the CRD at 256 entries; before garbage collection a node that had been asked
for 256 distinct models took no new one. Here one node's history already holds 250 models (desired earlier, now
cached copies with old lastUsed times), two jobs stay Running on it the whole time, and 12 more jobs, each with
a model never seen before, run one after another through the operator (submitted, staged: the test plays the
agent and reports the copy Ready, Running, deleted). Checked at every step: the new model is requested, the job
reaches Running, the list stays within the cap, the live jobs' models are never dropped, and what is dropped
is the least recently used of what no live job needs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_operator import GiB, crds, kube, ns, operator, wait_for  # noqa: F401  (fixtures)

from kubeflash_api.flashnode import MAX_MODELS, ModelEntry
from kubeflash_node.store.ids import model_id

HISTORY, CHURN = 250, 12


def rfc(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_row(mid: str, uri: str, used: datetime) -> dict:
    return {"id": mid, "uri": uri, "disk": "nvme0", "state": "Ready", "bytes": GiB, "progress": 100.0,
            "lastUsed": rfc(used)}


@pytest.mark.timeout(600)
def test_churn_past_256_models_keeps_staging(ns, kube, control_plane):  # noqa: F811
    start = datetime.now(UTC) - timedelta(days=30)
    history = [f"/models/old-{k:03d}" for k in range(HISTORY)]  # old-000 least recently used
    node = kube.gpu_node(control_plane, "churn", pairs=3, free=100_000 * GiB)
    rows = {model_id(u): ready_row(model_id(u), u, start + timedelta(hours=k)) for k, u in enumerate(history)}
    kube.custom.patch_cluster_custom_object(
        "kubeflash.io", "v1alpha1", "flashnodes", node,
        {"spec": {"models": [ModelEntry(uri=u).to_dict() for u in history]}})
    kube.agent_status(node, {"heartbeat": rfc(datetime.now(UTC)), "models": list(rows.values())})
    kube.settle()

    def agent_reports_ready(uri: str) -> None:
        mid = model_id(uri)
        rows[mid] = ready_row(mid, uri, datetime.now(UTC))
        kube.agent_status(node, {"heartbeat": rfc(datetime.now(UTC)), "models": list(rows.values())})

    def spec_ids() -> list[str]:
        return [m["id"] for m in (kube.flashnode(node).get("spec") or {}).get("models") or []]

    def run_until_running(name: str, uri: str) -> None:
        kube.submit(name, model={"uri": uri})
        wait_for(f"{uri} requested on {node}", spec_ids, lambda ids: model_id(uri) in ids, 30)
        assert kube.status(name).get("phase") in (None, "Pending", "Staging"), kube.status(name)
        agent_reports_ready(uri)
        s = kube.wait_phase(name, "Running", 30)
        assert s["node"] == node

    live = ["/models/live-a", "/models/live-b"]
    for k, uri in enumerate(live):
        run_until_running(f"live-{k}", uri)
    live_ids = {model_id(u) for u in live}
    seen = set(history) | set(live)
    dropped_order: list[str] = []
    for i in range(CHURN):
        uri = f"/models/new-{i:03d}"
        before = spec_ids()
        run_until_running(f"churn-{i}", uri)
        after = spec_ids()
        seen.add(uri)
        assert len(after) <= MAX_MODELS, len(after)
        assert live_ids <= set(after), f"a live job's model was dropped at churn {i}"
        dropped_order += [m for m in before if m not in after]
        kube.delete_job(f"churn-{i}")
        wait_for(f"churn-{i} gone", lambda i=i: kube.job(f"churn-{i}"), lambda j: j is None, 30)

    assert len(seen) > MAX_MODELS  # distinct models this node was asked for
    assert dropped_order, "the cap was crossed without dropping anything"
    # least recently used first: the oldest history entries, in order, and nothing a live job needs
    oldest = [model_id(u) for u in history][:len(dropped_order)]
    assert dropped_order == oldest, dropped_order[:5]
    assert model_id(f"/models/new-{CHURN - 1:03d}") in spec_ids()
