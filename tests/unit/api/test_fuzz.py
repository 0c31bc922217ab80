"""Property-based fuzzing of the one InferenceJob parser, as an outsider would attack it.

(a) Random valid manifests, drawn from a strategy that follows the schema in kubeflash_api.inferencejob, parse;
    the operator's path (parse_job_spec) gives the same JobSpec as kubeflash run's (parse_job); what the operator
    hands the pod (to_canonical, through JSON) reads back as an equal JobSpec; written as YAML they load back.
(b) Random mutations of valid manifests (wrong types at any depth, NaN/inf, huge integers, unknown keys at every
    level, deleted keys, random unicode, nested junk) either parse or raise SpecError whose path is non-empty and
    names a place that exists in the mutated manifest (or a missing key of a mapping that exists): never any
    other exception.
(c) The same for batch lines (kubeflash_api.batch.parse_line) and quantities (kubeflash_api.quantity); any path
    the parser takes for spec.output.path or spec.input.file names a file that stays in its root.
(d) Random bytes as a manifest file: SpecError naming the file, or a mapping.
Derandomized and database-less, so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeflash_api import JobSpec, SpecError, from_canonical, parse_job, parse_job_spec, to_canonical
from kubeflash_api.batch import parse_line
from kubeflash_api.contract import API_VERSION
from kubeflash_api.errors import show
from kubeflash_api.files import load_manifest
from kubeflash_api.inferencejob import MAX_PARALLELISM, MAX_SPARSITY
from kubeflash_api.quantity import MAX_BYTES, PATTERN, parse_quantity

FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=60)

# ------------------------------------------------------------------------------------ valid manifests


def _text(min_size=1, max_size=30):
    """Any Unicode text a YAML or JSON file can carry: no NUL, no lone surrogates."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=min_size,
                   max_size=max_size)


LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
SUBDOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(".".join)
SEGMENT = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", fullmatch=True).filter(lambda s: s not in (".", ".."))
RELATIVE = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)
URI = st.one_of(
    st.from_regex(r"builtin:[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True),
    st.from_regex(r"dummy:[A-Za-z0-9][A-Za-z0-9._-]{0,15}(@[a-z]{1,6})?", fullmatch=True),
    st.from_regex(r"https?://[a-z0-9.-]{1,20}(/[A-Za-z0-9._~/-]{0,20})?", fullmatch=True),
    st.lists(SEGMENT, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
SUFFIXES = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
            "T": 10**12, "e0": 1, "e3": 10**3, "E6": 10**6, "e+2": 100, "P": 10**15, "Pi": 2**50, "E": 10**18,
            "Ei": 2**60}
QUANTITY = st.one_of(st.integers(1, 2**50),
                     st.builds(lambda n, s: f"{n}{s}", st.integers(1, 4096),
                               st.sampled_from(sorted(set(SUFFIXES) - {"P", "Pi", "E", "Ei"}))),
                     st.sampled_from(["1E", "1Ei", "0.5E", "1P", "3Pi", "1023Pi", "+5G", ".5Gi", "1."]),
                     st.builds(lambda n, f, s: f"{n}.{f}{s}", st.integers(0, 999), st.integers(1, 99),
                               st.sampled_from(["Gi", "Mi", "G"])))


def _split(draw, *, one_tier: bool = False) -> dict:
    if one_tier:
        tier = draw(st.sampled_from(["gpu", "cpu", "disk"]))
        values = {t: 100 if t == tier else 0 for t in ("gpu", "cpu", "disk")}
    else:
        a = draw(st.integers(0, 100))
        b = draw(st.integers(0, 100 - a))
        values = dict(zip(("gpu", "cpu", "disk"), draw(st.permutations([a, b, 100 - a - b])), strict=True))
    # zeros may be left out (their default is 0)
    return {k: v for k, v in values.items() if v or draw(st.booleans())}


@st.composite
def offload(draw) -> dict:
    out = draw(st.fixed_dictionaries({}, optional={
        "gpuBatchSize": st.integers(1, 4096), "numGpuBatches": st.integers(1, 1024), "xCache": st.booleans(),
        "compression": st.sampled_from(["none", "int8", "int4"]),
        "sparsity": st.one_of(st.just("off"), st.just(False), st.floats(0, MAX_SPARSITY), st.just(0)),
        "expertCache": st.one_of(st.just("auto"), st.just(0), QUANTITY),
        "expertPrefetch": st.sampled_from(["auto", "on", "off", True, False])}))
    if draw(st.booleans()):
        out["tensorParallel"] = draw(st.integers(1, 8))
        if out["tensorParallel"] > 1 and draw(st.booleans()):
            out["reduce"] = draw(st.sampled_from(["auto", "ring"]))
    if draw(st.booleans()):
        out["policy"] = "explicit"
        out["weights"] = _split(draw)
        out["kv"] = _split(draw, one_tier=True)
        if draw(st.booleans()):
            out["activations"] = _split(draw)
        kv_tier = max(out["kv"], key=out["kv"].get)
        if kv_tier == "disk" and draw(st.booleans()):
            out["kvWriteBack"] = True
        if kv_tier == "cpu" and draw(st.booleans()):
            out["cpuAttention"] = True
    else:
        if draw(st.booleans()):
            out["policy"] = "auto"
        out.update(draw(st.fixed_dictionaries({}, optional={"kvWriteBack": st.booleans(),
                                                             "cpuAttention": st.booleans()})))
    return out


INPUT = st.one_of(
    st.fixed_dictionaries({"prompts": st.lists(_text(), min_size=1, max_size=4)}),
    st.fixed_dictionaries({"file": RELATIVE}, optional={"pvc": st.fixed_dictionaries({"claimName": SUBDOMAIN})}),
    st.fixed_dictionaries({"configMap": st.fixed_dictionaries(
        {"name": SUBDOMAIN, "key": st.from_regex(r"[-_a-zA-Z0-9][-._a-zA-Z0-9]{0,20}", fullmatch=True)})}),
    st.fixed_dictionaries({"synthetic": st.fixed_dictionaries({}, optional={
        "count": st.integers(1, 8), "promptLength": st.integers(1, 64)})}),
)
GENERATION = st.fixed_dictionaries({}, optional={
    "maxNewTokens": st.integers(1, 32768),
    "temperature": st.one_of(st.floats(0, 100), st.integers(0, 100)),
    "topP": st.one_of(st.floats(0, 1, exclude_min=True), st.just(1)),
    "seed": st.integers(0, 2**53 - 1),
    "stop": st.lists(_text(), max_size=16),
})
RESOURCES = st.fixed_dictionaries({}, optional={
    "gpus": st.integers(1, 8), "gpuMemory": QUANTITY, "cpuMemory": QUANTITY, "kvDisk": QUANTITY})
OUTPUT = st.one_of(
    st.fixed_dictionaries({}, optional={"path": RELATIVE, "pvc": st.fixed_dictionaries({"claimName": SUBDOMAIN})}),
    st.fixed_dictionaries({"configMap": st.fixed_dictionaries({"name": SUBDOMAIN})}, optional={"path": RELATIVE}),
)
MODEL = st.fixed_dictionaries({"uri": URI}, optional={
    "dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
    "quantization": st.sampled_from(["none", "int8", "int4"])})
SPEC = st.fixed_dictionaries({"model": MODEL, "input": INPUT}, optional={
    "generation": GENERATION, "resources": RESOURCES, "offload": offload(), "output": OUTPUT,
    "backoffLimit": st.integers(0, 20), "image": _text(max_size=60),
    "cache": st.fixed_dictionaries({}, optional={"prefix": st.booleans()}),
    "parallelism": st.integers(1, MAX_PARALLELISM)})
METADATA = st.fixed_dictionaries({"name": st.from_regex(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?", fullmatch=True)},
                                 optional={"namespace": LABEL,
                                           "labels": st.dictionaries(SEGMENT, _text(0, 20), max_size=3)})
MANIFEST = st.fixed_dictionaries({"apiVersion": st.just(API_VERSION), "kind": st.just("InferenceJob"),
                                  "metadata": METADATA, "spec": SPEC})


def _round_trips(job: JobSpec) -> None:
    canon = to_canonical(job)
    wire = json.loads(json.dumps(canon))  # the pod gets it through an environment variable as JSON
    back = from_canonical(wire, name=job.name, namespace=job.namespace)
    assert back == job
    assert to_canonical(back) == canon


@FUZZ
@given(MANIFEST)
def test_valid_manifests_parse_and_round_trip(doc):
    """Every manifest the schema allows parses; both entry points agree; the canonical form reads back equal."""
    job = parse_job(doc)
    raw = doc["spec"]
    assert (job.name, job.namespace) == (doc["metadata"]["name"], doc["metadata"].get("namespace", "default"))
    assert job == parse_job_spec(raw, name=job.name, namespace=job.namespace)
    assert job.model.uri == raw["model"]["uri"]
    gen = raw.get("generation", {})
    assert job.generation.seed == gen.get("seed", 0)
    assert job.generation.stop == tuple(gen.get("stop", ()))
    assert job.generation.temperature == float(gen.get("temperature", 0))
    if "prompts" in raw["input"]:
        assert [p.messages[0]["content"] for p in job.input.prompts] == raw["input"]["prompts"]
    if "kvDisk" in raw.get("resources", {}):
        assert job.resources.kv_disk == _bytes(raw["resources"]["kvDisk"])
    assert job.output.path == raw.get("output", {}).get("path")
    off = raw.get("offload", {})
    assert job.offload.tensor_parallel == off.get("tensorParallel", 1)
    assert job.offload.expert_prefetch == {True: "on", False: "off"}.get(off.get("expertPrefetch"),
                                                                         off.get("expertPrefetch", "auto"))
    assert job.parallelism == raw.get("parallelism", 1)
    assert job.cache.prefix == raw.get("cache", {}).get("prefix", job.cache.prefix)
    _round_trips(job)


@FEW
@given(MANIFEST)
def test_valid_manifests_survive_a_yaml_file(doc):
    """Written with yaml.safe_dump, a valid manifest loads back from the file unchanged (load_manifest)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        assert load_manifest(path) == doc
        assert parse_job(load_manifest(path)) == parse_job(doc)


def _bytes(q) -> int:
    """An independent reading of the quantities QUANTITY draws (exact fractions, rounded up)."""
    if isinstance(q, int):
        return q
    m = re.fullmatch(r"(\+?[0-9.]+)(.*)", q)
    return math.ceil(Fraction(m[1]) * SUFFIXES[m[2]])


@FUZZ
@given(QUANTITY)
def test_valid_quantities_are_read_exactly(q):
    """10Gi, 1.5G, 4096, 3e3: the bytes they mean, rounded up to a whole byte."""
    assert parse_quantity(q, path="spec.resources.kvDisk") == _bytes(q)


# ------------------------------------------------------------------------------------------ mutations

# (integers past Python's 4300-digit str() limit are tried in test_integers_too_long_to_print: hypothesis itself
# cannot print them)
HUGE = st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 10**400, 10**4200, -(10**4200)])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), HUGE, st.floats(), st.sampled_from([math.nan, math.inf,
                   -math.inf, 1e308, -0.0, 5e-324]), st.text(max_size=30), _text(), st.binary(max_size=8),
                   st.sampled_from(["", " ", "..", "../../etc/passwd", "/abs", "a\nb", "10Gi", "1e999", "NaN",
                                    "\ud800", "x\0y", "builtin:smollm2-135m", "spec", "é" * 70]))
JUNK = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4)),
    max_leaves=12)
KEY = st.one_of(st.text(max_size=12), st.sampled_from(["", ".", "a.b", "spec", "status", "kind", "name",
                                                       "apiVersion", "model", "x[0]", "'q'"]),
                st.integers(), st.booleans(), st.none())


def _places(doc, path=()) -> list[tuple]:
    """Every (container path, key) in a nested dict/list, the root's own keys included."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append((*path, k))
        out += _places(v, (*path, k))
    return out


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw, base):
    """A valid document with one to three random mutations applied."""
    doc = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        places = _places(doc)
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap", "replace"]))
        if op == "add":
            containers = [()] + [p for p in places if isinstance(_get(doc, p), dict)]
            target = _get(doc, draw(st.sampled_from(containers)))
            target[draw(KEY)] = draw(JUNK)
            continue
        if not places:
            continue
        *parent, key = draw(st.sampled_from(places))
        holder = _get(doc, parent)
        if op == "delete":
            if isinstance(holder, dict):
                del holder[key]
            else:
                holder.pop(key)
        elif op == "wrap":
            holder[key] = draw(st.sampled_from([lambda v: [v], lambda v: {"value": v}, lambda v: str(v)[:50]]))(
                holder[key])
        else:
            holder[key] = draw(JUNK)
    return doc


_TOKEN = re.compile(r"\.?([A-Za-z0-9_-]+)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|\[(\w+ [^\]]*)\]")


def _tokens(path: str) -> list:
    out, pos = [], 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        assert m and m.end() > pos, f"error path {path!r} does not parse at {path[pos:]!r}"
        word, index, quoted, shown = m.groups()
        out.append(word if word is not None else int(index) if index is not None else
                   eval(quoted) if quoted is not None else ("shown", shown))  # noqa: S307 (a repr of a str)
        pos = m.end()
    return out


def _locates(doc, path: str) -> bool:
    """The path leads through doc to a value, or to missing keys under a mapping (or a null) that exists."""
    if path == "manifest":
        return not isinstance(doc, Mapping)
    cur = doc
    tokens = _tokens(path)
    for i, tok in enumerate(tokens):
        if cur is None:  # `key:` with nothing after it counts as absent; its required fields are named
            return True
        if isinstance(tok, tuple):  # a non-string key, named by its type and value
            matches = [k for k in cur if not isinstance(k, str) and show(k) == tok[1]] if isinstance(
                cur, Mapping) else []
            if not matches:
                return False
            tok = matches[0]
        if isinstance(cur, Mapping):
            if tok not in cur:  # a missing required field (of a section that may itself be missing)
                return all(isinstance(t, str) for t in tokens[i:])
            cur = cur[tok]
        elif isinstance(cur, list) and isinstance(tok, int):
            if tok >= len(cur):
                return False
            cur = cur[tok]
        else:
            return False
    return True


def _check(doc) -> None:
    """parse_job gives a JobSpec or a SpecError at a real place; the operator's parse_job_spec agrees either way."""
    try:
        job = parse_job(doc)
    except SpecError as e:
        assert e.path, f"SpecError without a path: {e}"
        assert str(e).startswith(e.path)
        assert _locates(doc, e.path), f"{e.path!r} names no place in the manifest ({e})"
        if e.path.startswith(("spec.", "spec[")):  # the manifest's fault is in spec: the operator names it too
            with pytest.raises(SpecError) as op:
                parse_job_spec(doc["spec"], name="j", namespace="default")
            assert op.value.path == e.path
        return
    assert parse_job_spec(doc["spec"], name=job.name, namespace=job.namespace) == job
    _round_trips(job)


@FUZZ
@given(mutated(MANIFEST))
def test_mutated_manifests_parse_or_name_a_real_field(doc):
    """Any damage to a valid manifest gives a JobSpec or a SpecError naming a place in it, nothing else."""
    _check(doc)


@FEW
@given(JUNK)
def test_junk_documents_are_refused_by_path(doc):
    """A document that is not an InferenceJob at all (a list, a number, random nested junk) is a SpecError."""
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert err.value.path and _locates(doc, err.value.path)


@FEW
@given(MANIFEST, st.sampled_from(["spec", "metadata", "spec.model", "spec.input", "spec.generation",
                                  "spec.offload", "spec.resources", "spec.output", "metadata.labels", "spec.cache",
                                  "spec.parallelism", "spec.shard"]), JUNK)
def test_junk_as_a_whole_section(doc, section, junk):
    """Random junk in place of a whole section never escapes as another exception."""
    *parents, last = section.split(".")
    _get(doc, parents)[last] = junk
    _check(doc)


# -------------------------------------------------------------------------------------- batch lines

VALID_LINE = st.fixed_dictionaries(
    {"custom_id": _text(max_size=20).filter(str.strip), "body": st.one_of(
        st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": _text(0, 30)}),
            min_size=1, max_size=3)}, optional={"max_tokens": st.integers(1, 32768), "model": _text()}),
        st.fixed_dictionaries({"prompt": _text()}, optional={"max_tokens": st.integers(1, 32768)}))},
    optional={"method": st.just("POST")})


