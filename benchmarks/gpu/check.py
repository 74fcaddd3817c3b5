"""The device check: capture, profile, schedule, two ranks on one device, memory and compiled timing, in one run.

    python benchmarks/gpu/check.py --device cuda --out $OUT          # on the GPU machine (check.sh)
    python benchmarks/gpu/check.py --device cpu --small --out out/gpu-check   # rehearsal here

Steps (README.md): 1 profile with CUDA events vs the eager forward; 2 the reference schedule
(W >= T equals the unsplit model; W = 1 against sequential and against CPU fp32 at a small
size); 3 two ranks on the one device (gloo, transfers staged through host memory) against the
reference; 4 per-rank device memory (a rank holds its segment, not a replica); 5 every segment
alone and the whole step, eager and compiled. Every figure goes to ``check.json`` and a short
``check.md`` under ``--out``, rewritten after every step, so a run cut short still reports
what it did. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks.py, for the spawned ranks

import ranks  # noqa: E402

# SD 2.1's block layout at a size that runs in seconds on one CPU core (--small).
SMALL_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, use_linear_projection=True,
)


class Results:
    """Figures and checks, written to check.json / check.md after every step."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out, self.data = out, {"meta": meta, "steps": {}, "checks": [], "errors": []}
        out.mkdir(parents=True, exist_ok=True)
        self.begin = time.perf_counter()

    def step(self, name: str, figures: dict[str, Any]) -> None:
        figures["elapsed_s"] = round(time.perf_counter() - self.begin, 1)
        self.data["steps"][name] = figures
        self.write()

    def check(self, name: str, value: float, limit: float, *, below: bool = True, note: str = "") -> bool:
        ok = bool(value <= limit if below else value >= limit)
        self.data["checks"].append({"name": name, "value": value, "limit": limit,
                                    "rule": "<=" if below else ">=", "ok": ok, "note": note})
        print(f"  check {'ok  ' if ok else 'FAIL'} {name}: {value:.4g} {'<=' if below else '>='} {limit:g} {note}",
              flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.data["checks"]) and not self.data["errors"]

    def write(self) -> None:
        from asyncdiff_partition.core.files import write_json_atomic

        self.data["passed"] = self.passed
        self.data["elapsed_s"] = round(time.perf_counter() - self.begin, 1)
        write_json_atomic(self.out / "check.json", self.data)
        path = self.out / "check.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(markdown(self.data), encoding="utf-8")
        tmp.replace(path)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Any, dev: torch.device, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        sync(dev)
        begin = time.perf_counter()
        fn()
        sync(dev)
        samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def build(args: argparse.Namespace, dev: torch.device, dtype: torch.dtype, size: int) -> tuple[Any, Any]:
    """The model on ``dev`` in ``dtype`` and its capture at latent ``size``, batch 2."""
    from asyncdiff_partition.fx.capture import capture_model
    from asyncdiff_partition.pipelines import zoo

    if args.small:
        import diffusers

        torch.manual_seed(0)
        model = diffusers.UNet2DConditionModel(**SMALL_CONFIG).eval()
    else:
        model = zoo.build_model(args.model)
    model = model.to(device=dev, dtype=dtype)
    inputs = zoo.example_inputs(model, batch=2, sample_size=size)
    return model, capture_model(model, inputs.args, inputs.kwargs, latent=inputs.latent)


def feed_of(captured: Any) -> dict[str, torch.Tensor]:
    return {spec.name: t for spec, t in zip(captured.inputs, captured.example)}


