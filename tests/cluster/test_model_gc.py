"""FlashNode.spec.models churn against a real kube-apiserver (issue 17): the list is capped by the CRD (256
entries), so before the operator's garbage collection a node that had seen 256 distinct models could stage no
more. Now a node whose list already holds 250 models takes 80 more, one after another: every request is
accepted, the list never passes the cap, and the model a live job on the node needs (a claim in the node's
ledger) is never dropped."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes")

from kubeflash_api.flashnode import MAX_MODELS, ModelEntry  # noqa: E402
from kubeflash_operator.bookkeeping import CLAIMS_ANNOTATION  # noqa: E402
from kubeflash_operator.kube import Kube  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("KUBEFLASH_TEST_CRDS") or REPO / "crds")  # a fixed copy while crds/ is being regenerated
GROUP, VERSION = "kubeflash.io", "v1alpha1"


def test_model_churn_past_the_cap_keeps_staging_and_keeps_what_live_jobs_need(control_plane, namespace):
    cp = control_plane
    cp.kubectl("apply", "--validate=false", "-f", str(CRDS))
    cp.wait_crds_established("inferencejobs.kubeflash.io", "flashnodes.kubeflash.io")
    api = kubernetes.config.new_client_from_config(config_file=str(cp.kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(api)
    node = f"gc-{uuid.uuid4().hex[:6]}"
    live = ModelEntry(uri="dummy:opt-125m")
    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob", "metadata": {"name": "live"},
           "spec": {"model": {"uri": live.uri}, "input": {"prompts": ["x"]}}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencejobs", job)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "inferencejobs", "live", {
        "status": {"phase": "Running", "node": node, "modelId": live.id}})
    claims = {f"{namespace}/live": {"gpus": [0], "disk": "nvme0", "kv": 0}}
    custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashNode",
        "metadata": {"name": node, "annotations": {CLAIMS_ANNOTATION: json.dumps(claims)}},
        "spec": {"nodeName": node, "models": [live.to_dict()] +
                 [ModelEntry(uri=f"dummy:old-{k}").to_dict() for k in range(249)]}})
    kube = Kube(api)
    try:
        for i in range(80):
            assert kube.request_model(node, ModelEntry(uri=f"dummy:churn-{i}").to_dict()) is True
            models = custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", node)["spec"]["models"]
            ids = [m["id"] for m in models]
            assert len(ids) <= MAX_MODELS and ids[-1] == ModelEntry(uri=f"dummy:churn-{i}").id
            assert live.id in ids, f"the live job's model was dropped at request {i}"
        assert len(ids) > MAX_MODELS - 32  # trimmed a little at a time, not emptied
    finally:
        cp.kubectl("delete", "flashnode", node, "--ignore-not-found", check=False)
        api.close()