def _with_url(line: dict) -> dict:
    url = "/v1/completions" if "prompt" in line["body"] else "/v1/chat/completions"
    return {**line, "url": url}


@FUZZ
@given(VALID_LINE, st.booleans())
def test_valid_batch_lines_parse(line, with_url):
    """A request in the OpenAI batch format becomes the Prompt it describes (url optional: the body says)."""
    line = _with_url(line) if with_url else line
    p = parse_line(json.dumps(line, ensure_ascii=bool(len(line["custom_id"]) % 2)), "b.jsonl:3")
    body = line["body"]
    assert p.id == line["custom_id"] and p.max_tokens == body.get("max_tokens")
    if "prompt" in body:
        assert p.kind == "completion" and p.text == body["prompt"]
    else:
        assert p.kind == "chat" and list(p.messages) == body["messages"]


def _check_line(text: str) -> None:
    try:
        parse_line(text, "b.jsonl:3")
    except SpecError as e:
        assert e.path.startswith("b.jsonl:3"), e.path
        assert str(e).startswith(e.path)


def _dumps(value) -> str:
    try:
        return json.dumps(value, allow_nan=True, default=repr)  # bytes drawn as junk become strings
    except ValueError:  # an integer json cannot write; its digits are still a line to read
        return "[" + "9" * 5000 + "]"


