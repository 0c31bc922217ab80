"""The few Kubernetes API calls the operator makes besides kopf's own: pods, output ConfigMaps and FlashNode
desired models.

Every call is idempotent: creating a pod that exists adopts it (when it belongs to the same job), deleting a
missing pod is a no-op, adding a model that is already desired changes nothing. The operator acts only on what
it made: a pod or ConfigMap is deleted or written only when it carries the operator's labels and the job's
owner reference (a same-named object of anyone else is left alone and reported).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubeflash_api import SpecError, parse_job_spec
from kubeflash_api.batch import parse_batch
from kubeflash_api.flashnode import MAX_MODELS
from kubeflash_api.prefixes import SAMPLE, job_fingerprints
from kubeflash_operator.bookkeeping import CLAIMS_ANNOTATION, ENDED_ANNOTATION, parse_ledger
from kubeflash_operator.builder import JOB_LABEL, MANAGED_BY, NODE_LABEL, owner_reference
from kubeflash_operator.config import OperatorConfig

GROUP, VERSION = "kubeflash.io", "v1alpha1"
POOL_SIZE = 32  # HTTP connections kept to the API server (the operator's API threads share them)
API_TIMEOUT_S = OperatorConfig.api_timeout_s  # the setting's default: each call's connect and read timeout
GC_SLACK = 16  # a full spec.models list is trimmed this many entries below the cap, so the next adds write once
log = logging.getLogger(__name__)


def load_config() -> None:
    """In-cluster service account if there is one, else $KUBECONFIG / ~/.kube/config (as the client defaults).

    The client library reads $KUBECONFIG once, when imported; it is read again here, because the CLI's
    --kubeconfig (and a test harness) set it later.
    """
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)


def connection_info() -> dict[str, Any]:
    """kopf.ConnectionInfo arguments from the client library's configuration (exec/auth plugins included)."""
    load_config()
    c = client.Configuration.get_default_copy()
    header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return {
        "server": c.host, "ca_path": c.ssl_ca_cert, "insecure": not c.verify_ssl,
        "username": c.username or None, "password": c.password or None,
        "scheme": scheme or None, "token": token or None,
        "certificate_path": c.cert_file, "private_key_path": c.key_file,
    }


