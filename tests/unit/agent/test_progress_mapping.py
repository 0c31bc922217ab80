"""progress.json (written by the engine, untrusted) -> InferenceJob.status progress/throughput/timings."""

import json

import pytest

from kubeflash_node.agent.progress import parse, status_patch


def test_full_document():
    """Every contract field lands where the CRD expects it, with a kubectl summary."""
    doc = {"phase": "running", "promptsDone": 3, "promptsTotal": 10, "tokens": 384, "tokensPerSecond": 51.25,
           "timings": {"load_weight": 1.5, "compute_layer_prefill": 0.25}, "message": "",
           "updated": "2025-01-02T03:04:05Z"}
    assert status_patch(doc) == {
        "progress": {"promptsDone": 3, "promptsTotal": 10, "tokens": 384, "summary": "3/10",
                     "updated": "2025-01-02T03:04:05Z"},
        "throughput": {"tokensPerSecond": 51.25},
        "timings": {"compute_layer_prefill": 0.25, "load_weight": 1.5},
    }


@pytest.mark.parametrize(
    "doc,expected",
    [
        pytest.param({"promptsDone": -1, "promptsTotal": "10", "tokens": True}, {}, id="bad-types-dropped"),
        pytest.param({"tokensPerSecond": float("inf")}, {}, id="non-finite-dropped"),
        pytest.param({"timings": {"ok": 1, "bad key!": 2, "../x": 3, "s": "fast"}}, {"timings": {"ok": 1.0}},
                     id="timing-keys-and-values-checked"),
        pytest.param({"timings": [1, 2]}, {}, id="timings-not-a-dict"),
        pytest.param({"promptsDone": 1}, {"progress": {"promptsDone": 1}}, id="partial-no-summary"),
        pytest.param({"prefillTokensPerSecond": 900, "decodeTokensPerSecond": 20.5},
                     {"throughput": {"prefillTokensPerSecond": 900.0, "decodeTokensPerSecond": 20.5}},
                     id="prefill-decode-rates"),
    ],
)
def test_untrusted_fields(doc, expected):
    """Invalid values are dropped field by field rather than failing the whole relay."""
    assert status_patch(doc) == expected


def test_timings_capped():
    doc = {"timings": {f"t{i:03d}": i for i in range(200)}}
    assert len(status_patch(doc)["timings"]) == 64


@pytest.mark.parametrize("text", ["", "{", "[1,2]", "null", '"x"'], ids=repr)
def test_parse_rejects_non_objects(text):
    """A half-written or foreign file is ignored (None), not relayed."""
    assert parse(text) is None


def test_parse_object():
    assert parse(json.dumps({"tokens": 1})) == {"tokens": 1}
