"""The batch output as users' code reads it: `kubeflash run` in real processes, every results.jsonl line checked
against the official `openai` package's types (chat prompts as ChatCompletion, /v1/completions and token-id
prompts as Completion); results keyed by a fingerprint, so a run killed with SIGKILL resumes each prompt exactly
once while an edited manifest gets fresh results (the old file set aside, never mixed); progress.json agrees
with the results after each; a refused job leaves an existing results file byte for byte as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

LINE_KEYS = {"id", "custom_id", "response", "error"}
RESPONSE_KEYS = {"status_code", "request_id", "body"}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """A local store with SmolLM2 (float32, as `kubeflash run` on CPU converts it) and dummy OPT-125m."""
    from kubeflash_node.store.cache import ensure_model

    root = tmp_path_factory.mktemp("kfhome")
    ensure_model("builtin:smollm2-135m", dtype="float32", root=root, progress_bar=False)
    ensure_model("dummy:opt-125m", dtype="float32", root=root, progress_bar=False)
    return root


def _run(job: Path, store_root: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cpu", "--quiet",
                           "--store", str(store_root), "--job-dir", str(job.parent / "jobdir"),
                           "--output", str(job.parent / "jobdir" / "results.jsonl"), *extra],
                          cwd=job.parent, capture_output=True, text=True, timeout=600, check=False)


def _job(d: Path, *, input, uri="builtin:smollm2-135m", max_new=4, **spec) -> Path:
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "out"},
           "spec": {"model": {"uri": uri}, "input": input, "generation": {"maxNewTokens": max_new},
                    "offload": {"policy": "explicit", "gpuBatchSize": 1, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                                "kv": {"gpu": 0, "cpu": 100, "disk": 0}}, **spec}}
    path = d / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _lines(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "jobdir" / "results.jsonl").read_text().splitlines()]


def check_line(rec: dict, *, chat: bool):
    """One batch output line: OpenAI's keys, a 200 response, and a body the openai types accept as they are."""
    assert set(rec) == LINE_KEYS, rec.keys()
    assert isinstance(rec["id"], str) and rec["id"] and isinstance(rec["custom_id"], str)
    assert rec["error"] is None or BatchError.model_validate(rec["error"])
    resp = rec["response"]
    assert set(resp) == RESPONSE_KEYS and resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    model = ChatCompletion if chat else Completion
    required = {k for k, f in model.model_fields.items() if f.is_required()}
    assert required <= set(body), f"missing {required - set(body)}"
    parsed = model.model_validate(body)  # raises on a wrong type or literal at any depth
    assert parsed.system_fingerprint and parsed.system_fingerprint.startswith("kf_")
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
    assert [c.index for c in parsed.choices] == [0]
    if chat:
        assert parsed.object == "chat.completion" and parsed.choices[0].message.role == "assistant"
        assert isinstance(parsed.choices[0].message.content, str)
    else:
        assert parsed.object == "text_completion" and isinstance(parsed.choices[0].text, str)
        assert "logprobs" in body["choices"][0] and body["choices"][0]["logprobs"] is None
    assert parsed.usage.completion_tokens == len(body["token_ids"])
    return parsed


def check_progress(d: Path, total: int) -> dict:
    """progress.json says what results.jsonl holds: every prompt done, its completion tokens summed."""
    progress = json.loads((d / "jobdir" / "progress.json").read_text())
    lines = _lines(d)
    assert progress["phase"] == "done"
    assert progress["promptsDone"] == progress["promptsTotal"] == total == len(lines)
    assert progress["tokens"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in lines)
    return progress


