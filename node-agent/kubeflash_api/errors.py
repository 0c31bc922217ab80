"""The one error a user's mistake in an InferenceJob or FlashNode becomes: the field path and what was expected."""

from __future__ import annotations


class SpecError(ValueError):
    """A bad manifest, input file or field; `path` names it (`spec.generation.topP`, `prompts.jsonl:3`)."""

    def __init__(self, path: str, problem: str | None = None):
        if problem is None:  # one whole sentence that already names its field
            path, problem = "", path
        super().__init__(f"{path} {problem}" if path else problem)
        self.path = path
        self.problem = problem
