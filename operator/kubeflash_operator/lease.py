"""Leader election on a coordination.k8s.io Lease: with several operator replicas, one acts and the others wait.

`may_take` is the pure rule; `Elector` takes and renews the Lease with resourceVersion-conditional writes (two
replicas racing for it: one gets 409) and sets `lost` when it could not renew within the lease duration, so the
caller stops acting (kopf's stop flag) before another replica may take over. A clean exit hands the Lease back
at once, so a rolling update does not wait out the duration.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
LEASE_NAME = "kubeflash-operator"


@dataclass(frozen=True)
class LeaseView:
    holder: str
    renewed: datetime | None
    duration_s: int
    transitions: int = 0
    version: str = ""


def may_take(lease: LeaseView | None, me: str, now: datetime) -> bool:
    """No Lease, nobody holds it, we hold it, or the holder has not renewed within its duration."""
    if lease is None or not lease.holder or lease.holder == me or lease.renewed is None:
        return True
    return now - lease.renewed > timedelta(seconds=lease.duration_s)


def lease_view(body: Any) -> LeaseView:
    spec = body.spec
    renewed = spec.renew_time or spec.acquire_time
    return LeaseView(holder=spec.holder_identity or "", renewed=renewed, duration_s=int(spec.lease_duration_seconds or 0),
                     transitions=int(spec.lease_transitions or 0), version=body.metadata.resource_version)


class Elector:
    def __init__(self, api: client.ApiClient, *, namespace: str, identity: str, name: str = LEASE_NAME,
                 duration_s: int = 15) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity, self.duration_s = namespace, name, identity, duration_s
        self.lost = threading.Event()  # set when the Lease could not be renewed in time: stop acting
        self._stop = threading.Event()

    def try_take(self) -> bool:
        """One attempt to take or renew the Lease; False if another replica holds it (or won the race)."""
        now = datetime.now(UTC)
        try:
            body = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = None
        if body is not None and not may_take(lease_view(body), self.identity, now):
            return False
        try:
            if body is None:
                self.coord.create_namespaced_lease(self.namespace, client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                    spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.duration_s,
                                            acquire_time=now, renew_time=now, lease_transitions=0)))
            else:  # replace carries the version read: a concurrent write makes this one fail (409)
                spec = body.spec
                if spec.holder_identity != self.identity:
                    spec.acquire_time = now
                    spec.lease_transitions = int(spec.lease_transitions or 0) + 1
                spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.duration_s
                self.coord.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:  # another replica wrote (or created) it first
                return False
            raise
        return True

    def wait_until_leader(self, retry_s: float = 2.0) -> None:
        """Block until this replica holds the Lease."""
        logged = False
        while not self.try_take():
            if not logged:
                log.info("another operator replica holds Lease %s/%s; waiting", self.namespace, self.name)
                logged = True
            time.sleep(retry_s)
        log.info("holding Lease %s/%s as %s", self.namespace, self.name, self.identity)

    def keep_renewing(self) -> threading.Thread:
        """Renew every third of the duration in a thread; set `lost` if no renewal succeeded for 2/3 of it."""

        def loop() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.duration_s / 3):
                try:
                    if self.try_take():
                        last = time.monotonic()
                except Exception as e:  # noqa: BLE001 - an API hiccup: try again next period
                    log.warning("renewing Lease %s/%s failed: %s", self.namespace, self.name, e)
                if time.monotonic() - last > self.duration_s * 2 / 3:
                    log.error("lost Lease %s/%s: stopping so another replica can act", self.namespace, self.name)
                    self.lost.set()
                    return

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Stop renewing and hand the Lease back (only if still ours)."""
        self._stop.set()
        try:
            body = self.coord.read_namespaced_lease(self.name, self.namespace)
            if body.spec.holder_identity == self.identity:
                body.spec.holder_identity = ""
                body.spec.renew_time = None
                self.coord.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            log.warning("handing back Lease %s/%s failed (it expires by itself): %s", self.namespace, self.name, e)
