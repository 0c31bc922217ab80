"""kubeflash_operator: the kopf operator that places InferenceJobs on GPU<->SSD pairs (no torch here)."""
