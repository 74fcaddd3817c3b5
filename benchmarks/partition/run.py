"""Partition benchmark: our balanced plans vs AsyncDiff's hand split on the SD 2.1 UNet.

For N = 2, 3, 4 every segment of both plans is split out of the captured model and run alone
(same process, same thread count, one after the other in the same run); the table shows the
measured balance (max/mean segment latency), the bytes that move per step, and predicted vs
measured segment latency. Then the solver's time against graph size.

    python benchmarks/partition/run.py --size 32 --repeats 3        # profile in the same run
    python benchmarks/partition/run.py --profile profiles/sd21-unet.cpu-1t.json

Predicted and measured figures are only comparable when both were measured under the same
conditions; by default the script profiles the model itself, in the same run, right before it
times the segments.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from asyncdiff_partition.app.api import capture_profiled, capture_spec
from asyncdiff_partition.core.baseline import make_asyncdiff_plan
from asyncdiff_partition.core.partition import PartitionProblem, balance_segments
from asyncdiff_partition.core.plan import Plan, make_plan
from asyncdiff_partition.core.profile import Profile
from asyncdiff_partition.core.summary import format_bytes
from asyncdiff_partition.fx.profiler import profile_model, time_segments


def measure(captured, plan: Plan, repeats: int) -> dict:
    measured = time_segments(captured, plan.boundaries, warmup=1, repeats=repeats)
    predicted = [s.compute_ms for s in plan.segments]
    errors = [abs(m - p) / m for m, p in zip(measured, predicted)]
    return {
        "measured": measured,
        "predicted": predicted,
        "balance": max(measured) / statistics.mean(measured),
        "max_error": max(errors),
        "p2p": plan.bytes_per_step,
        "broadcast": plan.broadcast_bytes_per_step,
    }


def random_problem(n: int, kind: str) -> PartitionProblem:
    """A random graph of n nodes: a chain with 5 % long skips and about 1 % fresh nodes.

    ``unet``: the fresh nodes are a time-embedding chain whose output 2 % of the nodes read,
    plus one single-user projection per ~100 nodes (what the UNet graphs here look like).
    ``stress``: every non-fresh node reads a random fresh node with probability 2 %, so the
    fresh nodes have ~n/100 different sets of users (far more than a real model has).
    """
    rng = random.Random(n)
    n_fresh = max(6, n // 100)
    fresh = [i < n_fresh for i in range(n)]
    preds: list[list[int]] = [[i - 1] if 0 < i < 5 else [] for i in range(n_fresh)]
    for i in range(5, n_fresh):
        preds[i] = [4]  # projections of the time embedding
    projections = list(range(5, n_fresh))
    for i in range(n_fresh, n):
        p = [i - 1] if i > n_fresh else []
        if rng.random() < 0.05 and i - n_fresh > 10:
            p.append(rng.randrange(n_fresh, i - 1))  # skip connection
        if kind == "stress" and rng.random() < 0.02:
            p.append(rng.randrange(0, n_fresh))
        elif kind == "unet":
            if rng.random() < 0.02:
                p.append(4)
            if projections and rng.random() < 0.01:
                p.append(projections.pop())
        preds.append(sorted(set(p)))
    costs = [rng.expovariate(1.0) for _ in range(n)]
    stale = [rng.randrange(1, 1 << 20) for _ in range(n + 1)]
    return PartitionProblem(costs=costs, fresh=fresh, preds=preds, stale_bytes=stale)


def solver_times(sizes: list[int], segments: list[int], kind: str) -> list[tuple[int, int, float]]:
    """Median seconds of balance_segments (3 runs) on random graphs of each size."""
    rows = []
    for n in sizes:
        problem = random_problem(n, kind)
        for k in segments:
            samples = []
            for _ in range(3):
                begin = time.perf_counter()
                balance_segments(problem, k, bandwidth=1e6)
                samples.append(time.perf_counter() - begin)
            rows.append((n, k, statistics.median(samples)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="use this profile instead of profiling in the run")
    parser.add_argument("--model", default="sd21-unet")
    parser.add_argument("--size", type=int, default=64, help="latent height/width when profiling in the run")
    parser.add_argument("--devices", default="2,3,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--solver-only", action="store_true", help="only the solver timings")
    args = parser.parse_args()
    if args.solver_only:
        return print_solver_times()
    torch.set_num_threads(args.threads)

    if args.profile:
        profile = Profile.load(args.profile)
        captured = capture_profiled(profile)
    else:
        _, captured = capture_spec(args.model, batch=2, sample_size=args.size)
        profile = profile_model(captured, model_name=args.model, repeats=args.repeats)
    latent = next(i for i in profile.inputs if i["latent"])
    print(f"# {profile.model}, latent {latent['shape']}, {args.threads} thread(s), {profile.device_name}, "
          f"repeats {args.repeats}; profile eager {profile.eager_ms['median']:.0f} ms, "
          f"sum of node medians {profile.node_ms_sum:.0f} ms", flush=True)

    print("\n| N | plan | measured segment ms | max/mean | predicted ms | max error | "
          "bytes/step (ours, point-to-point) | bytes/step (AsyncDiff-style broadcast) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.devices.split(",")):
        for label, plan in (("ours", make_plan(profile, n)), ("AsyncDiff hand split", make_asyncdiff_plan(profile, n))):
            r = measure(captured, plan, args.repeats)
            print(f"| {n} | {label} | {' / '.join(f'{m:.0f}' for m in r['measured'])} | {r['balance']:.3f} | "
                  f"{' / '.join(f'{p:.0f}' for p in r['predicted'])} | {100 * r['max_error']:.1f}% | "
                  f"{format_bytes(r['p2p'])} | {format_bytes(r['broadcast'])} |", flush=True)

    print_solver_times()


def print_solver_times() -> None:
    sizes, segments = [1_000, 5_000, 10_000, 20_000], [2, 4, 8]
    unet = solver_times(sizes, segments, "unet")
    stress = solver_times(sizes, segments, "stress")
    print("\n| nodes | N | solver s, UNet-like fresh nodes | solver s, stress (n/100 fresh user sets) |")
    print("|---|---|---|---|")
    for (n, k, a), (_, _, b) in zip(unet, stress):
        print(f"| {n:,} | {k} | {a:.3f} | {b:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