@FUZZ
@given(mutated(VALID_LINE.map(_with_url)))
def test_mutated_batch_lines_parse_or_are_refused_by_line(line):
    """Damaged batch lines (wrong types, NaN, unknown keys, deleted keys) give a Prompt or a SpecError naming
    the file and line."""
    _check_line(_dumps(line))


@FUZZ
@given(st.one_of(JUNK.map(_dumps), st.text(max_size=80), st.sampled_from([
    '{"a": 1, "a": 2}', '{"custom_id": "x", "body": {"prompt": "p"}, "url": []}', "NaN", '{"x": Infinity}',
    '{"x": 1e999}', '{"custom_id": "\\ud800", "body": {"prompt": "p"}}', "[" * 100000, '{"x": ' + "9" * 5000 + "}",
    '{"custom_id": "x", "body": {"messages": [{"role": "user", "content": [{"type": "image"}]}]}}'])))
def test_random_batch_lines_are_refused_by_line(text):
    """Any text as a batch line: a Prompt or a SpecError naming the file and line."""
    _check_line(text)


# -------------------------------------------------------------------------------------------- quantities


@FUZZ
@given(st.one_of(st.text(max_size=70), st.from_regex(r"\s*\+?[0-9]{0,70}(\.[0-9]{0,5})?([KMGTPE]i?|[eE][+-]?[0-9]{1,70})?\s*",
                                                     fullmatch=True),
                 st.integers(), HUGE, st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)))
