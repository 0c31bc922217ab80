"""Merging a spec.parallelism job's part files (<path>.part-<k>-of-<N>, one per shard) into one results file on
real files: three engine shard runs merged give the unsharded run's results in input order, token for token, and a
second merge gives the same bytes; parts that are not exactly one result per prompt in its own shard's part (one
missing, a partial last line, a duplicate, a foreign id, a link) are refused naming the file before anything is
written; and a merger killed with SIGKILL at any moment leaves the target as it was or whole, never part-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kubeflash_api import parse_job
from kubeflash_api.sharding import part_path, shard_of
from kubeflash_node.engine.job import run_job
from kubeflash_node.engine.shardmerge import MergeError, merge_parts
from kubeflash_node.store.format import load_manifest


def _spec(shard: dict | None):
    spec = {"model": {"uri": "dummy:opt-125m"}, "input": {"synthetic": {"count": 9, "promptLength": 5}},
            "generation": {"maxNewTokens": 2}}
    if shard is not None:
        spec["shard"] = shard
    return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "m"},
                      "spec": spec})


def _tokens(path) -> list[tuple[str, list[int]]]:
    return [(r["custom_id"], r["response"]["body"]["token_ids"])
            for r in map(json.loads, path.read_text().splitlines())]


def test_three_engine_shards_merge_into_the_unsharded_results_in_input_order(opt_store, tmp_path):
    manifest = load_manifest(opt_store)
    run_job(_spec(None), model_dir=opt_store, manifest=manifest, output=tmp_path / "whole.jsonl",
            job_dir=tmp_path / "w")
    for k in range(3):
        run_job(_spec({"index": k, "count": 3}), model_dir=opt_store, manifest=manifest,
                output=tmp_path / "out" / part_path("results.jsonl", k, 3), job_dir=tmp_path / f"s{k}")
    order = [p.id for p in _spec(None).input.prompts]
    merged = merge_parts(tmp_path / "out", "results.jsonl", 3, order)
    got = _tokens(tmp_path / "out" / "results.jsonl")
    assert [cid for cid, _ in got] == order and merged.lines == 9
    assert got == sorted(_tokens(tmp_path / "whole.jsonl"), key=lambda t: order.index(t[0]))
    first = (tmp_path / "out" / "results.jsonl").read_bytes()
    merge_parts(tmp_path / "out", "results.jsonl", 3, order)
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == first  # deterministic: a retried merge, same bytes
    assert len(first) == merged.bytes and not list((tmp_path / "out").glob(".*.tmp"))


def _write_parts(root, count: int, ids: list[str], pad: int = 10) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        mine = [cid for cid in reversed(ids) if shard_of(cid, count) == k]  # not in input order on purpose
        text = "".join(json.dumps({"custom_id": cid, "response": {"text": "z" * pad}}) + "\n" for cid in mine)
        (root / part_path("r.jsonl", k, count)).write_text(text)


IDS = [f"q-{i}" for i in range(30)]


@pytest.mark.parametrize("damage, expect", [
    ("missing", r"r\.jsonl\.part-1-of-3: does not exist"),
    ("partial", r"part-2-of-3: ends in a partial line"),
    ("duplicate", r"part-0-of-3:\d+: custom_id 'q-\d+' comes twice"),
    ("foreign", r"part-0-of-3:\d+: custom_id 'nobody' is not one of the job's prompts"),
    ("wrong shard", r"part-1-of-3:\d+: custom_id 'q-\d+' belongs to shard 0, not 1"),
    ("link", r"part-0-of-3: cannot be opened"),
    ("absent line", r"1 of 30 prompts have no result"),
])
def test_bad_parts_are_refused_naming_the_file_and_the_target_is_untouched(tmp_path, damage, expect):
    root = tmp_path / "claim"
    _write_parts(root, 3, IDS)
    (root / "r.jsonl").write_text("the old results\n")
    part = {k: root / part_path("r.jsonl", k, 3) for k in range(3)}
    zero = part[0].read_text().splitlines(keepends=True)
    if damage == "missing":
        part[1].unlink()
    elif damage == "partial":
        part[2].write_text(part[2].read_text()[:-5])
    elif damage == "duplicate":
        part[0].write_text("".join(zero + zero[:1]))
    elif damage == "foreign":
        part[0].write_text("".join(zero) + json.dumps({"custom_id": "nobody"}) + "\n")
    elif damage == "wrong shard":
        part[1].write_text(part[1].read_text() + zero[0])
        part[0].write_text("".join(zero[1:]))
    elif damage == "link":
        (root / "elsewhere").write_text(part[0].read_text())
        part[0].unlink()
        part[0].symlink_to(root / "elsewhere")
    else:
        part[0].write_text("".join(zero[1:]))
    with pytest.raises(MergeError, match=expect):
        merge_parts(root, "r.jsonl", 3, IDS)
    assert (root / "r.jsonl").read_text() == "the old results\n" and not list(root.glob(".*.tmp"))


MERGER = """
import sys
from pathlib import Path
from kubeflash_node.engine.shardmerge import merge_parts
ids = [f"q-{i}" for i in range(int(sys.argv[2]))]
print("go", flush=True)
while True:
    merge_parts(Path(sys.argv[1]), "r.jsonl", 4, ids)
"""


def test_a_merger_killed_at_any_moment_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    root, n = tmp_path / "claim", 20000
    ids = [f"q-{i}" for i in range(n)]
    _write_parts(root, 4, ids, pad=400)  # about 8 MB: a merge takes a while, the kill lands inside one
    merge_parts(root, "r.jsonl", 4, ids)
    whole = (root / "r.jsonl").read_bytes()
    old = b"the old results\n"
    for delay in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        (root / "r.jsonl").write_bytes(old)
        proc = subprocess.Popen([sys.executable, "-c", MERGER, str(root), str(n)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stdout.readline() == b"go\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (root / "r.jsonl").read_bytes() in (old, whole), delay
    for tmp in root.glob(".*.tmp"):  # a killed merger may leave its temp file; it is never the target
        tmp.unlink()


def test_kubeflash_merge_as_the_merge_pod_runs_it(tmp_path):
    """The merge pod's command with the env the operator gives it: the parent's canonical spec, the claim's root."""
    from kubeflash_api import parse_job_spec, to_canonical

    parent = parse_job_spec({"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["q"] * 30},
                             "parallelism": 3, "output": {"pvc": {"claimName": "c"}, "path": "r.jsonl"}},
                            name="big", namespace="ns")
    ids = [p.id for p in parent.input.prompts]
    _write_parts(tmp_path, 3, ids)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "KUBEFLASH_JOB_NAME": "big",
           "KUBEFLASH_JOB_SPEC": json.dumps(to_canonical(parent)), "KUBEFLASH_OUTPUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-c", "import sys; from kubeflash_node.cli import main; sys.exit(main())", "merge"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ids
    (tmp_path / "r.jsonl.part-2-of-3").unlink()
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "r.jsonl.part-2-of-3: does not exist" in failed.stderr
