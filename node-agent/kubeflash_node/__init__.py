"""kubeflash_node: what runs on a GPU/SSD node — the agent, the on-SSD store and the streaming engine."""

__version__ = "0.1.0"
