"""Hybrid parallelism benchmark: sequential, N = 2 segments, B = 2 CFG-parallel and the planner's choice, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hybrid/run.py --model sd21-unet --size 32 --steps 20 --out benchmarks/hybrid/results
    .venv/bin/python benchmarks/hybrid/run.py --model tiny-unet2d-condition --steps 2 --out /tmp/hybrid   # smoke test

One guided DDIM loop (guidance 7.5; the denoiser batch is the unconditional and the
conditional half) run by: one process, one thread (sequential); 2 processes with a balanced
N = 2 plan; 2 processes as B = 2 groups of one segment (CFG-parallel, exact); the planner's
2-device choice. Each reports the wall time of the denoising loop (median of --repeats, fresh
processes), the speedup against sequential, bytes sent per step, and the relative L2 of the final
latent against sequential. Four-device hybrids cannot be timed on two cores: the script prints
their predicted speedup (from the profiles) and their fidelity from the single-process reference
schedule. Writes ``results.json`` and ``results.md`` under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import statistics
import time
from pathlib import Path

import torch

from asyncdiff_partition.core.hybrid_plan import format_candidates, make_hybrid_plan
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.schedule import world_size
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.hybrid import HybridDenoiser, segment_for_hybrid_rank
from asyncdiff_partition.runtime.launch import launch
from asyncdiff_partition.runtime.reference import ReferenceSchedule


def capture(name: str, rows: int, size: int | None):
    model = zoo.build_model(name)
    inputs = zoo.example_inputs(model, batch=rows, sample_size=size)
    return capture_model(model, inputs.args, inputs.kwargs, latent=inputs.latent)


def guided_loop(denoiser, feed: dict, latent: str, steps: int, guidance: float) -> tuple[torch.Tensor, float]:
    """DDIM with classifier-free guidance over the batch [uncond | cond]; (final latent half, seconds)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    half = feed[latent].shape[0] // 2
    x = feed[latent][:half].clone()
    denoiser.reset(scheduler.timesteps)
    begin = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            inputs = dict(feed, **{latent: torch.cat([x, x]), "timestep": torch.full_like(feed["timestep"], t.item())})
            eps = denoiser(inputs)
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x, time.perf_counter() - begin


class Unsplit:
    def __init__(self, captured):
        self.captured = captured

    def reset(self, timesteps):
        pass

    def __call__(self, inputs):
        return self.captured.graph_module(*[inputs[s.name] for s in self.captured.inputs])


def worker(blob: bytes, plan, feed: dict, steps: int, guidance: float) -> dict:
    """One rank of a 2-process run (HybridDenoiser covers B = 1 too)."""
    torch.set_num_threads(1)
    comm.init()
    captured = pickle.loads(blob)
    latent = captured.latent.name
    segment = segment_for_hybrid_rank(ready_segments(captured, plan, world_size=comm.world_size()), plan)
    denoiser = HybridDenoiser(segment, plan, input_names=[s.name for s in captured.inputs], latent=latent,
                              example=dict(zip((s.name for s in captured.inputs), captured.example)))
    del captured, segment
    x, seconds = guided_loop(denoiser, feed, latent, steps, guidance)
    sent = statistics.median(r["bytes_sent"] for r in denoiser.report())
    return {"x": x, "seconds": seconds, "bytes_per_step": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd21-unet")
    parser.add_argument("--size", type=int, default=32, help="latent size (32 = 256 px for SD)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, default=10.0, help="GB/s, for the planner")
    parser.add_argument("--out", default="benchmarks/hybrid/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    full, half = capture(args.model, 2, args.size), capture(args.model, 1, args.size)
    feed = {s.name: t for s, t in zip(full.inputs, full.example)}
    latent = full.latent.name
    prof_full = profile_model(full, model_name=args.model, warmup=1, repeats=3)
    prof_half = profile_model(half, model_name=args.model, warmup=1, repeats=3)
    rows = []
    x_seq, seconds = min((guided_loop(Unsplit(full), feed, latent, args.steps, args.guidance)
                          for _ in range(args.repeats)), key=lambda r: r[1])
    rows.append({"run": "sequential, 1 process", "devices": 1, "seconds": seconds, "bytes_per_step": 0, "rel_l2": 0.0})

    choice = make_hybrid_plan(prof_full, 2, sliced=prof_half, steps=args.steps, bandwidth_gbps=args.bandwidth)
    print(format_candidates(choice))
    by_name = {c.name: c for c in choice.candidates}

    def hybrid(c):  # a candidate's plan with its hybrid prediction (what make_hybrid_plan saves for the winner)
        return dataclasses.replace(c.plan, batch_parallel=c.batch_parallel,
                                   world_size=world_size(c.n_devices, c.stride, c.batch_parallel),
                                   predicted={**c.plan.predicted, "speedup": c.speedup, "ideal_speedup": c.ideal})

    runs = [("N = 2 segments", hybrid(by_name["B1 N2 S1"])), ("B = 2 CFG-parallel", hybrid(by_name["B2 N1 S1"])),
            (f"planner's choice ({choice.winner.name})", choice.plan)]
    for label, plan in runs:
        blob = pickle.dumps(half if plan.batch_parallel == 2 else full)
        results = [launch(worker, (blob, plan, feed, args.steps, args.guidance), 2, timeout_s=3600)[0]
                   for _ in range(args.repeats)]
        best = min(results, key=lambda r: r["seconds"])
        rel = float((best["x"] - x_seq).norm() / x_seq.norm())
        rows.append({"run": label, "devices": 2, "seconds": best["seconds"], "bytes_per_step": best["bytes_per_step"],
                     "rel_l2": rel, "predicted": plan.predicted["speedup"], "ideal": plan.predicted["ideal_speedup"]})
    four = make_hybrid_plan(prof_full, 4, sliced=prof_half, steps=args.steps, bandwidth_gbps=args.bandwidth)
    print(format_candidates(four))
    for c in four.candidates:  # predicted only; fidelity from the reference schedule
        captured = half if c.batch_parallel == 2 else full
        segments = split_graph(captured, place(build_op_graph(captured), c.plan.boundaries))
        schedule = ReferenceSchedule(segments, warmup=1, stride=c.stride, batch_parallel=c.batch_parallel,
                                     latent_input=latent)
        x, _ = guided_loop(schedule, feed, latent, args.steps, args.guidance)
        rows.append({"run": f"{c.name} (4 devices, predicted)", "devices": 4, "seconds": None, "bytes_per_step": None,
                     "rel_l2": float((x - x_seq).norm() / x_seq.norm()), "predicted": c.speedup, "ideal": c.ideal})
    base = rows[0]["seconds"]
    lines = ["| run | devices | wall s | speedup | predicted | ideal | bytes/step | rel. L2 vs sequential |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{base / r['seconds']:.2f}x" if r["seconds"] else "-"
        lines.append(f"| {r['run']} | {r['devices']} | {r['seconds'] or float('nan'):.2f} | {speed} | "
                     f"{r.get('predicted', 1.0):.2f}x | {r.get('ideal', 1.0):.2f}x | {r['bytes_per_step'] or 0:,.0f} | "
                     f"{r['rel_l2']:.2e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
