"""kubeflash's API: the InferenceJob and FlashNode types, their one parser, quantities, ids and path rules.

Imports nothing of the project and nothing heavier than PyYAML, so the operator, the agent, the CSI driver, the
engine and every CLI can share it; a bad manifest is refused here before torch is imported anywhere.
"""

from kubeflash_api.errors import SpecError
from kubeflash_api.inferencejob import (
    CacheSpec,
    ConfigMapKey,
    GenerationSpec,
    InputSpec,
    JobSpec,
    ModelSpec,
    OffloadSpec,
    OutputSpec,
    Prompt,
    ResourcesSpec,
    Split,
    Synthetic,
    from_canonical,
    parse_job,
    parse_job_spec,
    to_canonical,
)
from kubeflash_api.quantity import parse_quantity

__all__ = [
    "CacheSpec", "ConfigMapKey", "GenerationSpec", "InputSpec", "JobSpec", "ModelSpec", "OffloadSpec", "OutputSpec", "Prompt",
    "ResourcesSpec", "SpecError", "Split", "Synthetic", "from_canonical", "parse_job", "parse_job_spec",
    "parse_quantity", "to_canonical",
]
