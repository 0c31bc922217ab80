"""spec.parallelism: a job split into shard jobs, InferenceJobs `<job>-s<k>` owned by it, each placed, retried,
rescheduled and deleted by the same machinery as any job; the parent is never placed itself and only sums its
shards up in its status.

Pure functions first (names, child bodies, the aggregate status), unit-tested without a cluster; `sync` at the
end is the one blocking edge a parent's reconcile tick calls (in a thread): take the children from the operator's
shard index (or list them by label), create a bounded batch of the missing ones in parallel, write the aggregate
status if it changed. Results: spec.output.configMap parts merged here (capped at 1 MiB); spec.output.pvc parts
(<path>.part-<k>-of-<N>) merged by a merge pod this creates once every shard Succeeded (docs/parallelism.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from kubeflash_api import JobSpec, SpecError, contract, parse_job_spec, to_canonical
from kubeflash_api.batch import parse_batch
from kubeflash_api.sharding import inline_split, part_path
from kubeflash_operator import status as st
from kubeflash_operator.builder import JOB_LABEL, MANAGED_BY, owner_reference
from kubeflash_operator.timefmt import format_time

PARENT_LABEL = "kubeflash.io/parent"  # on every shard job: the parent job's name
GROUP, VERSION, PLURAL = "kubeflash.io", "v1alpha1", "inferencejobs"
RESULTS_KEY = "results.jsonl"  # the key the node agent fills in a job's output ConfigMap
CONFIGMAP_LIMIT = 1 << 20  # the merged ConfigMap, whole object as sent (the API refuses data over 1 MiB)


def child_name(parent: str, index: int) -> str:
    """Shard `index`'s job: <parent>-s<index> (kubeflash_api.inferencejob.check_cluster keeps it short enough)."""
    return f"{parent}-s{index}"


def parallelism(spec: Mapping[str, Any]) -> int:
    """spec.parallelism of a stored job (1 when absent or not an integer: the parser then says what is wrong)."""
    n = spec.get("parallelism", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) else 1


def child_body(*, namespace: str, parent: str, uid: str, spec: Mapping[str, Any], index: int,
               count: int, split: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Shard `index` of `count`: the parent's spec without parallelism, with spec.shard, its output ConfigMap
    renamed <cm>-s<index>; owned by the parent (controller, blockOwnerDeletion), so deleting the parent deletes it.
    Inline prompts: only the shard's own (`split`: sharding.inline_split of the parent's, computed once per tick),
    their parent indices in spec.shard.promptIndex so their custom_ids stay prompt-<i>. A shard that owns none
    carries the parent's first prompt (the CRD wants at least one), which the engine's shard filter drops. A file
    or ConfigMap input stays as it is: the shard's pod reads it and keeps its own lines."""
    child = {k: v for k, v in spec.items() if k not in ("parallelism", "input")}
    child = copy.deepcopy(child)
    child["shard"] = {"index": index, "count": count}
    inp = dict(spec.get("input") or {})
    inline = inp.get("prompts")
    if isinstance(inline, list) and inline:
        own = list((split or inline_split(len(inline), count))[index]) or [0]
        inp["prompts"] = [inline[i] for i in own]
        child["shard"]["promptIndex"] = own
    child["input"] = copy.deepcopy(inp)
    cm = (child.get("output") or {}).get("configMap")
    if cm and cm.get("name"):
        cm["name"] = child_name(cm["name"], index)
    if (child.get("output") or {}).get("pvc"):  # its own part file on the claim, merged by the merge pod
        child["output"]["path"] = part_path(child["output"].get("path") or f"{parent}.results.jsonl", index, count)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob",
            "metadata": {"name": child_name(parent, index), "namespace": namespace,
                         "labels": {PARENT_LABEL: parent, "app.kubernetes.io/managed-by": MANAGED_BY},
                         "ownerReferences": [owner_reference(parent, uid)]},
            "spec": child}


def owned(child: Mapping[str, Any], uid: str) -> bool:
    """The child is this parent incarnation's (not a same-named earlier parent's, nor someone else's)."""
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def owner_uids(body: Mapping[str, Any]) -> list[str]:
    """The parent uid of a shard job (its controller), to wake the parent when a shard changes; [] for others."""
    meta = body.get("metadata") or {}
    if PARENT_LABEL not in (meta.get("labels") or {}):
        return []
    return [r["uid"] for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("uid")]


