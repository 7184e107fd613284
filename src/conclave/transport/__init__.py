"""Transports carrying ``CoordinatorService`` calls between participants and the coordinator.

``transport.memory`` hands calls over in-process (simulation, tests); ``transport.grpc``
serves them over the network. Import the one you need: this package imports neither, so
in-memory users do not pull in gRPC.
"""
