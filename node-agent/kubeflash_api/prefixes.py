"""Prefix fingerprints: what the operator and the node's KV cache both compute from a job's prompts, so that
placement can prefer the node whose cache already holds a job's prefix without the operator tokenizing anything.

The node cache is keyed by token blocks (store.kvblocks: 256 tokens a block, chained from the parent block).
The operator has no tokenizer, so the two sides meet on the prompt's text instead: a fingerprint is a hash of the
first L bytes of a prompt's canonical text, for L in LEVELS. Two prompts that start with the same 4 KiB of text
(a shared document, a long system prompt) share the 1 KiB and 4 KiB fingerprints, and their first token blocks,
because the same text tokenizes the same. The smallest level is about one block of English text (~4 bytes a
token): a prompt shorter than that has no full block to reuse, so it has no fingerprint either.

The engine leaves the fingerprints of the prompts whose blocks it wrote or read in the node cache's usage record;
the agent publishes the most recent few per (disk, namespace, model) in FlashNode status.kvCache.entries[].prefixes;
the operator scores a disk by the longest level its entry shares with the job's own fingerprints.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

from .inferencejob import Prompt

LEVELS = (1 << 10, 1 << 12, 1 << 14, 1 << 16)  # bytes of canonical text: ~1, 4, 16 and 64 token blocks
MAX_PER_JOB = 16  # fingerprints one job leaves in a usage record (its most shared, longest first)
MAX_PER_ENTRY = 8  # fingerprints the agent publishes per cache entry (the most recent jobs' first)
SAMPLE = 64  # prompts of a job whose fingerprints are computed (its first ones; batches repeat their prefix)
PATTERN = re.compile(r"^(1024|4096|16384|65536)-[0-9a-f]{16}$")  # a well-formed fingerprint (hostile input check)


def canonical(prompt: Prompt) -> bytes:
    """The bytes a prompt's fingerprints hash: chat turns as "role\\ncontent\\n", a completion's text, or the
    token ids of a synthetic prompt."""
    if prompt.messages is not None:
        return "".join(f"{m.get('role', '')}\n{m.get('content', '')}\n" for m in prompt.messages).encode()
    if prompt.text is not None:
        return prompt.text.encode()
    return ",".join(str(t) for t in prompt.token_ids or ()).encode()


def fingerprints(prompt: Prompt) -> tuple[str, ...]:
    """"<level>-<16 hex>" for every level the prompt's canonical text is at least as long as, shortest first."""
    data = canonical(prompt)
    return tuple(f"{n}-{hashlib.sha256(data[:n]).hexdigest()[:16]}" for n in LEVELS if len(data) >= n)


def job_fingerprints(prompts: Iterable[Prompt], limit: int = MAX_PER_JOB) -> tuple[str, ...]:
    """A job's fingerprints, at most `limit`, from its first SAMPLE prompts: the ones most prompts share first
    (a shared document), then the longer level, then the hash (so the choice is deterministic)."""
    counts: Counter[str] = Counter()
    for i, p in enumerate(prompts):
        if i >= SAMPLE:
            break
        counts.update(fingerprints(p))
    return tuple(sorted(counts, key=lambda f: (-counts[f], -level(f), f))[:limit])


def level(fingerprint: str) -> int:
    """The number of text bytes a fingerprint covers (0 for a malformed one)."""
    head = fingerprint.split("-", 1)[0]
    return int(head) if head.isdigit() and PATTERN.match(fingerprint) else 0


def shared_bytes(mine: Iterable[str], theirs: Iterable[str]) -> int:
    """The longest level two sets of fingerprints share: 0 when none."""
    return max((level(f) for f in set(mine) & set(theirs)), default=0)
