"""Hybrid parallelism benchmark: sequential, N = 2 segments, B = 2 CFG-parallel and the planner's choice, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hybrid/run.py --model sd21-unet --size 32 --steps 20 --out benchmarks/hybrid/results
    .venv/bin/python benchmarks/hybrid/run.py --model tiny-unet2d-condition --steps 2 --out /tmp/hybrid   # smoke test

One guided DDIM loop (guidance 7.5; the denoiser batch is the unconditional and the
conditional half) run by: one process, one thread (sequential); 2 processes with a balanced
N = 2 plan; 2 processes as B = 2 groups of one segment (CFG-parallel, exact); the planner's
2-device choice. Every configuration runs in fresh processes (the sequential one too), the
repeats interleaved (A B C D, A B C D); each rank loads only its own segment from a file, as the
ranks of ``run`` do. Each reports the wall time of the denoising loop (median of --repeats),
the speedup against sequential, bytes sent per step, and the relative L2 of the final latent
against sequential. Four-device hybrids cannot be timed on two cores: the script prints
their predicted speedup (from the profiles) and their fidelity from the single-process reference
schedule. Writes ``results.json`` and ``results.md`` under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from asyncdiff_partition.core.hybrid_plan import format_candidates, make_hybrid_plan
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.schedule import n_slots, slot_segment, world_size
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.fx.shipping import ship_segments
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.hybrid import HybridDenoiser
from asyncdiff_partition.runtime.launch import launch
from asyncdiff_partition.runtime.reference import ReferenceSchedule, UnsplitDenoiser


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


def rank_worker(shipped, plan, feed: dict, steps: int, guidance: float) -> dict:
    """One rank of a 2-process run: loads only its own segment, as ``run``'s ranks do."""
    torch.set_num_threads(1)
    comm.init()
    slot = comm.rank() % n_slots(plan.n_devices, plan.stride)
    segment, shell = shipped.load(slot_segment(slot, shipped.n_segments))
    names = [s.name for s in shell.inputs]
    denoiser = HybridDenoiser(segment, plan, input_names=names, latent=shell.latent.name,
                              example=dict(zip(names, shell.example)))
    latent = shell.latent.name
    del segment, shell
    x, seconds = guided_loop(denoiser, feed, latent, steps, guidance)
    sent = statistics.median(r["bytes_sent"] for r in denoiser.report())
    return {"x": x, "seconds": seconds, "bytes_per_step": sent}


