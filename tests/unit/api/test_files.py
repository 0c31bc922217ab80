"""Manifest and batch files as users really write them (and get them wrong): every refusal names the file, the
line where there is one, and what was expected; what is valid reads back exactly.

Real files in tmp_path, read by kubeflash_api.files.load_manifest, kubeflash_api.local.load_job_file and
kubeflash_api.batch.read_batch, the functions `kubeflash run` and the operator's pod use.
"""

from __future__ import annotations

import json
import time

import pytest

from kubeflash_api import SpecError
from kubeflash_api.batch import read_batch
from kubeflash_api.files import MAX_MANIFEST_BYTES, load_manifest
from kubeflash_api.local import load_job_file

JOB = """apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata:
  name: j
spec:
  model:
    uri: builtin:smollm2-135m
  input:
    prompts: [hi]
"""


def _refused(path, *, line: int | None = None):
    """The SpecError load_manifest raises for `path`, checked to name the file (and the line)."""
    with pytest.raises(SpecError) as err:
        load_manifest(path)
    where = f"{path}:{line}" if line else str(path)
    assert err.value.path == where, str(err.value)
    assert str(err.value).startswith(where)
    return str(err.value)


def test_a_valid_manifest_loads(tmp_path):
    """The control: the same YAML without a defect loads as the mapping it spells."""
    p = tmp_path / "job.yaml"
    p.write_text(JOB)
    assert load_manifest(p)["spec"]["input"] == {"prompts": ["hi"]}


@pytest.mark.parametrize(("text", "line"), [
    ("a: 1\na: 2\n", 2),
    ("spec:\n  model:\n    uri: x\n    uri: y\n", 4),
    ("spec:\n  input: {prompts: [a], prompts: [b]}\n", 2),
    ("metadata: {name: a}\nmetadata: {name: b}\n", 2),
], ids=["top", "nested", "flow", "metadata"])
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, line):
    """A key given twice (YAML would silently keep the last) is an error at the second one's line."""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    assert "duplicate key" in _refused(p, line=line)


def test_merge_keys_may_be_overridden(tmp_path):
    """`<<: *base` then the same key is YAML's override, not a duplicate; a key twice beside a merge still is."""
    p = tmp_path / "job.yaml"
    p.write_text("base: &b {a: 1, c: 3}\nx:\n  <<: *b\n  a: 2\n")
    assert load_manifest(p)["x"] == {"a": 2, "c": 3}
    p.write_text("base: &b {a: 1}\nx:\n  <<: *b\n  c: 2\n  c: 3\n")
    assert "duplicate key 'c'" in _refused(p, line=5)


def test_two_documents_are_refused_naming_the_count(tmp_path):
    """kubectl applies every document; kubeflash run takes one InferenceJob, so a second is never silently dropped."""
    p = tmp_path / "job.yaml"
    p.write_text(JOB + "---\n" + JOB)
    msg = _refused(p)
    assert "holds 2 YAML documents (InferenceJob, InferenceJob)" in msg


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "is empty"),
    (b" \n\t\n  \n", "is empty"),
    (b"# only a comment\n", "holds no YAML document"),
    (b"---\n...\n", "holds no YAML document"),
    (b"\xef\xbb\xbf", "holds no YAML document"),
    (b"apiVersion: v1\x00\n", "is binary (holds NUL bytes)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary"),
    (b"name: caf\xe9\n", "is not UTF-8 (byte 9)"),
    (b"\xff\xfea\x00:\x00", "is binary"),
    (b"- a\n- b\n", "must hold a mapping (an InferenceJob), got list"),
    (b"just a string\n", "must hold a mapping (an InferenceJob), got str"),
    (b"42\n", "must hold a mapping (an InferenceJob), got int"),
], ids=["empty", "whitespace", "comment", "empty-doc", "bom-only", "nul", "png", "latin1", "utf16", "list", "str",
        "int"])
