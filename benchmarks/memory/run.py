"""Peak memory per rank against one process: the SD 2.1-architecture pipeline at 256 px, N = 2 and N = 4.

    python benchmarks/pipelines/sd21.py --out /tmp/sd21
    python benchmarks/memory/run.py --model /tmp/sd21 --size 256 --steps 4

Each configuration runs in a fresh process (one thread per process): ``one process`` loads the
pipeline and samples; ``N ranks`` parallelizes it on the engine (devices=N; oversubscribed on this
2-core machine, which is fine for memory) and samples, and every rank reports its peak resident
memory (VmHWM) and the parameter bytes it holds; the launching process (which keeps the pipeline,
its encoders and decoder) is shown apart. Each engine output is compared with the single-process
reference schedule of the same plan (same cached profile): ``equal`` is exact equality of the
final latents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def one(model: str, size: int, steps: int, devices: int, cache: str, out: str) -> dict:
    import torch

    from asyncdiff_partition import parallelize
    from asyncdiff_partition.pipelines.loading import load_pipeline
    from asyncdiff_partition.runtime.memory import peak_resident_bytes

    torch.set_num_threads(1)
    os.environ["ASYNCDIFF_CACHE"] = cache
    pipe = load_pipeline(model)
    call = dict(prompt="a red cube", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                output_type="latent")
    if devices == 0:  # one process, the pipeline alone
        latents = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        torch.save(latents, out)
        return {"peak_rss": peak_resident_bytes()}
    if devices < 0:  # the reference schedule of the same plan, one process
        parallelize(pipe, devices=-devices, reference=True, warmup=1)
        torch.save(pipe(**call, generator=torch.Generator().manual_seed(0)).images, out)
        return {"peak_rss": peak_resident_bytes()}
    parallelize(pipe, devices=devices, warmup=1, threads=1)
    latents = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.save(latents, out)
    state = vars(pipe)["_asyncdiff_parallel"]
    ranks = {rank: {k: r.get(k) for k in ("peak_rss", "param_bytes", "cuda_peak_allocated")}
             for rank, r in state.reports().items()}
    pipe.close()
    return {"peak_rss": peak_resident_bytes(), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--devices", default="2,4")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.size, args.steps, args.one, args.cache, args.out)))
        return
    import torch

    tmp = tempfile.mkdtemp(prefix="asyncdiff-memory-")
    cache = os.path.join(tmp, "cache")

    def run(devices: int) -> tuple[dict, str]:
        out = os.path.join(tmp, f"latents{devices}.pt")
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size), "--steps",
                               str(args.steps), "--one", str(devices), "--cache", cache, "--out", out],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1]), out

    alone, _ = run(0)
    gb = 2**30
    print(f"one process: peak resident {alone['peak_rss'] / gb:.2f} GiB")
    rows = []
    for devices in [int(d) for d in args.devices.split(",")]:
        engine, out = run(devices)
        _, ref = run(-devices)
        equal = torch.equal(torch.load(out), torch.load(ref))
        for rank, r in sorted(engine["ranks"].items(), key=lambda kv: int(kv[0])):
            rows.append((devices, rank, r["peak_rss"] / gb, r["param_bytes"] / gb, r["peak_rss"] / alone["peak_rss"], equal))
        print(f"N={devices}: launching process peak {engine['peak_rss'] / gb:.2f} GiB; output equals the reference: {equal}")
    print("\n| ranks | rank | peak resident GiB | parameters held GiB | peak / one process | output = reference |")
    print("|---|---|---|---|---|---|")
    for devices, rank, peak, params, ratio, equal in rows:
        print(f"| {devices} | {rank} | {peak:.2f} | {params:.2f} | {ratio:.2f}x | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
