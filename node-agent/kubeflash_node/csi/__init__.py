"""The CSI node plugin `kubeflash.io`: model volumes (read-only bind of a staged model), KV volumes (a sized,
loop-mounted ext4 image) and job volumes (the job's directory on the store), served to the kubelet over gRPC."""
