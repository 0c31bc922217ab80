"""Prefix fingerprints (kubeflash_api.prefixes), the one function the operator and the engine both compute so that
placement can prefer the node whose KV cache holds a job's prefix: prompts that share their first bytes share
exactly the fingerprints of the levels they both reach, and nothing else; a job's set is bounded and ordered by
how many prompts share each one."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from kubeflash_api.inferencejob import Prompt
from kubeflash_api.prefixes import LEVELS, MAX_PER_JOB, PATTERN, canonical, fingerprints, job_fingerprints, level, shared_bytes


def _chat(text: str, i: int = 0) -> Prompt:
    return Prompt(id=str(i), messages=({"role": "system", "content": text}, {"role": "user", "content": f"q{i}"}))


def test_levels_reached_and_hash_of_the_first_bytes():
    doc = "x" * 5000
    fp = fingerprints(Prompt(id="a", text=doc))
    assert [level(f) for f in fp] == [1024, 4096]  # 5,000 bytes reach two levels
    assert fp[0] == "1024-" + hashlib.sha256(doc.encode()[:1024]).hexdigest()[:16]
    assert all(PATTERN.match(f) for f in fp)
    assert fingerprints(Prompt(id="b", text="short")) == ()  # shorter than a block: nothing to reuse
    assert canonical(Prompt(id="c", token_ids=(1, 2, 3))) == b"1,2,3"


@given(st.text(min_size=0, max_size=3000), st.text(max_size=200), st.text(max_size=200))
def test_shared_prefix_shares_exactly_the_levels_both_reach(common, a, b):
    pa, pb = Prompt(id="a", text=common + a), Prompt(id="b", text=common + b)
    ca, cb = canonical(pa), canonical(pb)
    same = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
    want = {n for n in LEVELS if n <= same}
    got = {level(f) for f in set(fingerprints(pa)) & set(fingerprints(pb))}
    assert got == want
    assert shared_bytes(fingerprints(pa), fingerprints(pb)) == max(want, default=0)


def test_job_set_is_bounded_and_most_shared_first():
    doc = "A long shared document. " * 400  # 9,600 bytes: levels 1 KiB and 4 KiB shared by every prompt
    prompts = [_chat(doc, i) for i in range(10)] + [Prompt(id=f"o{i}", text=f"{i:04d}" * 300) for i in range(40)]
    got = job_fingerprints(prompts)
    assert len(got) == MAX_PER_JOB
    shared = set(fingerprints(prompts[0])) & set(fingerprints(prompts[1]))
    assert set(got[:len(shared)]) == shared and level(got[0]) == 4096  # most shared, then the longer level
    assert job_fingerprints(prompts) == got  # deterministic
    assert job_fingerprints([]) == ()


def test_malformed_fingerprints_count_for_nothing():
    assert level("../../etc") == 0 and level("1024-XYZ") == 0 and level("999-" + "a" * 16) == 0
    assert shared_bytes(["2048-" + "a" * 16], ["2048-" + "a" * 16]) == 0  # not a level
