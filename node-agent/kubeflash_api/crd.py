"""The CustomResourceDefinitions, generated from the API's schema (crds/*.yaml are this module's output).

    python -m kubeflash_api.crd --write crds/     regenerate
    python -m kubeflash_api.crd --check crds/     exit 1 if crds/ differs from what the API says
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from kubeflash_api import flashnode, inferencejob
from kubeflash_api.contract import GROUP, VERSION
from kubeflash_api.schema import Node, openapi

_LABELS = {"app.kubernetes.io/name": "kubeflash", "app.kubernetes.io/part-of": "kubeflash"}

JOB_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Node", "type": "string", "jsonPath": ".status.node"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.throughput.tokensPerSecond"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]
NODE_COLUMNS = [
    {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpuCount"},
    {"name": "Pairs", "type": "integer", "jsonPath": ".status.pairCount"},
    {"name": "Free SSD", "type": "string", "jsonPath": ".status.freeSSD"},
    {"name": "Models Ready", "type": "integer", "jsonPath": ".status.modelsReady"},
    {"name": "Heartbeat", "type": "date", "jsonPath": ".status.heartbeat"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _crd(kind: str, plural: str, short: str, scope: str, root: Node, columns: list[dict]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": dict(_LABELS)},
        "spec": {
            "group": GROUP, "scope": scope,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["kubeflash"]},
            "versions": [{"name": VERSION, "served": True, "storage": True, "subresources": {"status": {}},
                          "additionalPrinterColumns": columns, "schema": {"openAPIV3Schema": openapi(root)}}],
        },
    }


def crds() -> dict[str, dict[str, Any]]:
    """file name -> CRD object."""
    return {
        f"inferencejobs.{GROUP}.yaml": _crd("InferenceJob", "inferencejobs", "ij", "Namespaced", inferencejob.OBJECT,
                                            JOB_COLUMNS),
        f"flashnodes.{GROUP}.yaml": _crd("FlashNode", "flashnodes", "fn", "Cluster", flashnode.OBJECT, NODE_COLUMNS),
    }


def render(obj: dict[str, Any]) -> str:
    head = "# Generated from kubeflash_api (python -m kubeflash_api.crd --write crds/); do not edit by hand.\n"
    return head + yaml.safe_dump(obj, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeflash_api.crd", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="DIR", help="write the CRDs into DIR")
    mode.add_argument("--check", type=Path, metavar="DIR", help="exit 1 if the CRDs in DIR differ")
    args = p.parse_args(argv)
    stale = []
    for name, obj in crds().items():
        text = render(obj)
        target = (args.write or args.check) / name
        if args.write:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        elif not target.is_file() or target.read_text() != text:
            stale.append(str(target))
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m kubeflash_api.crd --write {args.check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