def timesteps_for(steps: int) -> list[int]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--small", action="store_true", help="a tiny SD 2.1-layout UNet (rehearsal)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out/gpu-check")
    parser.add_argument("--model", default="sd21-unet", help="zoo model (ignored with --small)")
    parser.add_argument("--size", type=int, default=None, help="latent size (default 64 = 512 px; 8 with --small)")
    parser.add_argument("--cpu-size", type=int, default=None, help="latent size of the CPU fp32 comparison (16; 8)")
    parser.add_argument("--dtype", default=None, help="float16 (default on cuda) or float32")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps T (default 6; 4 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 10 on cuda, 3 on cpu)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled timings of step 5")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the compiled timings when this much time has gone before step 5")
    args = parser.parse_args()

    from asyncdiff_partition.fx.profiler import library_versions

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu --small to rehearse", file=sys.stderr)
        return 1
    if dev.type == "cuda":
        dev = torch.device("cuda", 0)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    size = args.size or (8 if args.small else 64)
    cpu_size = args.cpu_size or (8 if args.small else 16)
    steps = args.steps or (4 if args.small else 6)
    repeats = args.repeats or (10 if dev.type == "cuda" else 3)
    torch.backends.cudnn.allow_tf32 = False  # fp32 comparisons against the CPU mean fp32 on both
    torch.backends.cuda.matmul.allow_tf32 = False
    from asyncdiff_partition.fx.compile import cpp_compiler

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "versions": library_versions(), "cuda": torch.version.cuda, "model": "small SD 2.1 layout" if args.small
            else args.model, "latent": [2, 4, size, size], "dtype": str(dtype).replace("torch.", ""),
            "steps": steps, "repeats": repeats, "cpu_size": cpu_size, "threads": torch.get_num_threads(),
            "cpp_compiler": cpp_compiler(), "command": " ".join(sys.argv)}
    results = Results(Path(args.out), meta)
    print(f"device check on {meta['device_name']} ({meta['device']}), {meta['model']}, latent {meta['latent']} "
          f"{meta['dtype']}, T={steps}; writing {results.out}", flush=True)
    timesteps = timesteps_for(steps)
    state: dict[str, Any] = {}
    for name, fn in (("1 profile", step_profile), ("2 reference", step_reference), ("3 ranks", step_ranks),
                     ("5 timing", step_timing)):
        print(f"step {name}", flush=True)
        try:
            fn(args, dev, dtype, size, cpu_size, timesteps, repeats, results, state)
        except Exception as error:  # noqa: BLE001 - report it and go on with the next step
            traceback.print_exc()
            results.data["errors"].append({"step": name, "error": f"{type(error).__name__}: {error}"})
            results.write()
        gc.collect()
    if (results.out / "profile.json").is_file():
        import predict

        sys.argv = ["predict.py", "--profile", str(results.out / "profile.json"), "--out", str(results.out / "predicted.md")]
        try:
            predict.main()
        except Exception as error:  # noqa: BLE001 - the check's own figures stand without it
            results.data["errors"].append({"step": "predict", "error": f"{type(error).__name__}: {error}"})
    results.write()
    print((results.out / "check.md").read_text(), flush=True)
    return 0 if results.passed else 1


def step_profile(args, dev, dtype, size, cpu_size, timesteps, repeats, results, state) -> None:
    """1: capture at the full size, profile node by node (CUDA events), node sum vs the eager forward."""
    from asyncdiff_partition.core.plan import make_plan
    from asyncdiff_partition.fx.profiler import profile_model

    begin = time.perf_counter()
    model, captured = build(args, dev, dtype, size)
    capture_s = time.perf_counter() - begin
    profile = profile_model(captured, model_name=meta_name(args), device=str(dev), warmup=2, repeats=min(repeats, 5))
    plan = make_plan(profile, 2, steps=len(timesteps), warmup=1)
    state.update(model=model, captured=captured, profile=profile, plan=plan)
    profile.save(results.out / "profile.json")  # for predict.py: the multi-GPU predictions
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    results.step("1 profile", {
        "capture_s": capture_s, "capture_method": captured.method, "nodes": len(profile.costs),
        "param_bytes": params, "node_sum_ms": profile.node_ms_sum, "eager_ms": profile.eager_ms["median"],
        "accuracy": profile.accuracy, "peak_memory": profile.peak_memory, "plan_boundaries": plan.boundaries,
        "plan_segment_ms": [s.compute_ms for s in plan.segments],
        "plan_predicted": plan.predicted,
    })
    if not args.small:  # a tiny model's eager forward is mostly Python around the ops: no bound there
        results.check("profile: node sum / eager forward", profile.accuracy, 0.5, below=False,
                      note="(per-node events vs one forward; 0.5-2 expected)")
        results.check("profile: node sum / eager forward (upper)", profile.accuracy, 2.0)


