"""Results JSONL (OpenAI batch output format), appended and flushed per finished prompt, resumable.

Re-opening the same file skips prompts already there; a line cut short by a kill is dropped first, so a
run killed half-way and restarted ends with every prompt's result exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class ResultsFile:
    """Append-only results keyed by custom_id."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if self.path.exists():
            self._recover()
        self.f = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial last line from a killed run: cut it off
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.done.add(json.loads(line)["custom_id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a kubeflash result line ({e}); move the file away or "
                                 f"choose another spec.output.path") from e

    def append(self, custom_id: str, text: str, *, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, token_ids: list[int] | None = None) -> None:
        body = {
            "object": "chat.completion", "created": int(time.time()),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if token_ids is not None:
            body["token_ids"] = token_ids
        rec = {"id": f"kf-{custom_id}", "custom_id": custom_id,
               "response": {"status_code": 200, "body": body}, "error": None}
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.done.add(custom_id)

    def close(self) -> None:
        self.f.close()


def read_results(path: Path) -> dict[str, dict]:
    """custom_id -> result record."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["custom_id"]] = rec
    return out
