"""Generated protobuf/gRPC modules (csi.proto, kubelet plugin registration); regenerate with ../gen.sh."""