def meta_name(args) -> str:
    return "small-sd21-layout" if args.small else args.model


def step_reference(args, dev, dtype, size, cpu_size, timesteps, repeats, results, state) -> None:
    """2: the reference schedule on the device: W >= T equals the unsplit model; W = 1 against it;
    then W = 1 on the device and on the CPU in fp32 at a small size."""
    from asyncdiff_partition.core.placement import place
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.ready import ready_segments
    from asyncdiff_partition.fx.split import split_graph
    from asyncdiff_partition.runtime.reference import ReferenceSchedule, UnsplitDenoiser

    captured, plan = state["captured"], state["plan"]
    segments = ready_segments(captured, plan, world_size=2)  # what the ranks of step 3 are shipped
    state["segments"] = segments
    feed = feed_of(captured)
    latent = captured.latent.name
    unsplit_eps, unsplit_x = ranks.sample(UnsplitDenoiser(captured), feed, latent, timesteps)
    exact_eps, exact_x = ranks.sample(ReferenceSchedule(segments, warmup=len(timesteps)), feed, latent, timesteps)
    async_eps, async_x = ranks.sample(ReferenceSchedule(segments, warmup=1), feed, latent, timesteps)
    state.update(reference_eps=async_eps, reference_x=async_x, feed=feed)
    exact = max(rel_l2(a, b) for a, b in zip(exact_eps, unsplit_eps))
    figures = {"split_vs_unsplit_eps_rel_l2_max": exact,
               "split_vs_unsplit_eps_max_abs": max(float((a - b).abs().max()) for a, b in zip(exact_eps, unsplit_eps)),
               "w1_vs_sequential_eps_rel_l2": [rel_l2(a, b) for a, b in zip(async_eps, unsplit_eps)],
               "w1_vs_sequential_x_rel_l2": rel_l2(async_x, unsplit_x)}
    tolerance = 1e-3 if dtype == torch.float16 else 1e-5
    results.check("reference W>=T vs unsplit model, eps rel L2 (max over steps)", exact, tolerance,
                  note=f"({figures['split_vs_unsplit_eps_max_abs']:.2e} max abs)")
    # W = 1 against sequential is the asynchronous approximation itself (random weights: large); reported only.
    # Same model, fp32, small latent: on the device and on the CPU.
    small: dict[str, Any] = {}
    for where in (dev, torch.device("cpu")):
        model, cap = build(args, where, torch.float32, cpu_size)
        segs = split_graph(cap, place(build_op_graph(cap), _scaled_boundaries(plan, cap)))
        small[where.type] = ranks.sample(ReferenceSchedule(segs, warmup=1), feed_of(cap), cap.latent.name, timesteps)
        del model, cap, segs
    (dev_eps, dev_x), (cpu_eps, cpu_x) = small[dev.type], small["cpu"]
    figures["fp32_small_device_vs_cpu_x_rel_l2"] = rel_l2(dev_x, cpu_x)
    figures["fp32_small_device_vs_cpu_eps_rel_l2_max"] = max(rel_l2(a, b) for a, b in zip(dev_eps, cpu_eps))
    results.step("2 reference", figures)
    results.check("W=1 schedule, fp32 small size: device vs CPU, final latent rel L2",
                  figures["fp32_small_device_vs_cpu_x_rel_l2"], 1e-3)


def _scaled_boundaries(plan, captured) -> list[int]:
    """The plan's cut positions for the same model captured at another size (same graph order)."""
    from asyncdiff_partition.fx.opgraph import build_op_graph

    n = len(build_op_graph(captured))
    if n == plan.boundaries[-1]:
        return list(plan.boundaries)
    return [round(b * n / plan.boundaries[-1]) for b in plan.boundaries]


