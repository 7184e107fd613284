"""gRPC adapter: the coordinator's server and the participants' client.

Protobuf types stay inside this package; ``serde`` is the only module that converts them.
"""

from conclave.transport.grpc.client import GrpcCoordinatorClient
from conclave.transport.grpc.server import GrpcServer

__all__ = ["GrpcCoordinatorClient", "GrpcServer"]