def missing(parent: str, count: int, names: Iterable[str]) -> list[int]:
    """Shard indices whose job does not exist yet."""
    have = set(names)
    return [k for k in range(count) if child_name(parent, k) not in have]


FAILED_NAMED = 10  # a parent's status names at most this many failed shards (then how many more)


def _index(child: Mapping[str, Any]) -> int:
    """A shard job's index from its name (<parent>-s<k>); -1 for a name not of that form."""
    tail = str((child.get("metadata") or {}).get("name", "")).rpartition("-s")[2]
    return int(tail) if tail.isdigit() else -1


def failed_list(failed: Sequence[Mapping[str, Any]]) -> str:
    """The failed shards by index, at most FAILED_NAMED named, then how many more: "j-s2, j-s7 and 3 more"."""
    names = [(c.get("metadata") or {}).get("name", "") for c in sorted(failed, key=_index)]
    shown = ", ".join(names[:FAILED_NAMED])
    return shown + (f" and {len(names) - FAILED_NAMED} more" if len(names) > FAILED_NAMED else "")


def aggregate(children: Iterable[Mapping[str, Any]], *, count: int, status: Mapping[str, Any],
              now: datetime, generation: int | None = None) -> dict[str, Any]:
    """The parent's status from its children: phase, a summary of shards by phase (bounded: five numbers for any
    count) and summed progress; {} when the status already says so. While any shard is not terminal the parent
    keeps summing: Running (reason ShardsFailing when k have failed, retries exhausted), Pending while none has
    started. Once all `count` are terminal: Succeeded, or Failed naming the failed shards (FAILED_NAMED at most)."""
    counts = {"total": count, "pending": 0, "running": 0, "succeeded": 0, "failed": 0}
    done = total = 0
    failed: list[Mapping[str, Any]] = []
    seen = 0
    for c in children:
        s = c.get("status") or {}
        phase = s.get("phase")
        seen += 1
        counts[phase.lower() if phase in (st.RUNNING, st.SUCCEEDED, st.FAILED) else "pending"] += 1
        if phase == st.FAILED:
            failed.append(c)
        progress = s.get("progress") or {}
        done += int(progress.get("promptsDone") or 0)
        total += int(progress.get("promptsTotal") or 0)
    counts["pending"] += max(0, count - seen)  # not created yet
    summary = (f"{count} shards: {counts['pending']} pending, {counts['running']} running, "
               f"{counts['succeeded']} succeeded, {counts['failed']} failed")
    terminal = counts["succeeded"] + counts["failed"] >= count
    if failed:
        first = sorted(failed, key=_index)[0]
        why = (first.get("status") or {}).get("message") or "failed"
        said = f"{len(failed)} of {count} shards failed ({failed_list(failed)}; first: {why})"
        phase, reason = (st.FAILED, "ShardsFailed") if terminal else (st.RUNNING, "ShardsFailing")
        message = f"{said}; {summary}"
    elif terminal:
        phase, reason, message = st.SUCCEEDED, "ShardsSucceeded", summary
    elif counts["running"] or counts["succeeded"]:
        phase, reason, message = st.RUNNING, "ShardsRunning", summary
    else:
        phase, reason, message = st.PENDING, "ShardsPending", summary
    patch: dict[str, Any] = {"phase": phase, "reason": reason, "message": message, "shards": counts,
                             "progress": {"promptsDone": done, "promptsTotal": total, "summary": f"{done}/{total}"}}
    if generation is not None:
        patch["observedGeneration"] = generation
    if phase in st.TERMINAL and not status.get("completionTime"):
        patch["completionTime"] = format_time(now)
    if all(status.get(k) == v for k, v in patch.items()):
        return {}
    return patch


def merge_results(parts: Sequence[str], order: Sequence[str]) -> str:
    """The shards' results.jsonl texts as one, lines in input order (`order`: custom_ids as the input lists them);
    a line whose custom_id the input does not list goes last, in shard order."""
    rank = {cid: i for i, cid in enumerate(order)}
    lines = [line for part in parts for line in part.split("\n") if line.strip()]
    keyed = [(rank.get(json.loads(line).get("custom_id"), len(rank)), n, line) for n, line in enumerate(lines)]
    return "".join(line + "\n" for _, _, line in sorted(keyed))


