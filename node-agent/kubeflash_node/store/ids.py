"""Model ids and job directory names, from the API (kubeflash_api.names) where the operator reads them too."""

from __future__ import annotations

from kubeflash_api.names import job_dir_name, model_id

__all__ = ["job_dir_name", "model_id"]
