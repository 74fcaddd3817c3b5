"""Runtime benchmark: sequential vs asynchronous N=2 denoising of an SD-architecture UNet on CPU.

Measured in one run, one after the other, on the same pipeline, seed and steps:
  sequential   1 process, 1 thread, the unsplit model (the reference schedule with W >= T)
  2 threads    1 process, 2 threads, the unsplit model (what a CPU user would do instead)
  async N=2    2 processes, 1 thread each, the plan made from a profile taken in this run

    python benchmarks/runtime/run.py --model sd15-unet --size 8 --steps 50 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from asyncdiff_partition.api import capture_spec
from asyncdiff_partition.pipeline import RunConfig, run_plan
from asyncdiff_partition.plan import ideal_speedup, make_plan
from asyncdiff_partition.profile import profile_model
from asyncdiff_partition.summary import format_bytes


def denoise_ms(result: dict) -> float:
    """Total of the per-step times (the denoising loop alone: no VAE decode, no set-up)."""
    return result["summary"]["total_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-unet")
    parser.add_argument("--size", type=int, default=8, help="latent height/width")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration; medians shown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="asyncdiff-runtime-bench-"))

    _, captured = capture_spec(args.model, batch=2, sample_size=args.size)
    profile = profile_model(captured, model_name=args.model, repeats=3)
    plan = make_plan(profile, 2, steps=args.steps, warmup=args.warmup, profile_path=str(work / "profile.json"))
    profile.save(work / "profile.json")
    plan_path = plan.save(work / "plan.json")
    full_params = profile.peak_memory["param_bytes"]
    del captured
    print(f"# {args.model}, latent 2x4x{args.size}x{args.size}, {args.steps} DDIM steps, W={args.warmup}, "
          f"{profile.device_name}; eager forward {profile.eager_ms['median']:.0f} ms (1 thread)", flush=True)

    def config(label: str, **kw) -> RunConfig:
        return RunConfig(model=None, plan=str(plan_path), steps=args.steps, out_dir=str(work / label),
                         progress=False, **kw)

    runs: dict[str, list[dict]] = {"sequential": [], "2 threads": [], "async N=2": []}
    for _ in range(args.repeats):
        torch.set_num_threads(1)
        runs["sequential"].append(run_plan(config("seq", warmup=args.steps, reference=True)))
        torch.set_num_threads(2)
        runs["2 threads"].append(run_plan(config("seq2", warmup=args.steps, reference=True)))
        torch.set_num_threads(1)
        runs["async N=2"].append(run_plan(config("async", warmup=args.warmup, threads=1)))

    base = statistics.median(denoise_ms(r) for r in runs["sequential"])
    print("\n| configuration | processes x threads | denoising loop s (median) | each repeat s | speedup | ideal |")
    print("|---|---|---|---|---|---|")
    shape = {"sequential": "1 x 1", "2 threads": "1 x 2", "async N=2": "2 x 1"}
    for label, results in runs.items():
        total = statistics.median(denoise_ms(r) for r in results)
        ideal = ideal_speedup(args.steps, args.warmup, 2) if label == "async N=2" else 1.0
        each = ", ".join(f"{denoise_ms(r) / 1e3:.1f}" for r in results)
        print(f"| {label} | {shape[label]} | {total / 1e3:.1f} | {each} | {base / total:.2f}x | {ideal:.2f}x |")

    last = runs["async N=2"][-1]
    summary = last["summary"]
    measured_step = summary.get("async_step_ms", summary["step_ms"])["median"]
    print(f"\npredicted asynchronous step {plan.predicted['async_step_ms']:.0f} ms, measured "
          f"{measured_step:.0f} ms (median); predicted speedup {plan.predicted['speedup']:.2f}x")
    sent = summary["bytes_sent_per_step"]["median"]
    print(f"bytes sent per step: {format_bytes(sent)} measured (stale values point-to-point + eps broadcast); "
          f"plan's stale values {format_bytes(plan.bytes_per_step)}; AsyncDiff-style "
          f"broadcast of the same values {format_bytes(plan.broadcast_bytes_per_step)}")
    meta = json.loads(Path(last["report"]).read_text())["meta"]
    def listed(key: str) -> str:
        return ", ".join(format_bytes(b) for b in meta.get(f"{key}_per_rank", []))

    print(f"parameters held per rank: {listed('param_bytes')} vs a full replica {format_bytes(full_params)}")
    print(f"resident memory per rank after set-up: {listed('rss_after_setup')}; peak: {listed('peak_rss')} "
          f"(a process holding the full model: {format_bytes(full_params)} of weights alone)")
    print(f"(work files in {work})")


if __name__ == "__main__":
    sys.exit(main())