TOO_LARGE = "!spec.output.configMap is too large: ConfigMap "  # how too_large's message starts ("!": final)


def too_large(body: Mapping[str, Any], *, count: int, limit: int = CONFIGMAP_LIMIT) -> str | None:
    """Why the merged output ConfigMap `body` cannot be written (its whole object as JSON over `limit` bytes), naming
    the field and the sizes; None when it fits. Checked before anything is written: never a half-written one."""
    size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    if size <= limit:
        return None
    results = len(str((body.get("data") or {}).get(RESULTS_KEY, "")).encode())
    return (f"{TOO_LARGE[1:]}{body['metadata']['name']} would be {size} bytes with the merged "
            f"results of {count} shards ({results} bytes of {RESULTS_KEY}), over the {limit} bytes (1 MiB) a "
            f"ConfigMap may hold; nothing was written (the shards' own ConfigMaps <name>-s<k> keep their parts); "
            f"ask for fewer tokens (spec.generation.maxNewTokens) or split the prompts over several jobs")


def with_merge(patch: dict[str, Any], status: Mapping[str, Any], waiting: str | None,
               reason: str = "ResultsNotMerged") -> dict[str, Any]:
    """`patch` held back at Running while the merged results are not written yet (`waiting` says why), or Failed
    with `reason` when they cannot be ("!" first); unchanged otherwise."""
    if waiting is None or patch.get("phase") != st.SUCCEEDED:
        return patch
    failed = waiting.startswith("!")
    held = {**patch, "phase": st.FAILED if failed else st.RUNNING, "reason": reason if failed
            else "MergingResults", "message": waiting.lstrip("!")}
    if not failed:
        held.pop("completionTime", None)
    return {} if all(status.get(k) == v for k, v in held.items()) else held


def merge_pod_name(parent: str) -> str:
    """The pod that merges a spec.output.pvc parallel job's part files: <parent>-merge."""
    return f"{parent}-merge"


MERGE_UID = 1000  # the engine image's user, as the inference pods run


def merge_pod(*, namespace: str, parent: str, uid: str, spec: JobSpec, image: str) -> dict[str, Any]:
    """The merge pod of a parallel job with spec.output.pvc: `kubeflash merge` in the engine image, the claim at
    /output (and the input ConfigMap or claim at /input, for the input order), no GPU, no API token, Pod Security
    restricted; labelled and owned like the job's own pods (deleting the job deletes it). Not pinned: the
    scheduler puts it where the claim can be mounted."""
    env = {contract.ENV_JOB_SPEC: json.dumps(to_canonical(spec), sort_keys=True, separators=(",", ":")),
           contract.ENV_JOB_NAME: parent, contract.ENV_JOB_NAMESPACE: namespace, contract.ENV_OUTPUT_DIR: "/output"}
    volumes: list[dict[str, Any]] = [
        {"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc}}, {"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "output", "mountPath": "/output"}, {"name": "tmp", "mountPath": "/tmp"}]
    if spec.input.config_map:
        key = spec.input.config_map
        volumes.append({"name": "input", "configMap": {"name": key.name, "items": [{"key": key.key, "path": key.key}]}})
        env[contract.ENV_INPUT_FILE] = f"/input/{key.key}"
    elif spec.input.pvc:
        volumes.append({"name": "input", "persistentVolumeClaim": {"claimName": spec.input.pvc, "readOnly": True}})
        env[contract.ENV_INPUT_FILE] = f"/input/{spec.input.file}"
    if len(volumes) > 2:
        mounts.append({"name": "input", "mountPath": "/input", "readOnly": True})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": merge_pod_name(parent), "namespace": namespace,
                     "labels": {JOB_LABEL: parent, "app.kubernetes.io/managed-by": MANAGED_BY,
                                "app.kubernetes.io/component": "merge"},
                     "ownerReferences": [owner_reference(parent, uid)]},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": MERGE_UID, "runAsGroup": MERGE_UID,
                                "fsGroup": MERGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "merge", "image": image, "command": ["kubeflash", "merge"],
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                              "limits": {"memory": "2Gi", "ephemeral-storage": "1Gi"}},
                "volumeMounts": mounts,
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "runAsUser": MERGE_UID, "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": volumes,
        },
    }


