"""The node agent (`kubeflash agent`), one per GPU/SSD node.

It discovers GPUs and SSDs and pairs each GPU with its closest SSD, measures their bandwidths, stages the
models the operator wants into each SSD's layer store (evicting unused ones when space runs short), prepares
and removes per-job KV space, relays engine progress into InferenceJob status, and publishes all of it in
the node's FlashNode status. docs/agent.md describes its config file, HTTP API and metrics.
"""