def test_every_line_is_accepted_by_the_openai_types(tmp_path, store_root):
    """Chat and /v1/completions requests from a batch file: each answered in its own shape, all types accepted."""
    reqs = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 9}},
            {"custom_id": "text", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": "Once upon a time", "max_tokens": 3}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    r = _run(_job(tmp_path, input={"file": "in.jsonl"}, max_new=12), store_root)
    assert r.returncode == 0, r.stderr
    recs = {rec["custom_id"]: rec for rec in _lines(tmp_path)}
    chat, text = check_line(recs["chat"], chat=True), check_line(recs["text"], chat=False)
    assert "Paris" in chat.choices[0].message.content and chat.usage.completion_tokens <= 9
    assert text.usage.completion_tokens == 3 and text.choices[0].finish_reason == "length"
    assert chat.model == text.model == "builtin:smollm2-135m"
    assert recs["chat"]["id"] != recs["text"]["id"] and chat.id != text.id
    check_progress(tmp_path, 2)


def test_killed_run_resumes_each_prompt_once_and_progress_agrees(tmp_path, store_root):
    """SIGKILL after two results landed (plus half a line): the rerun keeps them (same line, same id), computes
    the rest, each custom_id once; a third run computes nothing; progress.json agrees after each. Token-id
    prompts on a dummy model (no tokenizer) are text_completions with empty text and the ids in body.token_ids."""
    n = 6
    job = _job(tmp_path, input={"synthetic": {"count": n, "promptLength": 16}}, uri="dummy:opt-125m", max_new=12)
    results = tmp_path / "jobdir" / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cpu", "--quiet",
                             "--store", str(store_root), "--job-dir", str(tmp_path / "jobdir"),
                             "--output", str(results)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [ln for ln in results.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    assert 2 <= len(before) < n
    with open(results, "a") as f:  # what a kill mid-write leaves behind
        f.write('{"id": "batch_req_x", "custom_id": "synthetic-7", "respo')
    r = _run(job, store_root)
    assert r.returncode == 0, r.stderr
    assert "stale" not in r.stderr and not list((tmp_path / "jobdir").glob("results.jsonl.*"))
    after = results.read_text().splitlines(keepends=True)
    assert after[:len(before)] == before  # resumed: the finished lines are kept as they were
    ids = [json.loads(line)["custom_id"] for line in after]
    assert sorted(ids) == sorted(f"synthetic-{i}" for i in range(n))
    for rec in _lines(tmp_path):
        parsed = check_line(rec, chat=False)
        assert parsed.choices[0].text == "" and parsed.usage.prompt_tokens == 16
        assert 1 <= parsed.usage.completion_tokens <= 12
    check_progress(tmp_path, n)
    r = _run(job, store_root)
    assert r.returncode == 0 and "already had results" in r.stdout
    assert results.read_text().splitlines(keepends=True) == after
    assert check_progress(tmp_path, n)["tokensPerSecond"] == 0


def test_edited_manifest_gets_fresh_results(tmp_path, store_root):
    """spec.input.prompts are answered as chat. Edit one prompt: only it is recomputed, the old file is kept aside
    as .stale and stderr says so; edit maxNewTokens: every prompt is recomputed under the new limit. Never an old
    answer under a new question."""
    prompts = ["What is the capital of France?", "Name a color.", "Say hi."]
    job = _job(tmp_path, input={"prompts": prompts}, max_new=3)
    assert _run(job, store_root).returncode == 0
    first = _lines(tmp_path)
    first_bytes = (tmp_path / "jobdir" / "results.jsonl").read_bytes()

    prompts[1] = "What is the capital of Japan?"
    job = _job(tmp_path, input={"prompts": prompts}, max_new=3)
    r = _run(job, store_root)
    assert r.returncode == 0, r.stderr
    [aside] = (tmp_path / "jobdir").glob("results.jsonl.*.stale")
    assert aside.read_bytes() == first_bytes
    assert "1 stored result(s) were computed for other settings or prompts" in r.stderr and str(aside) in r.stderr
    second = {rec["custom_id"]: rec for rec in _lines(tmp_path)}
    assert len(second) == len(_lines(tmp_path)) == 3
    for old in first:
        new = second[old["custom_id"]]
        check_line(new, chat=True)
        same = old["custom_id"] != "prompt-1"
        assert (new == old) is same  # kept as it was, or recomputed (new ids, new fingerprint)
        fp_new, fp_old = new["response"]["body"]["system_fingerprint"], old["response"]["body"]["system_fingerprint"]
        assert (fp_new == fp_old) is same
    check_progress(tmp_path, 3)

    job = _job(tmp_path, input={"prompts": prompts}, max_new=5)
    r = _run(job, store_root)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "jobdir").glob("results.jsonl.*.stale"))) == 2
    third = _lines(tmp_path)
    assert len(third) == 3
    for rec in third:
        check_line(rec, chat=True)
        old = second[rec["custom_id"]]
        assert rec["id"] != old["id"]
        assert rec["response"]["body"]["system_fingerprint"] != old["response"]["body"]["system_fingerprint"]
        assert rec["response"]["body"]["usage"]["completion_tokens"] <= 5
    assert any(rec["response"]["body"]["usage"]["completion_tokens"] > 3 for rec in third)
    check_progress(tmp_path, 3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, store_root) -> bytes:
    """The results.jsonl of a finished two-prompt job on the dummy model."""
    d = tmp_path_factory.mktemp("finished")
    job = _job(d, input={"synthetic": {"count": 2, "promptLength": 8}}, uri="dummy:opt-125m", max_new=2)
    assert _run(job, store_root).returncode == 0
    return (d / "jobdir" / "results.jsonl").read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["generation"].update(topP=3), "spec.generation.topP"),
    (lambda s: s["generation"].update(maxNewTokens=9000), "exceed the model's context window"),
    (lambda s: (s["generation"].update(maxNewTokens=3),  # new settings: the stored results no longer match
                s["offload"].update(kv={"gpu": 0, "cpu": 0, "disk": 100}), s.update(resources={"kvDisk": "1Ki"})),
     "spec.resources.kvDisk"),
], ids=["bad-field", "prompt-too-long", "kv-over-quota"])
def test_refused_job_leaves_results_untouched(tmp_path, store_root, finished, edit, message):
    """An existing results file (with results of other settings and a partial last line) is left byte for byte
    as it was when the job is refused: at parsing, by the engine's context check, or by the kvDisk quota."""
    job = _job(tmp_path, input={"synthetic": {"count": 2, "promptLength": 8}}, uri="dummy:opt-125m", max_new=2)
    results = tmp_path / "jobdir" / "results.jsonl"
    results.parent.mkdir()
    results.write_bytes(finished + b'{"id": "batch_req_x", "custom_id": "synthetic-1", "respo')
    before = results.read_bytes()
    doc = yaml.safe_load(job.read_text())
    edit(doc["spec"])
    job.write_text(yaml.safe_dump(doc))
    r = _run(job, store_root)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert results.read_bytes() == before
    assert not [p.name for p in (tmp_path / "jobdir").iterdir() if p.name.startswith("results.jsonl.")]


