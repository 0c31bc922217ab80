"""The gRPC face of the driver: CSI Identity and Node services, mapping requests onto `Volumes`.

No Controller service: volumes are CSI ephemeral inline volumes whose lifetime is the pod's, created by
NodePublishVolume on the node the pod already runs on, so there is nothing to provision or attach centrally.
"""

from __future__ import annotations

import functools
import logging

import grpc
from google.protobuf import wrappers_pb2

from kubeflash_api import contract as c
from kubeflash_node import __version__

from .attrs import parse_request
from .errors import CsiError
from .pb import csi_pb2 as pb
from .pb import csi_pb2_grpc as pb_grpc
from .volumes import Volumes

log = logging.getLogger(__name__)
DRIVER = c.CSI_DRIVER
TOPOLOGY_KEY = "topology.kubeflash.io/node"


def rpc(method):
    """Turn a CsiError into the gRPC status it names; anything else becomes INTERNAL with its message."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except CsiError as e:
            log.info("refused", extra={"rpc": method.__name__, "code": e.code.name, "error": e.message})
            context.abort(e.code, e.message)
        except Exception as e:  # the kubelet must get an answer, never a dropped stream
            log.exception("rpc failed", extra={"rpc": method.__name__})
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class Identity(pb_grpc.IdentityServicer):
    def __init__(self, volumes: Volumes):
        self.volumes = volumes

    @rpc
    def GetPluginInfo(self, request, context):
        return pb.GetPluginInfoResponse(name=DRIVER, vendor_version=__version__)

    @rpc
    def GetPluginCapabilities(self, request, context):
        cap = pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS
        return pb.GetPluginCapabilitiesResponse(capabilities=[pb.PluginCapability(
            service=pb.PluginCapability.Service(type=cap))])

    @rpc
    def Probe(self, request, context):
        ok, why = self.volumes.health()
        if not ok:
            log.warning("probe: not ready", extra={"reason": why})
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ok))


class Node(pb_grpc.NodeServicer):
    def __init__(self, volumes: Volumes):
        self.volumes = volumes

    @rpc
    def NodeGetInfo(self, request, context):
        node = self.volumes.cfg.node_id
        return pb.NodeGetInfoResponse(node_id=node, accessible_topology=pb.Topology(segments={TOPOLOGY_KEY: node}))

    @rpc
    def NodeGetCapabilities(self, request, context):
        kinds = [pb.NodeServiceCapability.RPC.GET_VOLUME_STATS]
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=k)) for k in kinds])

    @rpc
    def NodePublishVolume(self, request, context):
        if not request.volume_id:
            raise CsiError.invalid("volume_id is required")
        target = self.volumes.check_target(request.target_path)
        _check_capability(request)
        req = parse_request(request.volume_id, target, dict(request.volume_context), read_only=request.readonly)
        self.volumes.publish(req)
        return pb.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request, context):
        if not request.volume_id:
            raise CsiError.invalid("volume_id is required")
        self.volumes.unpublish(request.volume_id, self.volumes.check_target(request.target_path))
        return pb.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request, context):
        if not request.volume_id:
            raise CsiError.invalid("volume_id is required")
        if not request.volume_path:
            raise CsiError.invalid("volume_path is required")
        st = self.volumes.stats(request.volume_id, request.volume_path)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        used = total - st.f_bfree * st.f_frsize
        return pb.NodeGetVolumeStatsResponse(usage=[
            pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=total, used=used, available=free),
            pb.VolumeUsage(unit=pb.VolumeUsage.INODES, total=st.f_files, used=st.f_files - st.f_ffree,
                           available=st.f_favail),
        ])


def _check_capability(request) -> None:
    cap = request.volume_capability
    if not request.HasField("volume_capability"):
        raise CsiError.invalid("volume_capability is required")
    if cap.HasField("block"):
        raise CsiError.invalid("volume_capability: block access is not supported; kubeflash.io volumes are "
                               "file systems (access_type mount)")
    if not cap.HasField("mount"):
        raise CsiError.invalid("volume_capability: access_type mount is required")
    if cap.access_mode.mode == pb.VolumeCapability.AccessMode.UNKNOWN:
        raise CsiError.invalid("volume_capability.access_mode is required")