class RequestTimeout(ApiException):
    """A call that got no answer (or no connection) within the request timeout, or lost its connection: status 0,
    as the client reports TLS errors, so callers that re-raise what is not a 404/409 re-raise it; the message names
    the request."""

    def __init__(self, message: str) -> None:
        super().__init__(status=0, reason=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TimedApiClient(client.ApiClient):
    """The kubernetes ApiClient with every call bounded: `timeout_s` to connect and `timeout_s` to read (between
    bytes of the answer), one attempt (no urllib3 retries that would multiply it; kopf's handlers and the Lease
    renewal retry on their own). A call given its own _request_timeout keeps it. The generated API classes
    (CoreV1Api, CustomObjectsApi, CoordinationV1Api) and Kube._call all go through call_api."""

    def __init__(self, configuration: client.Configuration, *, timeout_s: float = API_TIMEOUT_S) -> None:
        configuration.retries = False  # urllib3: one attempt, its own error raised (no MaxRetryError wrapping)
        super().__init__(configuration)
        self.timeout_s = timeout_s

    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        import urllib3

        t = self.timeout_s
        try:
            return super().call_api(method, url, header_params, body, post_params,
                                    _request_timeout if _request_timeout is not None else (t, t))
        except urllib3.exceptions.TimeoutError as e:
            raise RequestTimeout(f"{method} {url}: no answer from the API server within the {t:g} s request timeout "
                                 f"(connect, then read; KUBEFLASH_OPERATOR_API_TIMEOUT_S): {e}") from e
        except urllib3.exceptions.HTTPError as e:  # refused, reset, DNS: the connection itself failed
            raise RequestTimeout(f"{method} {url}: the connection to the API server failed: {e}") from e


def api_client(configuration: client.Configuration, *, timeout_s: float = API_TIMEOUT_S) -> TimedApiClient:
    """The operator's blocking client over `configuration`, every call bounded by `timeout_s` (TimedApiClient)."""
    return TimedApiClient(configuration, timeout_s=timeout_s)


class Conflict(Exception):
    """A transient clash (a pod of an older job with the same name, a concurrent FlashNode write)."""


class Gone(Exception):
    """The object to write no longer exists."""


def owned_by(obj: Mapping[str, Any], job: str, uid: str) -> bool:
    """True if `obj` (a pod or ConfigMap as a dict) is the operator's for job `job` of uid `uid`: it carries the
    operator's managed-by and job labels and an owner reference to that job's uid."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
    return (labels.get(JOB_LABEL) == job and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY
            and uid in owners)


JOBS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/inferencejobs/{{name}}"
FLASHNODE_PATH = f"/apis/{GROUP}/{VERSION}/flashnodes/{{name}}"
PODS_PATH = "/api/v1/namespaces/{ns}/pods"
MERGE_PATCH = "application/merge-patch+json"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _call(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json") -> Any:
        """One request with a plain-JSON body and answer, for the calls made once or more per job (pod create,
        read and delete, job status, FlashNode ledger): the generated client validates a dict body into its
        pydantic model (V1Pod: more CPU than the rest of a placement) and builds models from the answer.
        Same connection pool, credentials and errors (ApiException with the status) as the generated calls."""
        method, url, headers, _, _ = self.api.param_serialize(
            method=method, resource_path=path, header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"])
        r = self.api.call_api(method, url, headers, body)
        r.read()
        if not 200 <= r.status <= 299:
            raise ApiException.from_response(http_resp=r, body=r.data.decode("utf-8", "replace"), data=None)
        return json.loads(r.data) if r.data else None

    @classmethod
    def connect(cls, pool_size: int = POOL_SIZE, *, timeout_s: float = API_TIMEOUT_S) -> Kube:
        """From the in-cluster or kubeconfig credentials (load_config), each call bounded by `timeout_s` (connect,
        then read: OperatorConfig.api_timeout_s)."""
        load_config()
        conf = client.Configuration.get_default_copy()
        conf.connection_pool_maxsize = pool_size  # one kept-alive connection per API thread, no TLS per call
        return cls(api_client(conf, timeout_s=timeout_s))

    # -------------------------------------------------------------------------------------------- pods

    def create_pod(self, manifest: Mapping[str, Any], *, owner_uid: str) -> dict[str, Any]:
        """Create the pod, or adopt the one of that name if it is ours; raises Conflict if it is another job's."""
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            # the answer as plain JSON: the client's V1Pod model (built, then turned back into a dict) costs more
            # CPU than the rest of a placement
            return self._call("POST", PODS_PATH.format(ns=ns), manifest)
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.read_pod(ns, name)
        if existing is None:
            raise Conflict(f"pod {ns}/{name} exists and vanished; will retry")
        job = manifest["metadata"]["labels"][JOB_LABEL]
        if not owned_by(existing, job, owner_uid):  # never ours to delete: another job's, or anyone else's
            raise Conflict(f"pod {ns}/{name} exists and is not this job's (labels and owner reference); it is left "
                           f"alone and this attempt waits until it is gone")
        if existing["spec"].get("affinity") != manifest["spec"].get("affinity"):  # another decision's pod
            raise Conflict(f"pod {ns}/{name} exists, pinned elsewhere than this decision; deciding again")
        return existing

    def patch_job_status(self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]) -> str:
        """Merge `status` into the job's status only if the job is still at `resource_version` (Conflict if not:
        something newer happened, e.g. another replica's decision, and this one is void); returns the job's new
        resourceVersion."""
        patch = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        try:
            body = self._call("PATCH", JOBS_PATH.format(ns=namespace, name=name) + "/status", patch,
                              content_type=MERGE_PATCH)
            return str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"InferenceJob {namespace}/{name} changed since resourceVersion {resource_version}") from e
            if e.status == 404:
                raise Gone(f"InferenceJob {namespace}/{name} is gone") from e
            raise

    def unchanged_version(self, namespace: str, name: str, status: Mapping[str, Any], generation: int | None
                          ) -> str | None:
        """The job's current resourceVersion if its status and generation are still `status`/`generation` (only
        metadata such as finalizers changed since), else None."""
        try:
            body = self._call("GET", JOBS_PATH.format(ns=namespace, name=name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        meta = body.get("metadata") or {}
        if (body.get("status") or {}) != dict(status) or meta.get("generation") != generation:
            return None
        return meta.get("resourceVersion")

    def job_uids(self, namespace: str) -> set[str]:
        """The uids of every InferenceJob in `namespace` (one list, metadata only: PartialObjectMetadataList)."""
        method, url, headers, _, _ = self.api.param_serialize(
            method="GET", resource_path=f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/inferencejobs",
            header_params={"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"},
            auth_settings=["BearerToken"])
        r = self.api.call_api(method, url, headers)
        r.read()
        if not 200 <= r.status <= 299:
            raise ApiException.from_response(http_resp=r, body=r.data.decode("utf-8", "replace"), data=None)
        return {str((i.get("metadata") or {}).get("uid")) for i in json.loads(r.data).get("items") or []}

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"{PODS_PATH.format(ns=namespace)}/{name}")
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str, *, job: str, owner_uid: str) -> bool:
        """Delete pod `name` only if it is job `job`'s (uid `owner_uid`): its labels and owner reference say so, and
        the delete carries the pod's uid as a precondition (a pod re-created under that name meanwhile stays).
        True if it was deleted (or already gone); False, and a log line, if it is not ours."""
        pod = self.read_pod(namespace, name)
        if pod is None:
            return True
        if not owned_by(pod, job, owner_uid):
            log.warning("pod %s/%s is not job %s's (labels and owner reference); not deleting it", namespace, name, job)
            return False
        if pod["metadata"].get("deletionTimestamp"):
            return True
        return self._delete_exact(namespace, name, pod["metadata"]["uid"])

    def delete_exact(self, namespace: str, name: str, uid: str) -> bool:
        """Delete pod `name` only if it is still the pod of that uid (the caller knows it is ours: the pod index)."""
        return self._delete_exact(namespace, name, uid)

    def _delete_exact(self, namespace: str, name: str, uid: str) -> bool:
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            self._call("DELETE", f"{PODS_PATH.format(ns=namespace)}/{name}", body)
        except ApiException as e:
            if e.status == 409:  # the uid precondition failed: that name is another pod now
                log.warning("pod %s/%s was replaced before it was deleted; the new one is left alone", namespace, name)
                return False
            if e.status != 404:
                raise
        return True

    def delete_job_pods(self, namespace: str, job: str, owner_uid: str) -> list[str]:
        """Delete every pod of the job (labels and owner reference; one list, one delete per pod not already
        terminating); returns the names of the job's pods that were there (the caller waits for them to go)."""
        pods = [self._dict(p) for p in self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job}").items]
        ours = [p for p in pods if owned_by(p, job, owner_uid)]
        for pod in ours:
            if not pod["metadata"].get("deletionTimestamp"):
                self._delete_exact(namespace, pod["metadata"]["name"], pod["metadata"]["uid"])
        return [p["metadata"]["name"] for p in ours]

    # ------------------------------------------------------------------------------------ input ConfigMap

    def input_prefixes(self, namespace: str, name: str, key: str) -> tuple[str, ...] | None:
        """Prefix fingerprints (kubeflash_api.prefixes) of the first prompts in a job's input ConfigMap, for
        cache-aware placement; () when its key cannot be parsed (the engine reports that, not placement), None
        when the ConfigMap cannot be read now."""
        try:
            cm = self._dict(self.core.read_namespaced_config_map(name, namespace))
        except ApiException as e:
            log.info("input ConfigMap %s/%s not read for placement: %s", namespace, name, e.reason)
            return None
        text = (cm.get("data") or {}).get(key) or ""
        head = "\n".join(text.split("\n")[:SAMPLE])  # JSONL lines end at "\n" only (kubeflash_api.batch)
        try:
            return job_fingerprints(parse_batch(head, f"ConfigMap {namespace}/{name} key {key}"))
        except SpecError:
            return ()

    # ------------------------------------------------------------------------------- a job's namespace objects

    def objects_problem(self, namespace: str, *, job: str, uid: str, input_cm: tuple[str, str] | None = None,
                        output_cm: str | None = None, pvcs: Mapping[str, str] | None = None
                        ) -> tuple[str, str] | None:
        """(reason, message naming the field) when the job's input ConfigMap or its key is missing (its pod would
        wait in ContainerCreating forever), its output ConfigMap exists and is not this job's (never written), or a
        PersistentVolumeClaim it names (`pvcs`: field -> claim name) is missing (its pod would be unschedulable);
        None when all can serve it, or when a read fails otherwise (the pod then tells)."""
        if input_cm is not None:
            name, key = input_cm
            cm = self._read(self.core.read_namespaced_config_map, namespace, name)
            if cm is None:
                return "InputNotFound", (f"spec.input.configMap.name: ConfigMap {namespace}/{name} not found; the job "
                                         "waits for it")
            keys = {*(cm.get("data") or {}), *(cm.get("binaryData") or {})}
            if cm and key not in keys:
                return "InputNotFound", (f"spec.input.configMap.key: ConfigMap {namespace}/{name} has no key {key!r} "
                                         f"(keys: {', '.join(sorted(keys)) or 'none'}); the job waits for it")
        for field, claim in (pvcs or {}).items():
            if self._read(self.core.read_namespaced_persistent_volume_claim, namespace, claim) is None:
                reason = "InputNotFound" if field.startswith("spec.input") else "OutputNotFound"
                return reason, f"{field}: PersistentVolumeClaim {namespace}/{claim} not found; the job waits for it"
        if output_cm is not None:
            cm = self._read(self.core.read_namespaced_config_map, namespace, output_cm)
            if cm and not owned_by(cm, job, uid):
                return "OutputConflict", (f"spec.output.configMap: ConfigMap {namespace}/{output_cm} exists and was "
                                          "not created by kubeflash for this job; the operator never writes it (delete "
                                          "it or name another); the job waits")
        return None

    def _read(self, read: Any, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as a dict, None if not found, {} if it could not be read (logged: e.g. no RBAC for it)."""
        try:
            return self._dict(read(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            log.info("%s/%s not read: %s", namespace, name, e.reason)
            return {}

    # ------------------------------------------------------------------------------------ output ConfigMap

    def ensure_output_configmap(self, namespace: str, name: str, *, job: str, owner_uid: str, node: str) -> None:
        """Create the job's spec.output.configMap, empty, owned by the job and labelled with the node it runs on
        (the agent of that node, and no other, may then write the results into it: chart policy
        kubeflash-agent-scope). A ConfigMap of that name the operator did not create for this job is never written:
        Conflict, naming spec.output.configMap."""
        labels = {"app.kubernetes.io/name": "kubeflash", "app.kubernetes.io/managed-by": MANAGED_BY,
                  JOB_LABEL: job, NODE_LABEL: node}
        body = {"metadata": {"name": name, "namespace": namespace, "labels": labels,
                             "ownerReferences": [owner_reference(job, owner_uid)]}}
        try:
            self.core.create_namespaced_config_map(namespace, body)
            return
        except ApiException as e:
            if e.status != 409:
                raise
        try:
            existing = self._dict(self.core.read_namespaced_config_map(name, namespace))
        except ApiException as e:
            if e.status == 404:
                raise Conflict(f"ConfigMap {namespace}/{name} exists and vanished; will retry") from e
            raise
        if not owned_by(existing, job, owner_uid):
            raise Conflict(f"spec.output.configMap: ConfigMap {namespace}/{name} exists and was not created by "
                           f"kubeflash for this job; the operator never writes it (delete it or name another)")
        if (existing["metadata"].get("labels") or {}).get(NODE_LABEL) != node:  # a retry placed on another node
            patch = {"metadata": {"labels": {NODE_LABEL: node},
                                  "resourceVersion": existing["metadata"]["resourceVersion"]}}
            try:
                self.core.patch_namespaced_config_map(name, namespace, patch)
            except ApiException as e:
                if e.status in (404, 409):
                    raise Conflict(f"ConfigMap {namespace}/{name} changed while relabelling it; will retry") from e
                raise

    # -------------------------------------------------------------------------------------- FlashNodes

    def request_model(self, node: str, entry: Mapping[str, str], *, limit: int = MAX_MODELS) -> bool:
        """Add `entry` to FlashNode(node).spec.models unless its id is there (then only a tensorParallel > 1 the
        entry asks for and that one lacks is set on it); True if spec.models was changed.

        A full list (`limit` entries, the CRD's maxItems) is first trimmed of entries no live job on the node
        needs (garbage collection, least recently used first): the jobs holding a claim in the node's ledger, each
        needing its status.modelId. A dropped model stays on the SSD as cache until the agent needs the space.
        """
        body = self.custom.get_cluster_custom_object(GROUP, VERSION, "flashnodes", node)
        models = list((body.get("spec") or {}).get("models") or [])
        same = next((i for i, m in enumerate(models) if m.get("id") == entry["id"]), None)
        if same is not None:  # already wanted; only a tensorParallel the entry lacks is added (docs/multi-gpu.md)
            tp = int(entry.get("tensorParallel") or 1)
            if tp <= 1 or int(models[same].get("tensorParallel") or 1) == tp:
                return False
            models[same] = {**models[same], "tensorParallel": tp}
        if same is None and len(models) >= limit:
            needed = {entry["id"], *self._models_of(parse_ledger(node, body))}
            drop = models_to_drop(models, (body.get("status") or {}).get("models") or [], needed,
                                  count=len(models) - limit + 1 + GC_SLACK)
            if len(models) - len(drop) >= limit:
                raise Conflict(f"FlashNode {node}: spec.models holds {len(models)} models that live jobs need; "
                               f"model {entry['id']} waits until one is done")
            log.info("FlashNode %s: %d desired models no live job needs dropped: %s", node, len(drop),
                     ", ".join(sorted(drop)))
            models = [m for m in models if m.get("id") not in drop]
        if same is None:
            models.append({k: v for k, v in entry.items() if v})
        patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "spec": {"models": models}}
        try:
            self.custom.patch_cluster_custom_object(GROUP, VERSION, "flashnodes", node, patch)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"FlashNode {node} changed while adding model {entry['id']}; will retry") from e
            raise
        log.info("requested model %s on FlashNode %s", entry["id"], node)
        return True

    def _models_of(self, claims: Mapping[str, Any]) -> set[str]:
        """The model of each claimed job ("ns/name"): status.modelId, else its spec's; a job that cannot be read
        stops the collection (ApiException: nothing is collected on a guess), one that is gone needs none."""
        out: set[str] = set()
        for key in claims:
            ns, _, name = key.partition("/")
            try:
                job = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "inferencejobs", name)
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            model = (job.get("status") or {}).get("modelId")
            if not model:  # placed this moment (the status comes after the claim): the model its spec names
                try:
                    model = parse_job_spec(job.get("spec") or {}, name=name, namespace=ns).model.id
                except SpecError:
                    continue  # it will fail as InvalidSpec and needs nothing
            out.add(model)
        return out

    def read_flashnode(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", FLASHNODE_PATH.format(name=name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def write_ledger(self, name: str, resource_version: str, annotation: str, ended: str | None = None
                     ) -> dict[str, Any]:
        """Set FlashNode(name)'s claims ledger and ended records (None: none) only if the object is still at
        `resource_version`.

        Raises Conflict (409: someone wrote the FlashNode since; read it again and re-decide) or Gone (404).
        Returns the FlashNode as written (its new resourceVersion is the next write's precondition).
        """
        patch = {"metadata": {"resourceVersion": resource_version,
                              "annotations": {CLAIMS_ANNOTATION: annotation, ENDED_ANNOTATION: ended}}}
        try:
            return self._call("PATCH", FLASHNODE_PATH.format(name=name), patch, content_type=MERGE_PATCH)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"FlashNode {name} changed since resourceVersion {resource_version}") from e
            if e.status == 404:
                raise Gone(f"FlashNode {name} is gone") from e
            raise

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)


def models_to_drop(desired: list[Mapping[str, Any]], reported: list[Mapping[str, Any]], needed: set[str], *,
                   count: int) -> set[str]:
    """Up to `count` ids of `desired` (FlashNode spec.models) outside `needed`, least recently used first
    (status.models[].lastUsed; never used sorts first), Ready and Failed copies before ones still staging."""
    state = {m.get("id"): m for m in reported if isinstance(m, Mapping)}
    busy = {"Pending", "Staging"}

    def order(m: Mapping[str, Any]) -> tuple[bool, str]:
        r = state.get(m.get("id")) or {}
        return (r.get("state") in busy, str(r.get("lastUsed") or ""))

    spare = sorted((m for m in desired if m.get("id") not in needed), key=order)
    return {str(m.get("id")) for m in spare[:max(count, 0)]}
