"""The operator killed (SIGKILL) in the middle of a delete-collection, on a real control plane with KWOK nodes
(bench/operator_scale.py's pieces): once a new operator runs, no job, pod or FlashNode ledger entry is left, no
pair was ever handed to two jobs on the way, and the new operator's log has no traceback.

The deletion is where the operator holds state that is only in flight: pod deletes sent, ledger releases queued
per FlashNode, kopf's finalizer removals. A job's finalizer stays until its ledger entry is released, so whatever
the kill interrupts, the job is still there, marked for deletion, and the next operator finishes it. tests/cluster/
test_faults.py covers kills and lost nodes during a burst. Small (24 jobs on 6 nodes): well under a minute here.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from operator_scale import (  # noqa: E402
    GROUP,
    NS,
    VERSION,
    OperatorProcess,
    apply_crds,
    burst,
    double_booked,
    job_body,
    leftovers,
    make_nodes,
    start_cluster,
    wait,
)

from kubeflash_api import parse_job_spec  # noqa: E402


@pytest.mark.timeout(300)
def test_operator_killed_mid_deletion_leaves_nothing_after_restart(k8s_bin_dir, tmp_path):
    """24 Running jobs on 6 nodes x 4 pairs, one delete-collection; the operator is killed as soon as the jobs are
    being marked (its pod deletes, ledger releases and finalizer removals in flight); a new operator removes every
    job, pod and ledger entry."""
    jobs, nodes, pairs = 24, 6, 4
    cp, op_kubeconfig, _ = start_cluster(Path(k8s_bin_dir), tmp_path)
    first = second = None
    try:
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        custom = client.CustomObjectsApi(api)
        apply_crds(cp)
        make_nodes(api, cp, nodes, pairs, parse_job_spec(job_body("x")["spec"], name="x", namespace=NS).model.id)
        first = OperatorProcess(op_kubeconfig, tmp_path / "first.log")
        first.wait_ready()
        burst(api, jobs)

        def running() -> int:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs")["items"]
            return sum(1 for j in items if (j.get("status") or {}).get("phase") == "Running")

        wait(f"all {jobs} jobs Running", lambda: running() == jobs, 120)
        assert double_booked(api) == []
        deleter = threading.Thread(target=custom.delete_collection_namespaced_custom_object,
                                   args=(GROUP, VERSION, NS, "inferencejobs"))
        deleter.start()
        def marked() -> bool:  # the API server is marking the jobs; the operator's finalizer has work in flight
            items = custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs")["items"]
            return len(items) < jobs or any(j["metadata"].get("deletionTimestamp") for j in items)

        wait("the deletion under way", marked, 60, every=0.02)
        first.proc.kill()
        first.proc.wait()
        deleter.join()
        at_kill = leftovers(api)
        print(f"when killed: {at_kill}")
        assert at_kill["jobs"] > 0, "every job was gone before the kill: nothing was left to the next operator"
        assert double_booked(api) == []
        second = OperatorProcess(op_kubeconfig, tmp_path / "second.log")
        second.wait_ready()
        left: dict[str, int] = {}

        def clean() -> bool:
            left.update(leftovers(api))
            return not any(left.values())

        try:
            wait("no job, pod or ledger entry left", clean, 90)
        except TimeoutError:
            pytest.fail(f"left after the restart: {left}; second operator's log: {second.text()[-3000:]}")
        assert "Traceback" not in second.text(), second.text()[-3000:]
    finally:
        for op in (first, second):
            if op is not None:
                op.stop()
        cp.stop()
