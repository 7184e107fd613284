"""A 52 MB model travels both ways intact, in chunks, far past gRPC's 4 MB message default."""

from __future__ import annotations

import numpy as np

from conclave.core.parameters import Layout, Parameters
from conclave.core.types import Task, TaskAssignment, TaskKind, Update, Verdict
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer

ELEMENTS = 13_000_000  # float32: 52 MB


def test_fifty_megabyte_model_round_trip(fake):
    layout = Layout.of({"embedding": (12_000, 1_000), "head": (1_000, 999), "bias": (1_000,)})
    assert layout.size == ELEMENTS
    model = Parameters.from_flat(
        layout, np.random.default_rng(3).standard_normal(ELEMENTS, dtype=np.float32)
    )
    fake.assignment = TaskAssignment(
        task=Task(
            run_id="big", round=1, kind=TaskKind.FIT, config={}, parameters=model, deadline_s=60.0
        )
    )
    with GrpcServer(fake) as server, GrpcCoordinatorClient(server.address) as client:
        task = client.fetch_task("big", "p0", 0.0).task
        assert task is not None
        assert task.parameters.digest() == model.digest()
        assert np.array_equal(task.parameters.flat, model.flat)

        task.parameters.flat[::1000] += 1.0  # "train": change it so the upload is new data
        trained_digest = task.parameters.digest()
        update = Update(
            run_id="big", round=1, participant="p0", num_examples=1, parameters=task.parameters
        )
        assert client.submit_update(update) == Verdict(accepted=True)

    received = fake.last("submit_update")
    assert isinstance(received, Update)
    assert received.parameters.layout == layout
    assert received.parameters.digest() == trained_digest
    assert received.digest == trained_digest
    assert np.array_equal(received.parameters.flat, task.parameters.flat)
    assert not np.array_equal(received.parameters.flat, model.flat)
