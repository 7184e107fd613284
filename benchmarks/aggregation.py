"""FedAvg of 100 updates x 1M float32: throughput as a fraction of a numpy memory copy.

The baseline is measured in the same run: copying each update once into a destination
buffer (read 4 MB + write 4 MB per update), the least work any aggregation must do.
Target: ratio >= 0.5.  Run: python benchmarks/aggregation.py [--updates N] [--dim D]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from conclave.core.aggregation import WeightedMean
from conclave.core.parameters import Layout, Parameters


def best_of(repeats: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    layout = Layout.of({"vector": (args.dim,)})
    rng = np.random.default_rng(0)
    updates = [Parameters(layout, rng.standard_normal(args.dim, dtype=np.float32))
               for _ in range(args.updates)]
    weights = rng.integers(1, 1000, size=args.updates)
    payload = args.updates * layout.nbytes

    def baseline() -> None:
        dst = np.empty(args.dim, dtype=np.float32)
        for u in updates:
            np.copyto(dst, u.flat)

    def fedavg() -> None:
        agg = WeightedMean(layout)
        for u, w in zip(updates, weights, strict=True):
            agg.add(u, int(w))
        agg.result()

    # correctness check against a float64 reference before timing
    agg = WeightedMean(layout)
    for u, w in zip(updates[:10], weights[:10], strict=True):
        agg.add(u, int(w))
    ref = np.average(np.stack([u.flat for u in updates[:10]]).astype(np.float64), axis=0,
                     weights=weights[:10])
    assert np.allclose(agg.result().flat, ref, atol=1e-5)

    t_copy = best_of(args.repeats, baseline)
    t_avg = best_of(args.repeats, fedavg)
    print(f"updates={args.updates} dim={args.dim} payload={payload / 1e6:.0f} MB")
    print(f"numpy copy baseline: {t_copy * 1e3:8.1f} ms  ({payload / t_copy / 1e9:5.2f} GB/s)")
    print(f"streaming FedAvg:    {t_avg * 1e3:8.1f} ms  ({payload / t_avg / 1e9:5.2f} GB/s)")
    print(f"ratio fedavg/copy throughput: {t_copy / t_avg:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