def step_ranks(args, dev, dtype, size, cpu_size, timesteps, repeats, results, state) -> None:
    """3 and 4: two ranks on the one device against the reference; device memory per rank."""
    from asyncdiff_partition.fx.device_move import move_captured
    from asyncdiff_partition.fx.shipping import ship_segments
    from asyncdiff_partition.runtime.launch import launch

    captured, plan, segments = state["captured"], state["plan"], state["segments"]
    feed = {k: v.cpu() for k, v in state["feed"].items()}
    full = state["profile"].peak_memory["param_bytes"]
    with tempfile.TemporaryDirectory(prefix="asyncdiff-check-") as directory:
        move_captured(captured, "cpu")  # the ranks load their segment from host files
        shipped = ship_segments(segments, directory, captured)
        move_captured(captured, dev)
        begin = time.perf_counter()
        out = launch(ranks.run_rank, (shipped, plan, str(dev), feed, timesteps, 1, 300.0), 2, timeout_s=300.0)
        wall = time.perf_counter() - begin
    tolerance = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    figures: dict[str, Any] = {"launch_s": wall, "tolerance": tolerance, "ranks": {}}
    worst = 0.0
    for rank, result in sorted(out.items()):
        diffs = [rel_l2(a, b) for a, b in zip(result["eps"], state["reference_eps"])]
        close = all(torch.allclose(a, b.cpu(), **tolerance) for a, b in zip(result["eps"], state["reference_eps"]))
        worst = max(worst, *diffs, 0.0 if close else float("inf"))
        figures["ranks"][rank] = {"eps_rel_l2_vs_reference": diffs, "allclose": close, "memory": result["memory"],
                                  "compute_ms_median": statistics.median(result["compute_ms"]),
                                  "comm_ms_median": statistics.median(result["comm_ms"])}
    results.step("3 ranks", figures)
    results.check("2 ranks on one device vs reference, eps rel L2 (max)", worst,
                  1e-3 if dtype == torch.float16 else 1e-5)
    memory = {"full_param_bytes": full, "per_rank": {r: v["memory"] for r, v in figures["ranks"].items()}}
    for rank, m in memory["per_rank"].items():
        share = m["segment_param_bytes"]
        results.check(f"rank {rank}: real weight bytes after the move / its segment's", m["real_bytes_after_move"] / share,
                      1.05, note="(stand-ins stayed one element)")
        if "setup_allocated" in m:
            results.check(f"rank {rank}: device memory after set-up / full weights", m["setup_allocated"] / full, 0.8,
                          note=f"(segment {share / 2**20:.0f} MiB of {full / 2**20:.0f} MiB)")
            results.check(f"rank {rank}: device memory after set-up / (segment + 256 MiB)",
                          m["setup_allocated"] / (share + 256 * 2**20), 1.0)
    results.step("4 memory", memory)


