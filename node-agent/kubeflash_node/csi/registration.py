"""Self-registration with the kubelet: the plugin-registration gRPC service on a socket in plugins_registry/.

The kubelet's plugin watcher finds `<registration-dir>/kubeflash.io-reg.sock`, calls GetInfo to learn the
driver's name and CSI endpoint, and reports the outcome through NotifyRegistrationStatus. This replaces the
node-driver-registrar sidecar, whose image cannot be pulled here.
"""

from __future__ import annotations

import logging
import threading

from .pb import registration_pb2 as pb
from .pb import registration_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
CSI_PLUGIN = "CSIPlugin"
SUPPORTED_VERSIONS = ("1.0.0",)


class Registration(pb_grpc.RegistrationServicer):
    def __init__(self, driver: str, endpoint: str):
        self.driver, self.endpoint = driver, endpoint  # endpoint: the CSI socket's path as the kubelet sees it
        self.registered = threading.Event()
        self.error = ""

    def GetInfo(self, request, context):
        return pb.PluginInfo(type=CSI_PLUGIN, name=self.driver, endpoint=self.endpoint,
                             supported_versions=list(SUPPORTED_VERSIONS))

    def NotifyRegistrationStatus(self, request, context):
        if request.plugin_registered:
            log.info("registered with the kubelet", extra={"driver": self.driver, "endpoint": self.endpoint})
            self.error = ""
            self.registered.set()
        else:
            self.error = request.error
            log.error("the kubelet refused the registration", extra={"driver": self.driver, "error": request.error})
        return pb.RegistrationStatusResponse()
