"""kubeflash_node.store"""