def test_files_that_are_no_manifest_are_named(tmp_path, data, expected):
    """Empty, blank, binary, non-UTF-8 and non-mapping files: the file named and what was expected."""
    p = tmp_path / "job.yaml"
    p.write_bytes(data)
    assert expected in _refused(p)


def test_a_bom_is_read_past(tmp_path):
    """Editors on Windows write a UTF-8 byte-order mark; the manifest behind it is read as usual."""
    p = tmp_path / "job.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + JOB.encode())
    assert load_job_file(p).name == "j"


@pytest.mark.parametrize(("text", "line"), [
    ("a: [1, 2\n", 2),
    ("a:\n\tb: 1\n", 2),
    ("a: b: c\n", 1),
    ("a: *nowhere\n", 1),
    ("a: !!python/object/apply:os.system [echo hi]\n", 1),
    ("? [1, 2]\n: x\n", 1),
], ids=["unclosed", "tab", "colon", "alias", "python-tag", "list-key"])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    """PyYAML's own errors come out as SpecError at the file and line, never as a YAML traceback."""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    assert "is not valid YAML" in _refused(p, line=line)


@pytest.mark.parametrize("text", ["a: 2025-13-45\n", "a: " + "9" * 5000 + "\n", "a: !!int x\n", "a: !!timestamp x\n",
                                  "a: !!float x\n"], ids=["bad-date", "huge-int", "int-tag", "timestamp-tag",
                                                          "float-tag"])
def test_values_pyyaml_cannot_build_are_named(tmp_path, text):
    """Scalars PyYAML resolves but cannot construct (they raised ValueError or AttributeError before)."""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    assert "is not valid YAML: a value cannot be read" in _refused(p)


@pytest.mark.parametrize("text", ["[" * 200_000, "a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n",
                                  "a:\n" + "".join(" " * (i + 1) + "-\n" for i in range(400))],
                         ids=["flow-list", "flow-map", "block"])
def test_deep_nesting_is_refused_fast(tmp_path, text):
    """Nesting past 100 levels is refused within a second (PyYAML slows quadratically, then overflows)."""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    t = time.monotonic()
    assert "nested more than 100 levels deep" in _refused(p, line=101 if text.startswith("a:\n") else 1)
    assert time.monotonic() - t < 1.0


def test_alias_bomb_stays_small_and_is_refused_by_field(tmp_path):
    """A billion-laughs document (9**9 leaves through aliases) builds shared references, is refused by its field
    within a second, and the refusal message stays short."""
    bomb = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    nested = "".join(f"  {b}\n" for b in bomb)
    p = tmp_path / "job.yaml"
    cases = [("bomb:\n" + nested + JOB.replace("prompts: [hi]", "prompts: *a8"), "bomb", "is not a known top-level"),
             (JOB.replace("kind: InferenceJob\n", "kind: InferenceJob\nstatus:\n" + nested).replace(
                 "prompts: [hi]", "prompts: *a8"), "spec.input.prompts[0]", "must be a string, got list [["),
             (JOB.replace("kind: InferenceJob\n", "kind: InferenceJob\nstatus:\n" + nested).replace(
                 "name: j", "name: *a8"), "metadata.name", "must be a string, got list")]
    for text, where, expected in cases:
        p.write_text(text)
        t = time.monotonic()
        with pytest.raises(SpecError) as err:
            load_job_file(p)
        assert time.monotonic() - t < 1.0
        assert err.value.path == where and expected in str(err.value)
        assert len(str(err.value)) < 300


def test_a_manifest_over_one_mib_is_refused_unread(tmp_path):
    """A file past 1 MiB is refused by its size (nothing is parsed), naming the file and the limit."""
    p = tmp_path / "job.yaml"
    p.write_text(JOB + "#" * MAX_MANIFEST_BYTES + "\n")
    msg = _refused(p)
    assert f"may be at most {MAX_MANIFEST_BYTES} bytes" in msg