def test_lines_of_an_older_format_are_set_aside_not_trusted(tmp_path, capsys):
    """A line without a fingerprint (kubeflash before fingerprints) is never taken as done: the file is kept as
    .stale at the first new result, the new file holds only new lines. A file that is not results is refused
    with its path and line, and left as it is."""
    from kubeflash_node.engine.results import ResultsFile

    path = tmp_path / "results.jsonl"
    old = json.dumps({"id": "kf-a", "custom_id": "a", "response": {"status_code": 200, "body": {
        "object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "old"}}]}},
        "error": None}) + "\n"
    path.write_text(old)
    results = ResultsFile(path, {"a": "kf_1"}, model="m")
    assert results.done == set() and results.stale == 1 and path.read_text() == old
    results.append("a", "new", chat=False, finish_reason="length", prompt_tokens=2, completion_tokens=1, token_ids=[5])
    results.close()
    [aside] = tmp_path.glob("results.jsonl.*.stale")
    assert aside.read_text() == old and "moved the file to" in capsys.readouterr().err
    [rec] = [json.loads(line) for line in path.read_text().splitlines()]
    assert check_line(rec, chat=False).choices[0].text == "new"
    assert ResultsFile(path, {"a": "kf_1"}, model="m").done == {"a"}

    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(ValueError, match=f"{other}:1: not a kubeflash result line"):
        ResultsFile(other, {"a": "kf_1"}, model="m")
    assert other.read_text() == "hello\n"