def sequential_worker(path: str, feed: dict, steps: int, guidance: float) -> dict:
    """The unsplit model in a process of its own (Note [fresh processes] in benchmarks/runtime/run.py)."""
    torch.set_num_threads(1)
    with open(path, "rb") as handle:
        captured = pickle.load(handle)
    x, seconds = guided_loop(UnsplitDenoiser(captured), feed, captured.latent.name, steps, guidance)
    return {"x": x, "seconds": seconds, "bytes_per_step": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd21-unet")
    parser.add_argument("--size", type=int, default=32, help="latent size (32 = 256 px for SD)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved; medians shown")
    parser.add_argument("--bandwidth", type=float, default=10.0, help="GB/s, for the planner")
    parser.add_argument("--out", default="benchmarks/hybrid/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="asyncdiff-hybrid-bench-"))

    full, half = capture(args.model, 2, args.size), capture(args.model, 1, args.size)
    latent = full.latent.name
    feed = {s.name: t for s, t in zip(full.inputs, full.example)}
    prof_full = profile_model(full, model_name=args.model, warmup=1, repeats=3)
    prof_half = profile_model(half, model_name=args.model, warmup=1, repeats=3)
    print(f"# {args.model}, latent 2x{args.size}x{args.size}, {args.steps} DDIM steps, guidance {args.guidance}; "
          f"eager forward {prof_full.eager_ms['median']:.0f} ms at batch 2, {prof_half.eager_ms['median']:.0f} ms "
          f"at batch 1 (1 thread)", flush=True)

    choice = make_hybrid_plan(prof_full, 2, sliced=prof_half, steps=args.steps, bandwidth_gbps=args.bandwidth)
    print(format_candidates(choice))
    by_name = {c.name: c for c in choice.candidates}

    def hybrid(c):  # a candidate's plan with its hybrid prediction (what make_hybrid_plan saves for the winner)
        return dataclasses.replace(c.plan, batch_parallel=c.batch_parallel,
                                   world_size=world_size(c.n_devices, c.stride, c.batch_parallel),
                                   predicted={**c.plan.predicted, "speedup": c.speedup, "ideal_speedup": c.ideal})

    four = make_hybrid_plan(prof_full, 4, sliced=prof_half, steps=args.steps, bandwidth_gbps=args.bandwidth)
    print(format_candidates(four))
    # Every process gets its part from files: the whole capture for the sequential process, one
    # segment per rank otherwise; this process then lets go of the models before anything is timed
    # (and reads both captures back for the four-device reference runs at the end).
    whole, sliced = work / "full.pkl", work / "half.pkl"
    whole.write_bytes(pickle.dumps(full))
    sliced.write_bytes(pickle.dumps(half))
    runs = [("sequential, 1 process", None), ("N = 2 segments", hybrid(by_name["B1 N2 S1"])),
            ("B = 2 CFG-parallel", hybrid(by_name["B2 N1 S1"])), (f"planner's choice ({choice.winner.name})", choice.plan)]
    shipped = {}
    for index, (label, plan) in enumerate(runs[1:]):
        captured = half if plan.batch_parallel == 2 else full
        ready = ready_segments(captured, plan, world_size=plan.world_size)
        (work / f"run{index}").mkdir()
        shipped[label] = ship_segments(ready, work / f"run{index}", captured)
        del ready
    del full, half, captured
    gc.collect()

    results: dict[str, list[dict]] = {label: [] for label, _ in runs}
    for repeat in range(args.repeats):  # interleaved: A B C D, A B C D, ...
        for label, plan in runs:
            if plan is None:
                result = launch(sequential_worker, (str(whole), feed, args.steps, args.guidance), 1, timeout_s=3600)[0]
            else:
                result = launch(rank_worker, (shipped[label], plan, feed, args.steps, args.guidance), 2,
                                timeout_s=3600)[0]
            results[label].append(result)
            print(f"repeat {repeat + 1}: {label}: {result['seconds']:.2f} s", flush=True)
    x_seq = results[runs[0][0]][0]["x"]
    rows = []
    for label, plan in runs:
        repeats = results[label]
        rows.append({"run": label, "devices": 1 if plan is None else 2,
                     "seconds": statistics.median(r["seconds"] for r in repeats),
                     "repeats_s": [r["seconds"] for r in repeats],
                     "bytes_per_step": repeats[0]["bytes_per_step"],
                     "rel_l2": float((repeats[0]["x"] - x_seq).norm() / x_seq.norm()),
                     "predicted": 1.0 if plan is None else plan.predicted["speedup"],
                     "ideal": 1.0 if plan is None else plan.predicted["ideal_speedup"]})
    full, half = (pickle.loads(path.read_bytes()) for path in (whole, sliced))
    for c in four.candidates:  # predicted only; fidelity from the reference schedule
        captured = half if c.batch_parallel == 2 else full
        segments = split_graph(captured, place(build_op_graph(captured), c.plan.boundaries))
        schedule = ReferenceSchedule(segments, warmup=1, stride=c.stride, batch_parallel=c.batch_parallel,
                                     latent_input=latent)
        x, _ = guided_loop(schedule, feed, latent, args.steps, args.guidance)
        rows.append({"run": f"{c.name} (4 devices, predicted)", "devices": 4, "seconds": None, "bytes_per_step": None,
                     "rel_l2": float((x - x_seq).norm() / x_seq.norm()), "predicted": c.speedup, "ideal": c.ideal})
        print(f"{c.name}: rel. L2 {rows[-1]['rel_l2']:.2e}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    lines = ["| run | devices | wall s (median) | repeats | speedup | predicted | ideal | bytes/step | rel. L2 vs sequential |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{base / r['seconds']:.2f}x" if r["seconds"] else "-"
        wall = f"{r['seconds']:.2f}" if r["seconds"] else "-"
        each = ", ".join(f"{s:.1f}" for s in r.get("repeats_s", [])) or "-"
        sent = f"{r['bytes_per_step']:,.0f}" if r["bytes_per_step"] is not None else "-"
        lines.append(f"| {r['run']} | {r['devices']} | {wall} | {each} | {speed} | {r['predicted']:.2f}x | "
                     f"{r['ideal']:.2f}x | {sent} | {r['rel_l2']:.2e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
