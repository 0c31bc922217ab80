"""kubeflash_node.engine"""
