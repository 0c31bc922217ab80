"""The README and docs/ say only what the CLI and the tree have: every relative link (file and #anchor) resolves,
and every `kubeflash SUBCOMMAND --flag` they show is a flag that subcommand's parser takes.

A renamed doc, a heading reworded under a link, or a flag renamed in a parser while the docs keep the old spelling
fails here, naming the doc and line. No torch: the parsers are built from each subcommand's add_arguments.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(doc: Path) -> list[tuple[int, str]]:
    out = []
    in_code = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            out += [(n, m[1]) for m in re.finditer(r"\]\(([^)\s]+)\)", line)
                    if not m[1].startswith(("http://", "https://", "mailto:"))]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for n, url in _links(doc):
        path, _, anchor = url.partition("#")
        target = (doc.parent / path) if path else doc
        if not target.exists():
            broken.append(f"{doc.name}:{n}: {url} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{doc.name}:{n}: {url} (no such heading in {target.name})")
    assert broken == []


def _flags() -> dict[str, set[str]]:
    from kubeflash_node.cli import SUBCOMMANDS

    flags = {}
    for name, (module, _) in SUBCOMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        flags[name] = {o for a in parser._actions for o in a.option_strings}
    return flags


FLAGS = _flags()
# `kubeflash SUB` followed by its arguments, up to the end of a code span, a comment or the line
COMMAND = re.compile(r"kubeflash (%s)\b([^`#|;)]*)" % "|".join(FLAGS))


def documented_flags(text: str) -> list[tuple[int, str, str]]:
    """(line, subcommand, flag) for every flag shown after `kubeflash SUB` in a doc (a continued line included)."""
    out = []
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        for m in COMMAND.finditer(line):
            args = m[2]
            k = n
            while args.rstrip().endswith("\\") and k < len(lines):  # a shell line continued
                args, k = args.rstrip()[:-1] + " " + re.match(r"[^`#|;)]*", lines[k])[0], k + 1
            out += [(n, m[1], f) for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", args)]
    return out


def test_the_flag_finder_finds_flags():
    """The finder itself: it sees flags in code spans and continued lines, and stops at a comment."""
    text = "`kubeflash run job.yaml --device cpu` and\nkubeflash plan j.yaml --ceilings c.json \\\n    --step 5  # --nope"
    assert documented_flags(text) == [(1, "run", "--device"), (2, "plan", "--ceilings"), (2, "plan", "--step")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_flags_exist(doc):
    found = documented_flags(doc.read_text())
    unknown = [f"{doc.name}:{n}: kubeflash {sub} {flag}" for n, sub, flag in found if flag not in FLAGS[sub]]
    assert unknown == []


def test_the_readme_shows_flags_of_several_subcommands():
    """So the check above is not vacuous: the README itself shows flags of run, convert, plan and bench."""
    shown = {sub for _, sub, _ in documented_flags((REPO / "README.md").read_text())}
    assert {"run", "convert", "plan", "bench"} <= shown