def test_a_missing_file_and_a_directory_are_named(tmp_path):
    """The file that is not there, or is a directory, is named with what was expected."""
    assert "does not exist" in _refused(tmp_path / "nope.yaml")
    assert "is not a regular file" in _refused(tmp_path)


def test_a_dangling_symlink_is_named(tmp_path):
    """A manifest that is a symlink to nothing is a SpecError naming it, not an OSError."""
    p = tmp_path / "job.yaml"
    p.symlink_to(tmp_path / "gone.yaml")
    assert "does not exist" in _refused(p)


# ---------------------------------------------------------------------------------------------- batch files


def line(cid="a", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": body or {"messages": [{"role": "user", "content": "hi"}]}})


def _batch_refused(tmp_path, text: str | bytes, *, where: str) -> str:
    p = tmp_path / "batch.jsonl"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as err:
        read_batch(p)
    expected = where.replace("FILE", str(p))
    assert err.value.path == expected, str(err.value)
    assert str(err.value).startswith(expected)
    return str(err.value)


def test_a_valid_batch_reads_every_request(tmp_path):
    """The control: chat and completion lines, blank lines and CRLF ends, a U+2028 inside a string."""
    p = tmp_path / "batch.jsonl"
    text = "\r\n".join([line("a"), "", json.dumps({"custom_id": "b", "url": "/v1/completions",
                                                    "body": {"prompt": "x\u2028y", "max_tokens": 3}},
                                                   ensure_ascii=False)]) + "\r\n"
    p.write_text(text, encoding="utf-8")
    a, b = read_batch(p)
    assert (a.id, a.kind, a.messages[0]["content"]) == ("a", "chat", "hi")
    assert (b.id, b.kind, b.text, b.max_tokens) == ("b", "completion", "x\u2028y", 3)


def test_line_numbers_follow_newlines_only(tmp_path):
    """A U+2028 or U+0085 inside a JSON string neither splits the line nor shifts the numbers after it."""
    good = json.dumps({"custom_id": "a", "body": {"prompt": "one\u2028two\x85three"}}, ensure_ascii=False)
    msg = _batch_refused(tmp_path, good + "\n" + "{oops\n", where="FILE:2")
    assert "is not valid JSON" in msg


@pytest.mark.parametrize(("text", "where", "expected"), [
    ('{"custom_id": "a", "body": }', "FILE:1", "is not valid JSON"),
    ('{"custom_id": "a", "custom_id": "b", "body": {"prompt": "x"}}', "FILE:1", "has the key 'custom_id' twice"),
    ('{"custom_id": "a", "body": {"prompt": "x", "prompt": "y"}}', "FILE:1", "has the key 'prompt' twice"),
    ('{"custom_id": "a", "body": {"prompt": "x", "max_tokens": NaN}}', "FILE:1", "holds NaN, which is not JSON"),
    ('{"custom_id": "a", "body": {"prompt": "x", "max_tokens": -Infinity}}', "FILE:1", "holds -Infinity"),
    ('{"custom_id": "a", "body": {"prompt": "x", "max_tokens": 1e999}}', "FILE:1", "too large for a float"),
    ('{"custom_id": "a", "body": {"prompt": "x", "max_tokens": ' + "9" * 5000 + "}}", "FILE:1", "cannot be read"),
    ('{"custom_id": "a", "body": {"prompt": "\\ud800"}}', "FILE:1", "holds a lone surrogate"),
    ("[" * 100_000, "FILE:1", "nested too deeply"),
    ('["not", "an", "object"]', "FILE:1", "must be a JSON object, got list"),
    (line("a") + "\n" + line("b") + "\n" + line("a"), "FILE:3: custom_id", "'a' is used twice (first on line 1)"),
    (line(messages=[{"role": "user", "content": 5}]), "FILE:1: body.messages[0].content",
     "must be a string or a list of text parts, got int 5"),
    (line(messages=[{"role": "user", "content": {"text": "hi"}}]), "FILE:1: body.messages[0].content",
     "must be a string or a list of text parts, got dict"),
    (line(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "FILE:1: body.messages[0].content[0]", "must be a text part"),
    (line(messages=[{"role": "user", "content": ["hi"]}]), "FILE:1: body.messages[0].content[0]",
     "must be a text part"),
    (line(messages=[{"role": "user", "content": []}]), "FILE:1: body.messages[0].content",
     "must be a string or a list of text parts"),
    (line(messages=[{"role": "user", "content": "hi", "name": ["x"]}]), "FILE:1: body.messages[0].name",
     "must be a string, got list"),
    (line(messages=[{"role": "robot", "content": "hi"}]), "FILE:1: body.messages[0].role",
     "must be one of system, developer, user, assistant, got str 'robot'"),
    (line(messages=[{"role": "user", "content": "hi"}], temperature=0.5), "FILE:1: body.temperature",
     "cannot differ per request; set spec.generation.temperature for the whole job"),
    (line(messages=[{"role": "user", "content": "hi"}], top_p=0.5), "FILE:1: body.top_p",
     "set spec.generation.topP"),
    (line(messages=[{"role": "user", "content": "hi"}], n=2), "FILE:1: body.n", "one answer per request"),
    (json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"messages": []}}), "FILE:1: body.messages",
     "is not supported for /v1/completions"),
    (json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {"prompt": "x"}}), "FILE:1: body.prompt",
     "is not supported for /v1/chat/completions"),
    (json.dumps({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}), "FILE:1: url",
     "must be one of /v1/chat/completions, /v1/completions"),
    (json.dumps({"custom_id": "a", "url": ["/v1/completions"], "body": {"prompt": "x"}}), "FILE:1: url",
     "got list"),
    (json.dumps({"custom_id": 7, "body": {"prompt": "x"}}), "FILE:1: custom_id", "must be a non-empty string"),
    (json.dumps({"custom_id": "a", "method": "GET", "body": {"prompt": "x"}}), "FILE:1: method", "must be POST"),
    (json.dumps({"custom_id": "a", "body": {"prompt": "x", "max_tokens": 0}}), "FILE:1: body.max_tokens",
     "must be an integer from 1 to 32768, got int 0"),
], ids=["json", "dup-key", "dup-body-key", "nan", "inf", "1e999", "huge-int", "surrogate", "deep", "list",
        "dup-custom-id", "content-int", "content-dict", "content-image", "content-str-parts", "content-empty-list",
        "name-list", "role", "temperature", "top-p", "n", "completions-messages", "chat-prompt", "url-unknown", "url-list",
        "custom-id-int", "method", "max-tokens-zero"])
