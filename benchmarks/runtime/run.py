"""Runtime benchmark: sequential vs asynchronous N=2 denoising of an SD-architecture UNet on CPU.

Measured in one run, one after the other, on the same pipeline, seed and steps:
  sequential   1 process, 1 thread, the unsplit model (the reference schedule with W >= T)
  2 threads    1 process, 2 threads, the unsplit model (what a CPU user would do instead)
  async N=2    2 processes, 1 thread each, the plan made from a profile taken in this run

    python benchmarks/runtime/run.py --model sd15-unet --size 8 --steps 50 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from asyncdiff_partition.app.api import capture_spec
from asyncdiff_partition.app.report import load_report
from asyncdiff_partition.core.plan import ideal_speedup, make_plan
from asyncdiff_partition.core.summary import format_bytes
from asyncdiff_partition.fx.profiler import profile_model


def denoise_ms(result: dict) -> float:
    """Total of the per-step times (the denoising loop alone: no VAE decode, no set-up)."""
    return result["summary"]["total_ms"]


# Note [fresh processes]
# On this project's CPU machine (a VM) the same single-thread forward of a weight-bound model ran
# 1.3 s or 0.63 s depending on where in memory its weights landed: in one process, a third
# pipeline built after two others was 2x faster, same image, one core busy. Every configuration
# therefore runs in a process of its own, as the asynchronous ranks always do, so that no
# configuration inherits another's memory.


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

    def run(label: str, threads: int, *options: str) -> dict:
        """One configuration in a fresh process (Note [fresh processes]); its run report."""
        out = work / label
        command = [sys.executable, "-m", "asyncdiff_partition.cli.main", "--threads", str(threads), "run",
                   "--plan", str(plan_path), "--steps", str(args.steps), "--out", str(out), *options]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return load_report(out / "report.json")

    runs: dict[str, list[dict]] = {"sequential": [], "2 threads": [], "async N=2": []}
    for _ in range(args.repeats):
        runs["sequential"].append(run("seq", 1, "--reference", "--warmup", str(args.steps)))
        runs["2 threads"].append(run("seq2", 2, "--reference", "--warmup", str(args.steps)))
        runs["async N=2"].append(run("async", 1, "--warmup", str(args.warmup)))

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
    summary, meta = last["summary"], last["meta"]
    measured_step = summary.get("async_step_ms", summary["step_ms"])["median"]
    print(f"\npredicted asynchronous step {plan.predicted['async_step_ms']:.0f} ms, measured "
          f"{measured_step:.0f} ms (median); predicted speedup {plan.predicted['speedup']:.2f}x")
    sent = summary["bytes_sent_per_step"]["median"]
    print(f"bytes sent per step: {format_bytes(sent)} measured (stale values point-to-point + eps broadcast); "
          f"plan's stale values {format_bytes(plan.bytes_per_step)}; AsyncDiff-style "
          f"broadcast of the same values {format_bytes(plan.broadcast_bytes_per_step)}")

    def listed(key: str) -> str:
        return ", ".join(format_bytes(b) for b in meta.get(f"{key}_per_rank", []))

    print(f"parameters held per rank: {listed('param_bytes')} vs a full replica {format_bytes(full_params)}")
    print(f"resident memory per rank after the run: {listed('rss_after_run')}; peak: {listed('peak_rss')} "
          f"vs the sequential process's peak {format_bytes(runs['sequential'][-1]['meta']['peak_rss_per_rank'][0])}")
    print(f"(work files in {work})")


if __name__ == "__main__":
    sys.exit(main())