def step_timing(args, dev, dtype, size, cpu_size, timesteps, repeats, results, state) -> None:
    """5: each segment alone and the whole step, eager and compiled (compile time = start-up)."""
    from asyncdiff_partition.fx.compile import compile_segment

    captured, segments = state["captured"], state["segments"]
    inputs = state["feed"]
    values: dict[str, Any] = {}
    figures: dict[str, Any] = {"segments": []}
    args_of = []
    with torch.no_grad():
        for segment in segments:
            call_args = [inputs[n] for n in segment.inputs] + [values[n] for n in segment.receives]
            args_of.append(call_args)
            values.update(zip(segment.outputs, segment.module(*call_args)))
            figures["segments"].append({"eager_ms": statistics.median(
                time_ms(lambda s=segment, a=call_args: s.module(*a), dev, repeats))})
        flat = [inputs[s.name] for s in captured.inputs]
        figures["step_eager_ms"] = statistics.median(time_ms(lambda: captured.graph_module(*flat), dev, repeats))
        results.step("5 timing", figures)
        spent = time.perf_counter() - results.begin
        if args.no_compile or spent > args.budget_s:
            figures["compiled"] = f"skipped ({'--no-compile' if args.no_compile else f'{spent:.0f} s spent'})"
            results.step("5 timing", figures)
            return
        compiled = []
        for segment, call_args, row in zip(segments, args_of, figures["segments"]):
            fast = compile_segment(segment.module, dev)
            if fast is segment.module:
                figures["compiled"] = "skipped (no compiler here)"
                results.step("5 timing", figures)
                return
            begin = time.perf_counter()
            out = fast(*call_args)
            sync(dev)
            row["compile_s"] = time.perf_counter() - begin
            row["mode"] = fast.mode
            row["compiled_ms"] = statistics.median(time_ms(lambda f=fast, a=call_args: f(*a), dev, repeats))
            ref = segment.module(*call_args)
            row["compiled_vs_eager_rel_l2"] = max(rel_l2(a, b) for a, b in zip(out, ref) if isinstance(a, torch.Tensor))
            compiled.append(fast)
            results.step("5 timing", figures)

        def step_compiled() -> None:
            made: dict[str, Any] = {}
            for segment, fast in zip(segments, compiled):
                made.update(zip(segment.outputs, fast(*([inputs[n] for n in segment.inputs] +
                                                        [made[n] for n in segment.receives]))))

        figures["step_compiled_ms"] = statistics.median(time_ms(step_compiled, dev, repeats))
    figures["compiled"] = "done"
    results.step("5 timing", figures)
    for i, row in enumerate(figures["segments"]):
        results.check(f"segment {i}: compiled vs eager output rel L2", row["compiled_vs_eager_rel_l2"],
                      1e-2 if dtype == torch.float16 else 1e-4)


def markdown(data: dict[str, Any]) -> str:
    """The short table: setting, checks, then the figures a reader wants first."""
    meta, steps = data["meta"], data["steps"]
    lines = [f"# Device check: {meta['device_name']} ({meta['device']})", "",
             f"{meta['date']}, torch {meta['versions'].get('torch')}, CUDA {meta['cuda']}, diffusers "
             f"{meta['versions'].get('diffusers')}; {meta['model']}, latent {'x'.join(map(str, meta['latent']))} "
             f"{meta['dtype']}, T = {meta['steps']}. Passed: **{data.get('passed')}**.", "",
             "| check | value | rule | ok |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']:.4g} | {c['rule']} {c['limit']:g} | {'yes' if c['ok'] else '**no**'} |"
              for c in data["checks"]]
    lines += ["", "| figure | value |", "|---|---|"]
    p = steps.get("1 profile", {})
    if p:
        lines += [f"| eager forward | {p['eager_ms']:.2f} ms |", f"| node sum (profile) | {p['node_sum_ms']:.2f} ms |",
                  f"| weights | {p['param_bytes'] / 2**20:.0f} MiB |", f"| capture | {p['capture_s']:.1f} s ({p['capture_method']}) |"]
    m = steps.get("4 memory", {})
    for rank, r in m.get("per_rank", {}).items():
        dev_mem = f", device after set-up {r['setup_allocated'] / 2**20:.0f} MiB, peak {r['run_peak'] / 2**20:.0f} MiB" \
            if "setup_allocated" in r else ""
        lines.append(f"| rank {rank} | segment weights {r['segment_param_bytes'] / 2**20:.1f} MiB{dev_mem} |")
    t = steps.get("5 timing", {})
    for i, row in enumerate(t.get("segments", [])):
        comp = f", compiled {row['compiled_ms']:.2f} ms ({row['mode']}, compiling {row['compile_s']:.0f} s)" \
            if "compiled_ms" in row else ""
        lines.append(f"| segment {i} alone | eager {row['eager_ms']:.2f} ms{comp} |")
    if "step_eager_ms" in t:
        comp = f", compiled segments in turn {t['step_compiled_ms']:.2f} ms" if "step_compiled_ms" in t else ""
        lines.append(f"| whole step | eager {t['step_eager_ms']:.2f} ms{comp} |")
    for e in data["errors"]:
        lines.append(f"| error in step {e['step']} | {e['error'][:200]} |")
    lines += ["", f"{data.get('elapsed_s', 0):.0f} s in all. Figures: check.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