def test_bad_batch_lines_are_named(tmp_path, text, where, expected):
    """Each mistake in a batch file names the file, the line and the field, and what was expected."""
    assert expected in _batch_refused(tmp_path, text, where=where)


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf"], ids=["empty", "blank", "bom"])
def test_an_empty_batch_is_refused(tmp_path, data):
    """A batch with no request is named (as the field that pointed at it), never a job that does nothing."""
    p = tmp_path / "batch.jsonl"
    p.write_bytes(data)
    with pytest.raises(SpecError) as err:
        read_batch(p)
    assert str(p) in err.value.path
    assert "is empty" in str(err.value) or "holds no requests" in str(err.value)


@pytest.mark.parametrize(("data", "expected"), [(b"\x00\x01", "is binary"), (b'{"custom_id": "\xe9"}', "is not UTF-8")],
                         ids=["binary", "latin1"])
def test_a_binary_or_non_utf8_batch_is_named_with_its_field(tmp_path, data, expected):
    """read_batch names the field that pointed at the file (spec.input.file) and the file."""
    p = tmp_path / "batch.jsonl"
    p.write_bytes(data)
    with pytest.raises(SpecError) as err:
        read_batch(p)
    assert err.value.path == f"spec.input.file: {p}" and expected in str(err.value)
