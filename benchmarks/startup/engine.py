"""Set-up of a first and of a repeated pipeline call on the engine, beside their sampling time and one process's.

    python benchmarks/pipelines/sd21.py --out /tmp/sd21
    OMP_NUM_THREADS=1 python benchmarks/startup/engine.py --model /tmp/sd21 --size 256 --steps 20 --repeats 2

Every repeat runs two fresh processes, interleaved (A B A B): A samples with the pipeline alone
(one thread), B parallelizes it on the engine (2 ranks of one thread, this process one thread)
and makes two calls of the same shape with two prompts. For each engine call, ``set-up`` is the
call's time outside the pipeline's own ``__call__`` (the first: record, capture, profile, plan,
split, ship, spawn; a repeat: finding its prepared structure) and ``sampling`` the pipeline's own
call (text encoder, loop with the ranks, VAE). Prints the medians and the ratios; ``--json`` keeps
every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CALL = dict(guidance_scale=7.5, output_type="pil")


def sequential(model: str, size: int, steps: int) -> dict:
    import torch

    from asyncdiff_partition.pipelines.loading import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(model)
    begin = time.perf_counter()
    pipe(prompt="a red cube", height=size, width=size, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0), **CALL)
    return {"sampling_s": time.perf_counter() - begin}


def engine(model: str, size: int, steps: int) -> dict:
    import torch

    from asyncdiff_partition import parallelize
    from asyncdiff_partition.pipelines.loading import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(model)
    parallelize(pipe, devices=2, warmup=1, threads=1)
    state = vars(pipe)["_asyncdiff_parallel"]
    calls = []
    for prompt in ("a red cube", "a blue ball"):
        begin = time.perf_counter()
        pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), **CALL)
        wall = time.perf_counter() - begin
        sampling = state.timings["sampling_s"]
        calls.append({"wall_s": wall, "sampling_s": sampling, "setup_s": wall - sampling, "counts": dict(state.counts),
                      "timings": dict(state.timings)})
    pipe.close()
    return {"calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", choices=["sequential", "engine"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(globals()[args.one](args.model, args.size, args.steps)))
        return
    runs: dict[str, list[dict]] = {"sequential": [], "engine": []}
    for _ in range(args.repeats):
        for kind in runs:  # interleaved, each in a fresh process
            done = subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size),
                                   "--steps", str(args.steps), "--one", kind], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(kind, runs[kind][-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    seq = statistics.median(r["sampling_s"] for r in runs["sequential"])
    print(f"\n{'call':<28} {'set-up s':>9} {'sampling s':>11} {'set-up/sampling':>16} {'vs one process':>15}")
    print(f"{'one process (no engine)':<28} {'':>9} {seq:>11.2f} {'':>16} {'1.00x':>15}")
    for i, label in enumerate(("engine, first call", "engine, repeated call")):
        setup = statistics.median(r["calls"][i]["setup_s"] for r in runs["engine"])
        sampling = statistics.median(r["calls"][i]["sampling_s"] for r in runs["engine"])
        print(f"{label:<28} {setup:>9.3f} {sampling:>11.2f} {setup / sampling:>15.2%} {seq / sampling:>14.2f}x")


if __name__ == "__main__":
    main()
