"""Model sources and store paths: no user string becomes a path; traversal and escapes are refused."""

import os
from pathlib import Path

import pytest

from kubeflash_node.agent.paths import SourceRejected, job_dir, model_dir, resolve_source


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "model").mkdir(parents=True)
    (allowed / "model" / "config.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    return allowed, tmp_path


def check(uri, allowed, **kw):
    return resolve_source(uri, allowed_roots=(allowed,), **{"allow_http": True, **kw})


@pytest.mark.parametrize(
    "uri,message",
    [
        pytest.param("{allowed}/../secret", "'..' is not allowed", id="dotdot"),
        pytest.param("{allowed}/model/../../secret", "'..' is not allowed", id="dotdot-deep"),
        pytest.param("{tmp}/secret", "outside the allowed source roots", id="absolute-outside"),
        pytest.param("file://{tmp}/secret", "outside the allowed source roots", id="file-url-outside"),
        pytest.param("relative/model", "must be an absolute path", id="relative"),
        pytest.param("s3://bucket/model", "scheme 's3' is not supported", id="unknown-scheme"),
        pytest.param("builtin:../../etc", "must be lowercase letters", id="builtin-traversal"),
        pytest.param("dummy:a/b", "must be lowercase letters", id="dummy-slash"),
        pytest.param("https://host/model.bin", "expected a URL ending in .gguf", id="url-unknown-kind"),
        pytest.param("https://host/m.gguf#md5=abc", "#sha256=", id="url-bad-fragment"),
        pytest.param("/x\n/y", "control characters", id="control-chars"),
    ],
)
def test_refused(roots, uri, message):
    """Each refusal says why, so it can go into the model's status message."""
    allowed, tmp = roots
    with pytest.raises(SourceRejected, match=message):
        check(uri.format(allowed=allowed, tmp=tmp), allowed)


def test_symlink_escape_refused(roots):
    """A symlink inside an allowed root that points outside is followed and refused."""
    allowed, tmp = roots
    os.symlink(tmp / "secret", allowed / "link")
    with pytest.raises(SourceRejected, match="outside"):
        check(str(allowed / "link"), allowed)


def test_file_in_dir_linking_out_refused(roots):
    """An HF directory whose files link outside the roots is refused too (convert reads every file)."""
    allowed, tmp = roots
    os.symlink(tmp / "secret" / "key", allowed / "model" / "model.safetensors")
    with pytest.raises(SourceRejected, match="links outside"):
        check(str(allowed / "model"), allowed)


def test_no_roots_means_no_local_sources(roots):
    allowed, _ = roots
    with pytest.raises(SourceRejected, match="allowedSourceRoots is empty"):
        resolve_source(str(allowed / "model"), allowed_roots=())


@pytest.mark.parametrize(
    "uri,kind,ref,fetch",
    [
        pytest.param("builtin:smollm2-135m", "builtin", "builtin:smollm2-135m", "", id="builtin"),
        pytest.param("dummy:opt-125m", "dummy", "dummy:opt-125m", "", id="dummy"),
        pytest.param("https://h/x/model.Q4.gguf", "http", "https://h/x/model.Q4.gguf", "source.gguf", id="gguf-url"),
        pytest.param("http://h/m.tar.gz", "http", "http://h/m.tar.gz", "source.tar.gz", id="tar-url"),
    ],
)
def test_accepted(roots, uri, kind, ref, fetch):
    """Accepted sources come back in the form the worker reads; downloads get an agent-chosen file name."""
    allowed, _ = roots
    s = check(uri, allowed)
    assert (s.kind, s.ref, s.fetch_name) == (kind, ref, fetch)


def test_local_source_resolved(roots):
    """A local source is returned as its real path under the root."""
    allowed, _ = roots
    s = check(f"file://{allowed}/model", allowed)
    assert (s.kind, Path(s.ref)) == ("local", (allowed / "model").resolve())


def test_sha256_fragment_is_split_off(roots):
    allowed, _ = roots
    digest = "ab" * 32
    s = check(f"https://h/m.gguf#sha256={digest.upper()}", allowed)
    assert (s.ref, s.sha256) == ("https://h/m.gguf", digest)


def test_disabled_kinds(roots):
    allowed, _ = roots
    with pytest.raises(SourceRejected, match="allowHttp"):
        check("https://h/m.gguf", allowed, allow_http=False)
    with pytest.raises(SourceRejected, match="allowHttp"):  # the default: off
        resolve_source("https://h/m.gguf", allowed_roots=(allowed,))
    with pytest.raises(SourceRejected, match="allowDummy"):
        check("dummy:opt-125m", allowed, allow_dummy=False)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "UPPER", "-x"], ids=str)
def test_model_dir_only_takes_ids(bad):
    """The store layout accepts only model ids, never a path-like string."""
    with pytest.raises(ValueError):
        model_dir(Path("/store"), bad)


@pytest.mark.parametrize("ns,name", [("..", "x"), ("ns", "../x"), ("ns", "a/b"), ("NS", "x")], ids=str)
def test_job_dir_only_takes_kubernetes_names(ns, name):
    with pytest.raises(ValueError):
        job_dir(Path("/store"), ns, name)


def test_job_dir_layout():
    assert job_dir(Path("/store"), "team-a", "run-1") == Path("/store/jobs/team-a/run-1")