def test_any_quantity_is_bytes_in_range_or_refused_by_path(value):
    """Strings, integers of any size, floats, NaN: whole bytes within the bounds, or a SpecError naming the field."""
    try:
        n = parse_quantity(value, path="spec.resources.gpuMemory", lo=1)
    except SpecError as e:
        assert e.path == "spec.resources.gpuMemory"
        return
    assert isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_BYTES


@pytest.mark.parametrize("where", ["spec.generation.seed", "spec.generation.temperature", "spec.resources.kvDisk",
                                   "spec.model.uri", "spec.input.prompts", "metadata.name", "apiVersion",
                                   "metadata.generation", "spec.offload.weights.gpu"])
def test_integers_too_long_to_print(where):
    """An integer of 5000 digits (more than str() may print) anywhere is a SpecError naming the field."""
    doc = {"apiVersion": API_VERSION, "kind": "InferenceJob", "metadata": {"name": "j"},
           "spec": {"model": {"uri": "builtin:x"}, "input": {"prompts": ["hi"]},
                    "offload": {"policy": "explicit", "weights": {"disk": 100}, "kv": {"disk": 100}}}}
    *parents, last = where.split(".")
    holder = doc
    for k in parents:
        holder = holder.setdefault(k, {})
    holder[last] = -(10**5000)
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert err.value.path == where
    assert "5001 digits" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_quantity(10**5000, path="q")
    assert err.value.path == "q"