def merge_pod_state(pod: Any, parent: str, path: str) -> str | None:
    """What the merge pod (a V1Pod) says: None once it Succeeded, "!why" when it Failed (its termination message),
    else that it is still merging."""
    name, phase = merge_pod_name(parent), pod.status.phase if pod.status else None
    if phase == "Succeeded":
        return None
    if phase == "Failed":
        said = ""
        for cs in pod.status.container_statuses or []:
            term = cs.state.terminated if cs.state else None
            if term is not None:
                said = (term.message or term.reason or f"exit code {term.exit_code}").strip()
        return f"!merging the shards' part files into spec.output.path {path} failed (pod {name}): {said or 'failed'}"
    return f"merging the shards' part files into spec.output.path {path} (pod {name}, {phase or 'Pending'})"


# --------------------------------------------------------------------------------------------------- edge


CREATE_BATCH = 100  # shard jobs created per parent tick at most (their events wake the next tick)
CREATE_WORKERS = 8  # in parallel: one create is a round trip, and 1,000 of them in a row hold the parent's status


def shard_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What `aggregate` reads of a shard job (its name and owners, phase, message, progress counts): the operator's
    shard index holds this instead of whole bodies (each with its spec and its own prompts)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    progress = status.get("progress") or {}
    return {"metadata": {"name": meta.get("name", ""), "ownerReferences": [
                {"uid": r.get("uid"), "controller": r.get("controller")} for r in meta.get("ownerReferences") or []]},
            "status": {"phase": status.get("phase"), "message": status.get("message"),
                       "progress": {"promptsDone": progress.get("promptsDone"),
                                    "promptsTotal": progress.get("promptsTotal")}}}


def sync(kube: Any, *, namespace: str, name: str, uid: str, spec: Mapping[str, Any], status: Mapping[str, Any],
         version: str, generation: int | None, now: datetime,
         children: Sequence[Mapping[str, Any]] | None = None, created: set[str] | None = None
         ) -> tuple[str | None, bool]:
    """One parent tick (blocking: run in a thread): create missing shard jobs (CREATE_BATCH at most, in parallel;
    a 409 means it exists), then write the aggregate status, conditional on `version` (kube.Conflict if the parent
    changed since). `children`: the shards as the operator's index shows them (None: listed from the API);
    `created`: names this operator created already (the index may not show them yet), added to. Returns the
    parent's new resourceVersion (None when the status already said it) and whether to look again soon (shards
    left to create, or results to merge: nothing wakes it for those)."""
    from kubernetes.client.exceptions import ApiException

    count = parallelism(spec)
    if children is None:
        listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                           label_selector=f"{PARENT_LABEL}={name}")
        children = listed.get("items") or []
    children = [c for c in children if owned(c, uid)]
    created = set() if created is None else created
    todo = missing(name, count, [*(c["metadata"]["name"] for c in children), *created])

    inline = (spec.get("input") or {}).get("prompts")
    split = inline_split(len(inline), count) if todo and isinstance(inline, list) else None

    def create(k: int) -> None:
        body = child_body(namespace=namespace, parent=name, uid=uid, spec=spec, index=k, count=count, split=split)
        try:
            kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as e:
            if e.status != 409:
                raise
        created.add(child_name(name, k))

    created.difference_update(c["metadata"]["name"] for c in children)  # the index shows them: it says from now on
    if todo:
        with ThreadPoolExecutor(min(CREATE_WORKERS, len(todo))) as pool:
            list(pool.map(create, todo[:CREATE_BATCH]))
    patch = aggregate(children, count=count, status=status, now=now, generation=generation)
    out, waiting = spec.get("output") or {}, None
    if patch.get("phase") == st.SUCCEEDED and out.get("configMap"):
        waiting = _merge_output(kube, namespace, name, uid, spec, count, out["configMap"]["name"])
        reason = "OutputTooLarge" if waiting and waiting.startswith(TOO_LARGE) else "ResultsNotMerged"
        patch = with_merge(patch, status, waiting, reason)
    elif patch.get("phase") == st.SUCCEEDED and out.get("pvc"):
        waiting = _merge_claim(kube, namespace, name, uid, spec)
        patch = with_merge(patch, status, waiting)
    written = kube.patch_job_status(namespace, name, version, patch) if patch else None
    return written, len(todo) > CREATE_BATCH or (waiting is not None and not waiting.startswith("!"))


