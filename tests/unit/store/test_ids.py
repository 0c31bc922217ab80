"""Model ids are stable, path-safe and never carry a user string's path characters."""

from __future__ import annotations

import pytest

from kubeflash_node.store.ids import job_dir_name, model_id


@pytest.mark.parametrize("uri", ["builtin:smollm2-135m", "../../etc/passwd", "/abs/path/model.gguf",
                                 "https://example.invalid/a/b/Model Q4.gguf", "dummy:llama-3-8b"],
                         ids=["builtin", "traversal", "absolute", "url", "dummy"])
def test_model_id_is_path_safe(uri):
    """No slash, dot-dot or space survives into the id; the id is stable for the same inputs."""
    mid = model_id(uri)
    assert "/" not in mid and ".." not in mid and " " not in mid
    assert mid == model_id(uri)


def test_model_id_depends_on_dtype_and_quantization():
    """The same source at another dtype or quantization is another staged model."""
    assert len({model_id("dummy:opt-13b"), model_id("dummy:opt-13b", dtype="bfloat16"),
                model_id("dummy:opt-13b", quantization="int4")}) == 3


def test_job_dir_rejects_bad_names():
    """A namespace or name that is not a Kubernetes name cannot become a path."""
    assert job_dir_name("default", "job-1") == "default/job-1"
    with pytest.raises(ValueError, match="namespace"):
        job_dir_name("../x", "job")
