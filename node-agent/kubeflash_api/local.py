"""A manifest file as `kubeflash run` and `kubeflash plan` read it: parsed, and its input file read in.

On one machine the manifest's folder stands for every claim's root: `spec.input.file` is read relative to it
(resolved, symlinks included, and refused if it leaves the folder).
"""

from __future__ import annotations

from pathlib import Path

from kubeflash_api.batch import read_batch
from kubeflash_api.errors import SpecError
from kubeflash_api.files import load_manifest
from kubeflash_api.inferencejob import JobSpec, parse_job
from kubeflash_api.names import resolve_within


def load_job_file(path: Path) -> JobSpec:
    """The InferenceJob in `path`, with a file input's requests read in; SpecError naming the field or file."""
    path = Path(path)
    spec = parse_job(load_manifest(path))
    return read_input(spec, path.parent)


def read_input(spec: JobSpec, root: Path) -> JobSpec:
    """`spec` with its input file's requests read in, the file resolved inside `root`."""
    if spec.input.config_map:
        raise SpecError("spec.input.configMap", "is read from the cluster; on one machine use spec.input.prompts "
                                                "or spec.input.file (a JSONL file next to the manifest)")
    if not spec.input.file:
        return spec
    target = resolve_within(root, spec.input.file, "spec.input.file")
    return spec.with_prompts(read_batch(target))
