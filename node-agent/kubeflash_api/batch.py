"""The OpenAI batch input format (one request a line) -> Prompts; every refusal names the file, line and field.

A line: {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
(without `url`, a body with `prompt` is a completion and one with `messages` a chat).
Chat bodies carry `messages` ({role, content}; content a string or a list of text parts), completion bodies a
string `prompt`. `max_tokens` (or `max_completion_tokens`) bounds that line's answer; `model` is informational.
Settings the job fixes for every line (temperature, top_p, seed, stop, n) are refused by name, so nobody is
surprised that a line's own temperature was ignored.
"""

from __future__ import annotations

from pathlib import Path

from kubeflash_api.errors import SpecError, child, show
from kubeflash_api.files import MAX_BATCH_BYTES, json_object, read_text
from kubeflash_api.inferencejob import MAX_PROMPTS, MAX_TOKENS, Prompt

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
ROLES = ("system", "developer", "user", "assistant")
_BODY_KEYS = {"chat": {"messages", "max_tokens", "max_completion_tokens", "model"},
              "completion": {"prompt", "max_tokens", "model"}}
_JOB_WIDE = {"temperature": "temperature", "top_p": "topP", "seed": "seed", "stop": "stop", "n": None}
MAX_ID = 512


def parse_line(text: str, where: str) -> Prompt:
    """One request line -> Prompt; `where` is `<file>:<line>`."""
    req = json_object(text, where)
    for key in req:
        if key not in ("custom_id", "method", "url", "body"):
            raise SpecError(f"{where}: {key}", "is not a field of a batch request (custom_id, method, url, body)")
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid.strip() or len(cid) > MAX_ID:
        raise SpecError(f"{where}: custom_id", f"must be a non-empty string of at most {MAX_ID} characters, "
                                               f"got {show(cid)}")
    if req.get("method", "POST") != "POST":
        raise SpecError(f"{where}: method", f"must be POST, got {show(req.get('method'))}")
    body = req.get("body")
    if not isinstance(body, dict):
        raise SpecError(f"{where}: body", "is required: an object with messages (chat) or prompt (completions)")
    url = req.get("url")
    if url is None:  # OpenAI requires it; without one the body's shape says which endpoint was meant
        url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    if not isinstance(url, str) or url not in URLS:
        raise SpecError(f"{where}: url", f"must be one of {', '.join(URLS)}, got {show(url)}")
    kind = URLS[url]
    for key in body:
        if key in _JOB_WIDE:
            spec = _JOB_WIDE[key]
            hint = f"set spec.generation.{spec} for the whole job" if spec else "one answer per request is made"
            raise SpecError(child(f"{where}: body", key), f"cannot differ per request; {hint}")
        if key not in _BODY_KEYS[kind]:
            raise SpecError(child(f"{where}: body", key), f"is not supported for {url} (supported: "
                                                    f"{', '.join(sorted(_BODY_KEYS[kind]))})")
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= MAX_TOKENS):
        raise SpecError(f"{where}: body.max_tokens", f"must be an integer from 1 to {MAX_TOKENS}, got {show(mt)}")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise SpecError(f"{where}: body.model", f"must be a string, got {show(body['model'])}")
    if kind == "completion":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise SpecError(f"{where}: body.prompt", f"must be a non-empty string for {url}, got {_short(prompt)}")
        return Prompt(id=cid, text=prompt, max_tokens=mt)
    return Prompt(id=cid, messages=_messages(body.get("messages"), f"{where}: body.messages"), max_tokens=mt)


def _messages(msgs: object, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(msgs, list) or not msgs:
        raise SpecError(where, f"must be a non-empty list of {{role, content}} objects, got {_short(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise SpecError(at, f"must be an object with role and content, got {_short(m)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise SpecError(child(at, sorted(extra)[0]), "is not supported (role, content, name)")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise SpecError(f"{at}.name", f"must be a string, got {_short(m['name'])}")
        if m.get("role") not in ROLES:
            raise SpecError(f"{at}.role", f"must be one of {', '.join(ROLES)}, got {_short(m.get('role'))}")
        out.append({"role": m["role"], "content": _content(m.get("content"), f"{at}.content")})
    return tuple(out)


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) <= {"type", "text"}):
                raise SpecError(f"{where}[{i}]", f"must be a text part {{type: text, text: …}}, got {_short(part)}")
            parts.append(part["text"])
        return "".join(parts)
    raise SpecError(where, f"must be a string or a list of text parts, got {_short(content)}")


def _short(v: object) -> str:
    return show(v)


def parse_batch(text: str, name: str) -> tuple[Prompt, ...]:
    """Every request of a batch file's text; custom_ids must be unique."""
    prompts, seen = [], {}
    # JSONL lines end at "\n" only: str.splitlines() would also break at U+2028, U+0085 and friends, which a JSON
    # string may hold unescaped, and would number lines differently from every editor
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        p = parse_line(line, f"{name}:{n}")
        if p.id in seen:
            raise SpecError(f"{name}:{n}: custom_id", f"{p.id!r} is used twice (first on line {seen[p.id]}); "
                                                      f"custom_ids must be unique")
        seen[p.id] = n
        prompts.append(p)
        if len(prompts) > MAX_PROMPTS:
            raise SpecError(name, f"holds more than {MAX_PROMPTS} requests; split the batch into several jobs")
    if not prompts:
        raise SpecError(name, "holds no requests")
    return tuple(prompts)


def read_batch(path: Path, *, field: str = "spec.input.file") -> tuple[Prompt, ...]:
    """A batch file's requests; errors name the file (and `field`, which named it) and the line."""
    try:
        text = read_text(path, what="a JSONL batch in the OpenAI batch format", limit=MAX_BATCH_BYTES)
    except SpecError as e:
        raise SpecError(f"{field}: {e.path}", e.problem) from None
    return parse_batch(text, str(path))