def _merge_output(kube: Any, namespace: str, name: str, uid: str, spec: Mapping[str, Any], count: int,
                  cm: str) -> str | None:
    """Write the shards' output ConfigMaps (<cm>-s<k>), merged in input order, into the parent's <cm>; None when
    written, else why not ("!" first: it never will be)."""
    from kubernetes.client.exceptions import ApiException

    parts = []
    for k in range(count):
        try:
            data = kube.core.read_namespaced_config_map(child_name(cm, k), namespace).data or {}
        except ApiException as e:
            if e.status == 404:
                return f"waiting for shard results in ConfigMap {child_name(cm, k)}"
            raise
        if data.get("error"):
            return f"!shard {child_name(name, k)}'s results were not copied: {data['error']}"
        if data.get(RESULTS_KEY) is None:
            return f"waiting for the node agent to copy shard {child_name(name, k)}'s results"
        parts.append(data[RESULTS_KEY])
    merged = merge_results(parts, _input_order(kube, namespace, spec))
    labels = {JOB_LABEL: name, "app.kubernetes.io/managed-by": MANAGED_BY}  # what the chart's admission policy
    body = {"metadata": {"name": cm, "namespace": namespace, "labels": labels,  # lets the operator write
                         "ownerReferences": [owner_reference(name, uid)]},
            "data": {RESULTS_KEY: merged}}
    over = too_large(body, count=count)
    if over is not None:
        return "!" + over
    try:
        kube.core.create_namespaced_config_map(namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        existing = kube.core.read_namespaced_config_map(cm, namespace)
        if not any(r.uid == uid for r in existing.metadata.owner_references or []):
            return f"!spec.output.configMap: ConfigMap {cm} exists and was not created by kubeflash for this job"
        kube.core.patch_namespaced_config_map(cm, namespace, {"data": {RESULTS_KEY: merged}})
    return None


def _merge_claim(kube: Any, namespace: str, name: str, uid: str, spec: Mapping[str, Any]) -> str | None:
    """Create the merge pod once (409: it exists) and read what it says (merge_pod_state); "!" first when it is
    someone else's or failed."""
    from kubernetes.client.exceptions import ApiException

    from kubeflash_operator.config import OperatorConfig

    parsed = parse_job_spec(spec, name=name, namespace=namespace)
    path = parsed.output.path or f"{name}.results.jsonl"
    try:
        pod = kube.core.read_namespaced_pod(merge_pod_name(name), namespace)
    except ApiException as e:
        if e.status != 404:
            raise
        image = parsed.image or _shard_image(kube, namespace, name) or OperatorConfig.from_env().engine_image
        body = merge_pod(namespace=namespace, parent=name, uid=uid, spec=parsed, image=image)
        try:
            kube.core.create_namespaced_pod(namespace, body)
        except ApiException as e2:
            if e2.status != 409:
                raise
        return f"merging the shards' part files into spec.output.path {path} (pod {merge_pod_name(name)} created)"
    if not any(r.uid == uid for r in pod.metadata.owner_references or []):
        return f"!pod {merge_pod_name(name)} exists and was not created by kubeflash for this job"
    return merge_pod_state(pod, name, path)


def _shard_image(kube: Any, namespace: str, name: str) -> str | None:
    """The image shard 0's pod ran (the operator's --engine-image unless the job named its own): the merge pod runs
    the same; None when that pod is gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        shard = kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, child_name(name, 0))
        pod = (shard.get("status") or {}).get("pod")
        return kube.core.read_namespaced_pod(pod, namespace).spec.containers[0].image if pod else None
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _input_order(kube: Any, namespace: str, spec: Mapping[str, Any]) -> list[str]:
    """The job's custom_ids in input order: from the spec, or read from its input ConfigMap."""
    try:
        parsed = parse_job_spec(spec, name="parent", namespace=namespace)
    except SpecError:
        return []
    key = parsed.input.config_map
    if key is None:
        return [p.id for p in parsed.input.prompts]
    text = (kube.core.read_namespaced_config_map(key.name, namespace).data or {}).get(key.key) or ""
    try:
        return [p.id for p in parse_batch(text, f"ConfigMap {namespace}/{key.name} key {key.key}")]
    except SpecError:
        return []
