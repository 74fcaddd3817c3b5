"""Predicted multi-GPU speedups from a GPU profile, beside AsyncDiff's published A5000 figures.

    python benchmarks/gpu/predict.py --profile $OUT/sd21-unet.cuda.profile.json --out benchmarks/gpu/predicted.md

Runs the planner (``make_plan``) for N = 2, 3, 4 at stride 1 and N = 2, 3 at stride 2, each with
an NVLink-class and a PCIe-class link bandwidth, 50 steps, and prints one Markdown table beside
the published figures (DESIGN.md: SD 2.1, 50 DDIM steps, NVIDIA A5000). Every figure of ours is
a *prediction* of the plan's cost model (compute from the profile, transfers at the bandwidth),
not a measurement; the published ones are measured end to end on other hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asyncdiff_partition.core.files import write_json_atomic
from asyncdiff_partition.core.plan import ideal_speedup, make_plan
from asyncdiff_partition.core.profile import Profile

# AsyncDiff (arXiv 2406.06911), SD 2.1, 50 DDIM steps, NVIDIA A5000: (N, S) -> (devices, speedup).
PUBLISHED = {(2, 1): (2, 1.8), (3, 1): (3, 2.3), (4, 1): (4, 2.6), (2, 2): (3, 3.0), (3, 2): (4, 4.0)}
LINKS = {"NVLink-class": 300.0, "PCIe-class": 25.0}  # GB/s one way: NVLink 4 pair / PCIe 4.0 x16 in practice


def predict(profile: Profile, *, steps: int, warmup: int, links: dict[str, float],
            latency_ms: float) -> list[dict]:
    rows = []
    for (n, stride), (devices, published) in PUBLISHED.items():
        row = {"config": f"N{n} S{stride}", "devices": devices, "published_a5000": published,
               "ideal": ideal_speedup(steps, warmup, n, stride), "predicted": {}, "bytes_per_step": None}
        for name, bandwidth in links.items():
            plan = make_plan(profile, n, stride=stride, warmup=warmup, steps=steps, bandwidth_gbps=bandwidth,
                             link_latency_ms=latency_ms)
            row["predicted"][name] = plan.predicted["speedup"]
            row["bytes_per_step"] = plan.bytes_per_step
        rows.append(row)
    return rows


def markdown(profile: Profile, rows: list[dict], links: dict[str, float], steps: int, warmup: int) -> str:
    heads = " | ".join(f"predicted, {name} ({bw:g} GB/s)" for name, bw in links.items())
    lines = [f"Predictions from the profile of {profile.model} on {profile.device_name} ({profile.device}, "
             f"{profile.dtype}, inputs {', '.join(str(tuple(i['shape'])) for i in profile.inputs)}), T = {steps}, "
             f"W = {warmup}; eager forward {profile.eager_ms['median']:.1f} ms.", "",
             f"| config | devices | AsyncDiff, A5000 (published, measured) | {heads} | ideal | sent per step |",
             "|---|---|---|" + "---|" * len(links) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['predicted'][name]:.2f}× (prediction)" for name in links)
        lines.append(f"| {r['config']} | {r['devices']} | {r['published_a5000']:.1f}× | {cells} | {r['ideal']:.2f}× | "
                     f"{r['bytes_per_step'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="a profile file (on the GPU: the device check's)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--nvlink", type=float, default=LINKS["NVLink-class"], help="GB/s")
    parser.add_argument("--pcie", type=float, default=LINKS["PCIe-class"], help="GB/s")
    parser.add_argument("--latency-ms", type=float, default=0.02, help="fixed cost per transfer")
    parser.add_argument("--out", default=None, help="write the table here (.md) and its figures beside it (.json)")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    links = {"NVLink-class": args.nvlink, "PCIe-class": args.pcie}
    rows = predict(profile, steps=args.steps, warmup=args.warmup, links=links, latency_ms=args.latency_ms)
    table = markdown(profile, rows, links, args.steps, args.warmup)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(table, encoding="utf-8")
        tmp.replace(out)
        write_json_atomic(out.with_suffix(".json"), {"profile": args.profile, "links_gbps": links, "steps": args.steps,
                                                     "warmup": args.warmup, "rows": json.loads(json.dumps(rows))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
