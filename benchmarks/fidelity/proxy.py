"""Proxy against truth: how well the staleness measures rank single cuts by the error they really give.

Usage (from the repository root; results in README.md here):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity/proxy.py --model digits --images 2 \
        --out benchmarks/fidelity/proxy-digits.csv

For every distinct single cut (N = 2, S = 1, W = 1; one per injection node, fx/staleness.py Note
[cut error]) and for a sweep of evenly spaced cuts, the truth is the relative L2 between the
asynchronous samples (reference schedule) and the sequential ones on one batch; the proxies are
the two staleness measures of the profile, calibrated on *another* batch (other noise):
``per_node`` summed over the values crossing the cut (the issue's proxy) and ``cut_error``.
Prints Spearman's rank correlation of each proxy with the truth.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
import torch


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties."""
    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, float)
        order = values.argsort(kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values))
        for v in np.unique(values):  # ties share their mean rank
            out[values == v] = out[values == v].mean()
        return out
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--images", type=int, default=2, help="truth batch (per class for class-conditional models)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sweep", type=int, default=24, help="evenly spaced cuts besides the injection ones")
    parser.add_argument("--out", default=None, help="CSV of every cut")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from asyncdiff_partition.evaluation.evaluate import FidelityBench
    from asyncdiff_partition.fx.staleness import injection_boundaries

    calibration = FidelityBench(args.model, steps=args.steps, images=1, seed=0, guidance=args.guidance,
                                profile_repeats=1, noise_seed=1000)
    staleness = calibration.calibrate(progress=True)
    truth = FidelityBench(args.model, steps=args.steps, images=args.images, seed=0, guidance=args.guidance,
                          profile_repeats=1)
    truth.adopt(staleness, calibration.graph)
    graph, profile = truth.graph, truth.profile
    cut_error, proxy = profile.cut_staleness(), profile.proxy_staleness()
    n, fresh = len(graph), graph.fresh
    stale_ops = [i for i in range(n) if graph.node(i)["kind"] == "op" and not fresh[i]]
    usable = set(range(stale_ops[0] + 1, n))  # segment 0 needs a stale op
    injection = [b for b in injection_boundaries(graph) if b in usable]
    sweep = sorted({stale_ops[int(j)] for j in np.linspace(1, len(stale_ops) - 1, args.sweep)} & usable)
    rows = []
    for b in sorted(set(injection) | set(sweep)):
        judged = truth.judge([0, b, n], 1, 1)
        rows.append({"boundary": b, "module": graph.node(b)["module"], "injection": b in injection,
                     "sweep": b in sweep, "proxy_per_node": proxy[b], "cut_error": cut_error[b],
                     "truth_relative_l2": judged["relative_l2"], "psnr_db": judged["psnr_db"],
                     "frechet_distance": judged.get("frechet_distance", "")})
        print(f"{b:5d} {rows[-1]['module'][:40]:40s} proxy {proxy[b]:.4f} cut_error {cut_error[b]:.4f} "
              f"truth {judged['relative_l2']:.4f} PSNR {judged['psnr_db']:.2f}", file=sys.stderr)
    print(f"model {args.model}: truth batch {truth.describe()}, calibration batch {calibration.describe()} "
          f"(other noise)")
    for name, pick in (("injection cuts", "injection"), ("evenly spaced cuts", "sweep")):
        chosen = [r for r in rows if r[pick]]
        t = [r["truth_relative_l2"] for r in chosen]
        print(f"{name} ({len(chosen)}): Spearman vs truth: per_node proxy "
              f"{spearman([r['proxy_per_node'] for r in chosen], t):+.3f}, cut_error "
              f"{spearman([r['cut_error'] for r in chosen], t):+.3f}")
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
