"""Compiled vs eager segments on CPU: start-up and per-step cost, sequential and asynchronous N = 2.

Same settings as run.py (SD 1.5 UNet architecture, 8x8 latent, batch 2, 50 DDIM steps, W = 1,
one thread per rank); every configuration runs in a fresh process through the CLI
(Note [fresh processes] in run.py), repeats interleaved (eager, compiled, eager, compiled ...):

    sequential          1 process, the unsplit schedule (run --reference --warmup T)
    sequential compiled the same with --compile
    async N=2           2 processes (run)
    async N=2 compiled  the same with --compile (each rank compiles its segment at set-up)

Per configuration: process wall time (set-up + capture + compile + loop + decode), the loop,
the median step and the first step (the reference schedule compiles lazily, in its first step;
the ranks compile at set-up). What compilation costs at start-up is the process time it adds
beyond what its faster steps save: (process_c - process_e) + T * (step_e - step_c).

    python benchmarks/runtime/compile.py --model sd15-unet --size 8 --steps 50 --repeats 2
    python benchmarks/runtime/compile.py --model tiny-unet2d-condition --steps 2 --repeats 1   # does it work
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from asyncdiff_partition.app.api import capture_spec
from asyncdiff_partition.app.report import load_report
from asyncdiff_partition.core.plan import make_plan
from asyncdiff_partition.fx.profiler import profile_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-unet")
    parser.add_argument("--size", type=int, default=8, help="latent height/width")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration; medians shown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="asyncdiff-compile-bench-"))

    _, captured = capture_spec(args.model, batch=2, sample_size=args.size)
    profile = profile_model(captured, model_name=args.model, repeats=3)
    profile.save(work / "profile.json")
    plan_path = make_plan(profile, 2, steps=args.steps, warmup=args.warmup,
                          profile_path=str(work / "profile.json")).save(work / "plan.json")
    del captured
    print(f"# {args.model}, latent 2x4x{args.size}x{args.size}, {args.steps} DDIM steps, W={args.warmup}, "
          f"{profile.device_name}; eager forward {profile.eager_ms['median']:.0f} ms (1 thread)", flush=True)

    def run(label: str, *options: str) -> dict:
        """One configuration in a fresh process; its report plus the process's wall time."""
        out = work / label.replace(" ", "-")
        command = [sys.executable, "-m", "asyncdiff_partition.cli.main", "--threads", "1", "run", "--plan",
                   str(plan_path), "--steps", str(args.steps), "--out", str(out), *options]
        begin = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = load_report(out / "report.json")
        report["process_s"] = time.perf_counter() - begin
        return report

    configs = {
        "sequential": ("--reference", "--warmup", str(args.steps)),
        "sequential compiled": ("--reference", "--warmup", str(args.steps), "--compile"),
        "async N=2": ("--warmup", str(args.warmup)),
        "async N=2 compiled": ("--warmup", str(args.warmup), "--compile"),
    }
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    for _ in range(args.repeats):
        for label, options in configs.items():
            runs[label].append(run(label, *options))

    def median(label: str, key) -> float:
        return statistics.median(key(r) for r in runs[label])

    process = lambda r: r["process_s"]  # noqa: E731
    loop = lambda r: r["summary"]["total_ms"] / 1e3  # noqa: E731
    step = lambda r: _step_ms(r["summary"])  # noqa: E731
    first = lambda r: _first_step_ms(r)  # noqa: E731
    print("\n| configuration | process s | denoising loop s | median step ms | first step ms | each repeat, process s |")
    print("|---|---|---|---|---|---|")
    for label in configs:
        each = ", ".join(f"{process(r):.1f}" for r in runs[label])
        print(f"| {label} | {median(label, process):.1f} | {median(label, loop):.2f} | {median(label, step):.1f} | "
              f"{median(label, first):.0f} | {each} |")
    for base in ("sequential", "async N=2"):
        fast = f"{base} compiled"
        per_step = median(base, step) - median(fast, step)
        saved = args.steps * per_step / 1e3
        startup = (median(fast, process) - median(base, process)) + saved
        print(f"\n{base}: compiling costs {startup:.1f} s at start-up and saves {per_step:.1f} ms per step "
              f"({saved:.2f} s over {args.steps} steps; pays off after {startup / per_step * 1e3:.0f} steps)"
              if per_step > 0 else f"\n{base}: compiled steps are not faster here ({per_step:.1f} ms per step)")
    print(f"(work files in {work})")
    return 0


def _step_ms(summary: dict) -> float:
    """Median step after warm-up (all steps where every step is a warm-up step: the sequential runs)."""
    after = summary.get("async_step_ms") or {}
    median = after.get("median", float("nan"))
    return median if median == median else summary["step_ms"]["median"]


def _first_step_ms(report: dict) -> float:
    """The slowest rank's first step (where a lazily compiled reference schedule compiles)."""
    first = [r for rank in report["ranks"] for r in rank["steps"] if int(r.get("step", -1)) == 0]
    return max((float(r["step_ms"]) if "step_ms" in r else
                float(r.get("compute_ms", 0)) + float(r.get("wait_ms", 0)) + float(r.get("comm_ms", 0)) for r in first),
               default=float("nan"))


if __name__ == "__main__":
    sys.exit(main())
