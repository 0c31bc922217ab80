"""kubeflash_node.agent"""
