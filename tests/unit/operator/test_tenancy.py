"""The operator's tenancy boundaries as pure decisions (issue 17): a job naming an image outside the admin's
allowlist fails before any pod exists, with a reason naming spec.image; only objects carrying the operator's
labels and the job's owner reference count as the job's; the pod limits come from the operator's config."""

from __future__ import annotations

import pytest

from kubeflash_api import parse_job_spec
from kubeflash_operator.builder import labels, owner_reference
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.kube import models_to_drop, owned_by
from kubeflash_operator.reconcile import Job, World, step
from kubeflash_operator.scheduler import node_view

from operator_factories import NOW, GiB, flashnode, job_spec

MODEL = parse_job_spec(job_spec(), name="j", namespace="ns").model.id


def job(status=None, **spec_overrides) -> Job:
    return Job("ns", "j", "uid-1", job_spec(**spec_overrides), dict(status or {}), created=NOW, generation=1)


def world() -> World:
    body = flashnode("n1", models=[{"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": GiB}])
    return World(now=NOW, nodes={"n1": node_view(body)}, claims=(), pods={})


def test_job_naming_a_foreign_image_fails_before_any_pod():
    """spec.image outside the allowlist: Failed, reason ImageNotAllowed, the message names spec.image, and the plan
    neither claims a pair nor creates a pod."""
    plan = step(job(image="evil.example/miner:1"), world(), OperatorConfig(engine_image="eng:1"))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "ImageNotAllowed"
    assert plan.status["message"].startswith("spec.image: 'evil.example/miner:1' is not an allowed image")
    assert plan.create is None and plan.claim is None
    assert [e.reason for e in plan.events if e.type == "Warning"] == ["ImageNotAllowed"]


@pytest.mark.parametrize(("image", "allowed"), [(None, ()), ("eng:1", ()), ("reg.example/t/e:2", ("reg.example/t/*",))],
                         ids=["unset", "the-engine-image", "listed-prefix"])
def test_allowed_images_run(image, allowed):
    """The engine image (named or not) and allowlisted images reach pod creation."""
    overrides = {"image": image} if image else {}
    plan = step(job(**overrides), world(), OperatorConfig(engine_image="eng:1", allowed_images=allowed))
    assert plan.create is not None and plan.status["phase"] == "Running"


def test_allowlist_and_limits_from_the_environment():
    """The chart passes operator.allowedImages and the pod limits as KUBEFLASH_OPERATOR_* variables."""
    cfg = OperatorConfig.from_env({"KUBEFLASH_OPERATOR_ALLOWED_IMAGES": "a/b:1, c/*,",
                                   "KUBEFLASH_OPERATOR_ENGINE_CPU_LIMIT": "", "KUBEFLASH_OPERATOR_ENGINE_MEMORY": "4Gi"})
    assert cfg.allowed_images == ("a/b:1", "c/*")
    assert (cfg.pod_limits.cpu_limit, cfg.pod_limits.memory) == ("", "4Gi")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("engine_cpu_request", "lots", "KUBEFLASH_OPERATOR_ENGINE_CPU_REQUEST must be a CPU quantity"),
    ("engine_memory", "16 GB", "KUBEFLASH_OPERATOR_ENGINE_MEMORY"),
    ("engine_ephemeral_storage", "0", "KUBEFLASH_OPERATOR_ENGINE_EPHEMERAL_STORAGE"),
    ("allowed_images", ("a b",), "KUBEFLASH_OPERATOR_ALLOWED_IMAGES"),
])
def test_bad_limits_and_allowlist_refused_naming_the_variable(field, value, match):
    """A bad value stops the operator at start, naming the variable, instead of failing every pod later."""
    with pytest.raises(ValueError, match=match):
        OperatorConfig(**{field: value})


def _obj(job_label="j", managed_by="kubeflash-operator", uids=("uid-1",)):
    lab = {**labels("j"), "kubeflash.io/job": job_label, "app.kubernetes.io/managed-by": managed_by}
    return {"metadata": {"labels": lab, "ownerReferences": [owner_reference("j", u) for u in uids]}}


@pytest.mark.parametrize(("obj", "ours"), [
    (_obj(), True),
    (_obj(uids=("uid-other",)), False),  # an older job of the same name, or a forged label
    (_obj(uids=()), False),  # a user's pod named j-1 with our labels copied
    (_obj(managed_by="someone"), False),
    (_obj(job_label="k"), False),
    ({"metadata": {"name": "j-1"}}, False),
], ids=["ours", "other-uid", "no-owner", "other-manager", "other-job", "bare"])
def test_owned_only_with_labels_and_owner_reference(obj, ours):
    """owned_by (the gate of every pod delete and ConfigMap write) wants the labels AND the job's uid."""
    assert owned_by(obj, "j", "uid-1") is ours


def _models(*ids):
    return [{"id": i, "uri": f"dummy:{i}"} for i in ids]


def test_models_no_live_job_needs_are_dropped_least_recently_used_first():
    """spec.models garbage collection: needed ids stay; of the rest, Ready/Failed before staging ones, and the
    oldest lastUsed (never used first) go first, no more than asked."""
    reported = [{"id": "a", "state": "Ready", "lastUsed": "2026-01-03T00:00:00Z"},
                {"id": "b", "state": "Ready", "lastUsed": "2026-01-01T00:00:00Z"},
                {"id": "c", "state": "Staging"},
                {"id": "d", "state": "Failed"},
                {"id": "e", "state": "Ready", "lastUsed": "2025-01-01T00:00:00Z"}]
    desired = _models("a", "b", "c", "d", "e")
    assert models_to_drop(desired, reported, {"e"}, count=2) == {"d", "b"}
    assert models_to_drop(desired, reported, {"e"}, count=4) == {"d", "b", "a", "c"}
    assert models_to_drop(desired, reported, {"a", "b", "c", "d", "e"}, count=3) == set()
    assert models_to_drop(desired, [], set(), count=0) == set()
