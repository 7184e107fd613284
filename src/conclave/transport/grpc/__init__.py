"""gRPC adapter: the coordinator's server and the participants' client.

Protobuf types stay inside this package; ``serde`` (and ``stage_serde`` for the
secure-aggregation stage RPCs) are the only modules that convert them.
"""

from conclave.transport.grpc.client import GrpcCoordinatorClient
from conclave.transport.grpc.server import GrpcServer

__all__ = ["GrpcCoordinatorClient", "GrpcServer"]
