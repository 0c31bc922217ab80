"""Results JSONL in the OpenAI batch output format, keyed by custom_id and a fingerprint of what shaped each answer.

One line per prompt: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}.
The body is a `chat.completion` for chat prompts and a `text_completion` for raw-text and token-id prompts, as
the `openai` package's ChatCompletion / Completion types read them; its `system_fingerprint` is the prompt's
fingerprint (a hash of the job's settings that change outputs and of that prompt's content, `fingerprints()`).
A resumed run keeps a stored line only when its fingerprint matches; a file holding lines from other settings
or prompts is moved aside (results.jsonl.<UTC time>.stale) and a fresh file keeps only the matching lines.
Nothing on disk changes until the first new result is written (or `commit()`): a job refused before it
generates leaves an existing file exactly as it was, a partial last line from a killed run included.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from ..store.format import fsync_dir


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def job_settings(spec, *, manifest, device: str) -> dict:
    """Everything of a job that changes its outputs, beside the prompts: the stored model (source, dtype,
    quantization, config and the checksums of its files), the compute dtype (float32 on CPU, as the engine
    runs it), the generation settings and the KV compression."""
    g = spec.generation
    weights = {name: [f.size, f.sha256] for name, f in manifest.files.items()}
    return {"model": spec.model.uri, "dtype": manifest.dtype, "quantization": spec.model.quantization,
            "config": manifest.config, "weights": _digest(weights),
            "compute": "float32" if device.startswith("cpu") else manifest.dtype,
            "generation": {"maxNewTokens": g.max_new_tokens, "temperature": g.temperature, "topP": g.top_p,
                           "seed": g.seed, "stop": list(g.stop)},
            "compression": spec.offload.compression,
            **({"sparsity": spec.offload.sparsity} if spec.offload.sparsity is not None else {})}


def prompt_content(p) -> dict:
    """What of one prompt changes its answer."""
    return {"messages": [dict(m) for m in p.messages] if p.messages is not None else None, "text": p.text,
            "token_ids": list(p.token_ids) if p.token_ids is not None else None, "max_tokens": p.max_tokens}


def fingerprints(spec, *, manifest, device: str) -> dict[str, str]:
    """custom_id -> the prompt's fingerprint ("kf_" + 24 hex digits of sha256(job settings, prompt content))."""
    job = _digest(job_settings(spec, manifest=manifest, device=device))
    return {p.id: "kf_" + _digest([job, prompt_content(p)])[:24] for p in spec.input.prompts}


def is_chat(p) -> bool:
    """Chat prompts (messages) are answered as chat.completion; raw text and token ids as text_completion."""
    return p.messages is not None


def response_body(text: str, *, chat: bool, model: str, fingerprint: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, token_ids: list[int] | None = None) -> dict:
    """One answer as the OpenAI API returns it (ChatCompletion or Completion); `token_ids` (the generated token
    ids) is kubeflash's own extra key, which the openai types keep as an extra field."""
    choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    body = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if token_ids is not None:
        body["token_ids"] = list(token_ids)
    return body


def batch_line(custom_id: str, body: dict) -> dict:
    """The OpenAI batch output line around one response body."""
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "req_" + uuid.uuid4().hex, "body": body}, "error": None}


def result_text(rec: dict) -> str:
    """The answer's text of a result line, chat or completion."""
    choice = rec["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _fingerprint_of(rec: dict) -> str | None:
    resp = rec.get("response")
    if not isinstance(resp, dict) or resp.get("status_code") != 200 or not isinstance(resp.get("body"), dict):
        return None
    return resp["body"].get("system_fingerprint")


class ResultsFile:
    """Append-only results of one job: reads what `path` holds now, writes nothing before the first append."""

    def __init__(self, path: Path, want: dict[str, str], *, model: str):
        self.path, self.want, self.model = Path(path), want, model
        self.kept: dict[str, bytes] = {}  # custom_id -> its stored line, where the fingerprint matches
        self.kept_tokens = 0  # completion tokens of the kept lines
        self.stale = 0  # stored lines not kept (other settings or prompts, removed prompts, duplicates)
        self.size = 0  # bytes of complete lines (anything after them is a partial line from a killed run)
        self.done: set[str] = set()  # ids with a result for these fingerprints: kept or written by this run
        self.f = None
        if self.path.exists():
            self._scan()

    def _scan(self) -> None:
        data = self.path.read_bytes()
        self.size = data.rfind(b"\n") + 1
        for n, line in enumerate(data[:self.size].splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                cid = rec["custom_id"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a kubeflash result line ({e}); move the file away or "
                                 f"choose another output path (spec.output.path or --output)") from e
            fp = _fingerprint_of(rec)
            if cid in self.want and cid not in self.kept and fp is not None and fp == self.want[cid]:
                self.kept[cid] = line
                self.done.add(cid)
                self.kept_tokens += int(((rec["response"]["body"].get("usage") or {}).get("completion_tokens")) or 0)
            else:
                self.stale += 1

    def commit(self) -> None:
        """Make the file hold only the matching lines and open it for appending: a partial last line is cut off;
        a file with other lines is first kept as <path>.<UTC time>.stale (said on stderr)."""
        if self.f is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.stale:
            self._set_aside()
        elif self.path.exists() and self.path.stat().st_size > self.size:
            with open(self.path, "r+b") as f:
                f.truncate(self.size)
                f.flush()
                os.fsync(f.fileno())
        self.f = open(self.path, "ab")  # noqa: SIM115 (held open across appends, closed by close())

    def _set_aside(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.{stamp}.stale")
        k = 1
        while aside.exists():
            aside, k = self.path.with_name(f"{self.path.name}.{stamp}-{k}.stale"), k + 1
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.writelines(self.kept.values())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(self.path, aside)  # the old lines stay reachable at every moment
        except OSError:  # a file system without hard links: a moment with no results.jsonl (nothing lost)
            os.replace(self.path, aside)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        print(f"kubeflash: {self.path}: {self.stale} stored result(s) were computed for other settings or prompts "
              f"(model, generation, compression, or the prompt itself changed, or the prompt is gone); moved the "
              f"file to {aside}; kept the {len(self.kept)} result(s) that still match", file=sys.stderr)

    def append(self, custom_id: str, text: str, *, chat: bool, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, token_ids: list[int] | None = None) -> None:
        self.commit()
        body = response_body(text, chat=chat, model=self.model, fingerprint=self.want[custom_id],
                             finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, token_ids=token_ids)
        self.f.write((json.dumps(batch_line(custom_id, body), ensure_ascii=False) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.done.add(custom_id)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def read_results(path: Path) -> dict[str, dict]:
    """custom_id -> result record."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["custom_id"]] = rec
    return out
