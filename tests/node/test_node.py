"""Real pods on a real node (kubelet + containerd on this machine, kind/realnode.py): the chart's operator and
agent run from images built offline, and the operator's inference pods run the examples on the CPU. The bodies
are tests/e2e_cases.py's, shared with tests/kind, so both cluster providers make the same assertions.
"""

from __future__ import annotations

import pytest

import e2e_cases as cases

# The first test pays for bringing the cluster up (binaries and images cached after the first run).
pytestmark = [pytest.mark.node, pytest.mark.timeout(3600)]


def test_capital_of_france_answers_paris(node_cluster, node_namespace):
    cases.capital_of_france_answers_paris(node_cluster, node_namespace)


def test_cluster_smollm2_example(node_cluster, node_namespace):
    cases.cluster_smollm2_two_prompts(node_cluster, node_namespace)


def test_results_reach_the_output_configmap(node_cluster, node_namespace):
    cases.results_reach_the_output_configmap(node_cluster, node_namespace)


def test_deleting_a_job_removes_its_pod_and_directory(node_cluster, node_namespace):
    cases.deleting_a_job_removes_its_pod_and_directory(node_cluster, node_namespace)


def test_killed_inference_pod_resumes_exactly_once(node_cluster, node_namespace):
    cases.killed_inference_pod_resumes_exactly_once(node_cluster, node_namespace)


def test_deleting_a_running_job_releases_everything(node_cluster, node_namespace):
    cases.deleting_a_running_job_releases_everything(node_cluster, node_namespace)


def test_operator_restarted_mid_job_still_completes(node_cluster, node_namespace):
    cases.operator_restarted_mid_job_still_completes(node_cluster, node_namespace, "kubeflash-system")


def test_malformed_job_is_refused_with_the_field_path(node_cluster, node_namespace):
    cases.malformed_job_is_refused_with_the_field_path(node_cluster, node_namespace)
