"""`kubeflash merge`: the merge pod of a spec.parallelism job with spec.output.pvc, created by the operator once
every shard job has Succeeded.

Each shard wrote its results to <path>.part-<k>-of-<N> on the output claim (<path>: spec.output.path, default
<job>.results.jsonl); this merges them into <path>, lines in input order, checked first (exactly one result per
prompt, each in its own shard's part) and written atomically (temp file, fsync, rename: the old <path> or the whole
new one, never a part). The part files stay. Env (docs/parallelism.md): KUBEFLASH_JOB_SPEC (the parent job's
canonical spec, JSON), KUBEFLASH_JOB_NAME, KUBEFLASH_JOB_NAMESPACE, KUBEFLASH_OUTPUT_DIR (the claim's mount) and,
for a file or ConfigMap input, KUBEFLASH_INPUT_FILE (read for the input order). Exit 1 with the reason on stderr
(the pod's termination message, which the operator copies into the job's status).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", type=Path, default=os.environ.get("KUBEFLASH_OUTPUT_DIR"),
                   help="the output claim's root, holding the part files (default: $KUBEFLASH_OUTPUT_DIR)")
    p.add_argument("--input-file", type=Path, default=os.environ.get("KUBEFLASH_INPUT_FILE"),
                   help="the job's JSONL input, read for the input order when its prompts are not inline "
                        "(default: $KUBEFLASH_INPUT_FILE)")


def main(args: argparse.Namespace) -> int:
    from kubeflash_api import SpecError, from_canonical
    from kubeflash_api import contract as c
    from kubeflash_api.batch import read_batch
    from kubeflash_api.names import resolve_within

    from .shardmerge import MergeError, merge_parts

    try:
        raw = os.environ.get(c.ENV_JOB_SPEC)
        name = os.environ.get(c.ENV_JOB_NAME)
        if not raw or not name:
            raise ValueError(f"environment variables {c.ENV_JOB_SPEC} and {c.ENV_JOB_NAME} are required (the "
                             "operator sets them in the merge pod)")
        spec = from_canonical(json.loads(raw), name=name, namespace=os.environ.get(c.ENV_JOB_NAMESPACE, "default"))
        if spec.parallelism < 2:
            raise ValueError(f"{c.ENV_JOB_SPEC}: spec.parallelism is {spec.parallelism}; there are no parts to merge")
        if args.output_dir is None:
            raise ValueError("--output-dir (or $KUBEFLASH_OUTPUT_DIR) is required: the output claim's root")
        if spec.input.source in ("file", "configMap"):
            if args.input_file is None:
                raise ValueError("--input-file (or $KUBEFLASH_INPUT_FILE) is required for a file or ConfigMap input")
            spec = spec.with_prompts(read_batch(args.input_file, field="spec.input"))
        path = spec.output.path or f"{spec.name}.results.jsonl"
        resolve_within(args.output_dir, path, "spec.output.path")  # no '..' out of the claim
        merged = merge_parts(args.output_dir, path, spec.parallelism, [p.id for p in spec.input.prompts])
    except (SpecError, MergeError, ValueError, OSError, json.JSONDecodeError) as e:
        print(f"kubeflash merge: error: {e}", file=sys.stderr)
        return 1
    print(f"kubeflash merge: {merged.lines} results from {spec.parallelism} parts, {merged.bytes} bytes, "
          f"written to {merged.path}")
    return 0