def _crd_accepts(text: str) -> bool:
    """The CRD's pattern as the API server applies it: a Go regexp search, where `$` means the end of the text."""
    return re.search(PATTERN.replace("$", r"\Z"), text) is not None


@FUZZ
@given(st.one_of(st.from_regex(r"\s?\+?[0-9]{0,30}(\.[0-9]{0,5})?([KMGTPE]i?|[kmu]|[eE][+-]?[0-9]{1,3})?\s?",
                               fullmatch=True), st.text(st.sampled_from("0123456789.+-eEKMGTPik \n\t"), max_size=12)))
def test_quantity_strings_agree_with_the_crd_pattern(text):
    """A quantity string is taken by parse_quantity exactly when the CRD's pattern lets the API server take it
    (range aside), so kubeflash run and kubectl apply accept the same strings."""
    try:
        parse_quantity(text, path="q", lo=0, hi=2**200)
        parsed = True
    except SpecError as e:
        parsed = "must be at most" in e.problem
    assert parsed == _crd_accepts(text), text


@FUZZ
@given(st.one_of(st.text(max_size=40), st.text(st.sampled_from("ab./\\\n\t\0é"), max_size=12),
                 st.lists(st.sampled_from(["a", ".", "..", "", "x" * 255, "é" * 128, "b.jsonl"]), min_size=1,
                          max_size=4).map("/".join)))
@pytest.mark.parametrize("field", ["spec.output.path", "spec.input.file"])
def test_any_accepted_path_names_a_file_inside_its_root(field, text):
    """spec.output.path and spec.input.file: whatever the parser takes names a file (no trailing '/'), with no
    control character, no part a file system refuses (over 255 bytes) and no way out of its root; all else is a
    SpecError naming the field (the run used to write 'out/' as a file, a newline into a file name, and fail on
    a 300-character name only after the model was converted)."""
    section, key = field.split(".")[1:]
    doc = {"apiVersion": API_VERSION, "kind": "InferenceJob", "metadata": {"name": "j"},
           "spec": {"model": {"uri": "builtin:x"}, "input": {"prompts": ["hi"]}}}
    doc["spec"][section] = {key: text}
    try:
        parse_job(doc)
    except SpecError as e:
        assert e.path == field, (e.path, text)
        return
    parts = text.split("/")
    assert parts[-1] not in ("", ".", "..") and not text.startswith("/") and ".." not in parts, text
    assert all(ord(c) >= 32 and c not in "\x7f\\" for c in text), text
    assert all(len(p.encode()) <= 255 for p in parts), text


# ---------------------------------------------------------------------------------------- manifest files


@FEW
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.sampled_from([b"\xef\xbb\xbf", b"a: 2025-13-45\n", b"a: " + b"9" * 5000 + b"\n", b"a: !!int x\n",
                                  b"a: !!timestamp x\n", b"[" * 5000, b"a: &a [*a]\n", b"? [1]\n: 2\n", b"- 1\n- 2\n",
                                  b"a: !!python/object:os.system x\n", b"a: \"\\ud800\"\n", b"\xff\xfe"])))
def test_random_bytes_as_a_manifest_file(data):
    """Any bytes in a manifest file: a mapping, or a SpecError naming the file; then parse_job on the mapping gives
    a JobSpec or a SpecError, nothing else."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.yaml"
        path.write_bytes(data)
        try:
            doc = load_manifest(path)
        except SpecError as e:
            assert e.path.startswith(str(path)), e.path
            return
    assert isinstance(doc, dict)
    _check(doc)
