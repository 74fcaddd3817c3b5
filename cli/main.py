"""The ``asyncdiff-partition`` command: a thin click layer over the Python API.

Note [light commands]
~~~~~~~~~~~~~~~~~~~~~
``--help`` and ``plan`` (without ``--measure``) need only the torch-free core, so this module
imports nothing at its top that loads torch or diffusers (20-50 s on a loaded 2-core machine).
Each command imports the stages it runs inside its own body; those function-local imports are
there for this reason alone (tests/test_imports.py keeps it so).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from asyncdiff_partition.cli.options import parallel_config, parallel_options, refuse
from asyncdiff_partition.core.baseline import make_asyncdiff_plan
from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.hybrid_plan import plan_hybrid_file
from asyncdiff_partition.core.phases import PhaseError, check_phases
from asyncdiff_partition.core.plan import format_plan, make_plan
from asyncdiff_partition.core.profile import Profile
from asyncdiff_partition.core.summary import format_bytes, format_summary

# Errors a user can cause and fix; each becomes one line on stderr and exit status 1. Click's
# own usage errors are click's to print. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (AsyncDiffError, OSError)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes into one clear line and a non-zero exit (``--debug`` keeps tracebacks)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            if click.get_current_context().obj.get("debug"):
                raise
            message = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per process (default: torch's choice).")
@click.option("--debug", is_flag=True, envvar="ASYNCDIFF_DEBUG", help="Show tracebacks for errors.")
@click.version_option(package_name="asyncdiff-partition")
@click.pass_context
def main(ctx: click.Context, threads: int | None, debug: bool) -> None:
    """Split a diffusion model's denoiser into latency-balanced segments and run them
    asynchronously on several devices (AsyncDiff, for any model).

    Stages: capture -> graph -> profile -> partition -> plan -> split -> run.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if threads is not None:
        import torch  # Note [light commands]

        torch.set_num_threads(threads)


model_option = click.option(
    "--model", "model_spec", default=None, metavar="NAME|DIR",
    help="Zoo name (see `models`) or a local diffusers model/pipeline directory. "
    "Default: the bundled default model.",
)
batch_option = click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
                            help="Batch size (2 = one classifier-free-guidance pair).")
size_option = click.option("--size", type=click.IntRange(min=1), default=None,
                           help="Latent height/width (default: the model's sample_size).")


def prompt_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--prompt / --image / --guidance: sample or profile a pipeline folder through its own call."""
    command = click.option("--guidance", "guidance", type=float, default=None,
                           help="With --prompt: the pipeline's guidance_scale (default: the pipeline's).")(command)
    command = click.option("--image", type=click.Path(dir_okay=False), default=None,
                           help="With a pipeline folder: the conditioning image (ControlNet, image-to-X).")(command)
    return click.option("--prompt", default=None, metavar="TEXT",
                        help="Use --model PIPELINE_DIR's own pipeline with this prompt (--size: image pixels).")(command)


@main.command()
def models() -> None:
    """List the built-in model zoo."""
    from asyncdiff_partition.pipelines import zoo  # Note [light commands]

    for name in zoo.list_models():
        tag = ("trained, weights shipped (demo)" if name in zoo.TRAINED_MODELS
               else "tiny, random weights (tests)" if name in zoo.TINY_MODELS else "full size (benchmarks)")
        default = "  [default]" if name == zoo.DEFAULT_MODEL else ""
        click.echo(f"{name:<24} {tag}{default}")


@main.command()
@model_option
@batch_option
@size_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def inspect(model_spec: str | None, batch: int, size: int | None, as_json: bool) -> None:
    """Capture a model and summarise its op graph: nodes, parameters, fresh nodes, cut points."""
    from asyncdiff_partition.app.api import inspect_model  # Note [light commands]

    summary = inspect_model(model_spec, batch=batch, sample_size=size)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary))


@main.command()
@model_option
@batch_option
@size_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", "profile_threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads while profiling (on CPU one thread stands for one device).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs; each node's cost is their median.")
@click.option("--latent", default=None, metavar="NAME",
              help="ONNX models: the latent input (default: sample, latent, hidden_states, x, ...).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Profile file to write (default: MODEL.DEVICE-Nt.profile.json).")
@click.option("--compile", "compile_", is_flag=True,
              help="Scale every node's cost by the whole model's compiled/eager time, so that plans balance "
              "compiled segments (see asyncdiff_partition.fx.compile).")
@prompt_options
@user_errors
def profile(model_spec, batch, size, device, profile_threads, warmup, repeats, latent, out_path, compile_, prompt,
            image, guidance) -> None:
    """Measure the cost of every node of a model on a device and save a profile file.

    --model also takes an .onnx file: it is profiled by onnxruntime's own profiler, and --batch /
    --size then only fill its symbolic dimensions."""
    import torch  # Note [light commands], as every import below

    from asyncdiff_partition.app.api import profile_spec
    from asyncdiff_partition.onnx.model import is_onnx_path
    from asyncdiff_partition.onnx.profiler import profile_onnx

    torch.set_num_threads(profile_threads)
    command = "asyncdiff-partition " + shlex.join(sys.argv[1:]) if sys.argv else ""
    if prompt is not None or image is not None:  # a pipeline folder: its own call, recorded
        from asyncdiff_partition.app.pipeline_job import PipelineRun, profile_pipeline

        result = profile_pipeline(PipelineRun(model=model_spec or "", prompt=prompt, image=image, size=size,
                                              guidance=guidance), device=device, warmup=warmup, repeats=repeats,
                                  command=command)
    elif is_onnx_path(model_spec):
        result = profile_onnx(model_spec, device=device, threads=profile_threads, warmup=warmup, repeats=repeats,
                              command=command, batch=batch, size=size, latent=latent)
    else:
        result = profile_spec(model_spec, batch=batch, sample_size=size, device=device, warmup=warmup,
                              repeats=repeats, progress=True, command=command, compile=compile_)
    name = Path(result.model).name or "model"
    kind = "-compiled" if result.compiled else ""
    out = Path(out_path or f"{name}.{device.replace(':', '')}-{profile_threads}t{kind}.profile.json")
    result.save(out)
    click.echo(
        f"{result.model}: {len(result.costs)} nodes on {result.device_name} ({result.threads} thread(s)); "
        f"eager {result.eager_ms['median']:.1f} ms, sum of node medians {result.node_ms_sum:.1f} ms "
        f"({100 * result.accuracy:.1f}% of eager); activations peak {format_bytes(result.peak_memory['activation_bytes'])}"
    )
    if result.compiled:
        c = result.compiled
        click.echo(f"compiled ({c['mode']}): {c['compiled_ms']['median']:.1f} ms vs eager {c['eager_ms']['median']:.1f} ms; "
                   f"node costs scaled by {c['ratio']:.3f}; compiling took {c['startup_s']:.1f} s")
    click.echo(f"wrote {out}")


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


@main.command()
@click.option("--profile", "profile_path", required=True, type=click.Path(dir_okay=False),
              help="Profile file from `asyncdiff-partition profile`.")
@click.option("--devices", required=True, type=click.IntRange(min=1),
              help="D, all devices (ranks) the plan runs on: N = D - S + 1 segments (a hybrid plan splits D into "
                   "B batch groups x (N + S - 1)).")
@click.option("--stride", type=click.IntRange(1, 2), default=1, show_default=True,
              help="S: 2 = stride denoising (one extra rank).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Warm-up steps W.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Denoising steps T.")
@click.option("--bandwidth", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Link bandwidth in GB/s (default: transfers are free).")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Fixed cost per transfer.")
@click.option("--speeds", default=None, help="Per-device speed factors, e.g. 1,1,0.5.")
@click.option("--boundaries", default=None,
              help="Hand split: module paths where segments 2..N start, e.g. up_blocks.1.attentions.2")
@click.option("--compare", type=click.Choice(["asyncdiff"]), default=None,
              help="Also show AsyncDiff's hand split of the SD 2.1 UNet at the same N.")
@click.option("--measure", is_flag=True,
              help="Also run every segment alone on this machine and show measured vs predicted ms.")
@click.option("--model", "model_spec", default=None, metavar="NAME|DIR|FILE.onnx",
              help="With --measure: where to load the profiled model from (default: the profile's name).")
@click.option("--profile-sliced", "sliced_path", default=None, type=click.Path(dir_okay=False),
              help="Hybrid plan: the same model profiled at batch / B; B, N and S are then chosen for --devices.")
@click.option("--batch-parallel", type=click.IntRange(min=1), default=None,
              help="Hybrid plan: fix the batch-parallel degree B (default: the fastest within the budget).")
@click.option("--max-stale-hops", type=click.IntRange(min=0), default=1, show_default=True,
              help="Hybrid plan: fidelity budget, N*S - 1 at most (1 = as N = 2 segments alone).")
@click.option("--phases", "phases_json", default=None,
              help='Switching policy as JSON, e.g. \'{"kind": "fixed", "async_steps": [5, 20]}\' or '
                   '\'{"kind": "adaptive", "threshold": 0.3}\'.')
@click.option("--extrapolation", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="λ: asynchronous steps read v(s-1) + λ (v(s-1) - v(s-2)) for the stale v(s-1) "
                   "(stride 1; `eval` finds a good λ for a model).")
@click.option("--latency-slack", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="How much slower than the fastest split a less stale split may be (0: the fastest).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="plan.json", show_default=True)
@click.pass_context
@user_errors
def plan(ctx, profile_path, devices, stride, warmup, steps, bandwidth, latency_ms, speeds, boundaries, compare,
         measure, model_spec, sliced_path, batch_parallel, max_stale_hops, phases_json, extrapolation, latency_slack,
         out_path) -> None:
    """Partition a profiled model into latency-balanced segments for D devices and save the plan."""
    if sliced_path or batch_parallel or phases_json:
        refuse(ctx, ["stride", "speeds", "boundaries", "compare", "measure", "model_spec", "latency_ms", "extrapolation",
                     "latency_slack"],
               "only for plans of one batch group; a hybrid plan (--profile-sliced, --batch-parallel, --phases) "
               "chooses N and S itself, so leave them out")
        click.echo(plan_hybrid_file(profile_path, devices, sliced_path=sliced_path, batch_parallel=batch_parallel,
                                max_stale_hops=max_stale_hops, phases_json=phases_json, warmup=warmup,
                                steps=steps, bandwidth_gbps=bandwidth, out_path=out_path))
        return
    refuse(ctx, ["max_stale_hops"], "the budget of a hybrid plan; add --profile-sliced, --batch-parallel or --phases")
    if not measure:
        refuse(ctx, ["model_spec"], "read by --measure only; add --measure or leave it out")
    n_segments = ParallelConfig(devices=devices, stride=stride, warmup=warmup, extrapolation=extrapolation,
                                latency_slack=latency_slack).checked().segments
    loaded = Profile.load(profile_path)
    options = dict(stride=stride, warmup=warmup, steps=steps, speeds=_float_list(speeds, "--speeds"),
                   bandwidth_gbps=bandwidth, link_latency_ms=latency_ms)
    hand = [b for b in boundaries.split(",") if b.strip()] if boundaries else None
    result = make_plan(loaded, n_segments, boundaries=hand, profile_path=str(profile_path), extrapolation=extrapolation,
                       latency_slack=latency_slack, **options)
    result.save(out_path)
    hand_plan = make_asyncdiff_plan(loaded, n_segments, **options) if compare else None
    measure_plan = _plan_timer(model_spec or loaded.model) if measure else None
    measured = measure_plan(loaded, result, model_spec=model_spec) if measure_plan else None
    click.echo(format_plan(result, title=f"{result.model}: {result.method} plan for {devices} device(s), "
                                         f"N={n_segments} segment(s)", measured=measured))
    if hand_plan is not None:
        click.echo("")
        hand_measured = measure_plan(loaded, hand_plan, model_spec=model_spec) if measure_plan else None
        click.echo(format_plan(hand_plan, title=f"AsyncDiff's hand split at N={n_segments}", measured=hand_measured))
    click.echo(f"wrote {out_path}")


def _plan_timer(model_spec: str) -> Callable[..., list[float]]:
    """What times a plan's segments on this machine: onnxruntime for an .onnx model, else torch."""
    # Note [light commands]: only `plan --measure` pays for these imports.
    from asyncdiff_partition.onnx.model import is_onnx_path

    if is_onnx_path(model_spec):
        from asyncdiff_partition.onnx.segments import measure_onnx_plan

        return measure_onnx_plan
    from asyncdiff_partition.app.api import measure_plan

    return measure_plan


@main.command()
@click.option("--model", "model_spec", default=None, metavar="NAME|DIR|FILE.onnx",
              help="Zoo name, local diffusers model/pipeline directory or .onnx file (default: the plan's model).")
@click.option("--plan", "plan_path", default=None, type=click.Path(dir_okay=False),
              help="Plan file from `asyncdiff-partition plan` (with --prompt: optional, made on the fly).")
@click.option("--prompt", default=None, metavar="TEXT",
              help="Sample --model PIPELINE_DIR's own pipeline with this prompt, parallelized.")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="With --prompt: the conditioning image (ControlNet, image-to-X pipelines).")
@click.option("--size", type=click.IntRange(min=8), default=None,
              help="With --prompt: image height/width in pixels (default: the pipeline's).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps T (default: the plan's).")
@parallel_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, conditioning and noise.")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale (<= 1: none; conditional models only). "
              "Default: 2 for the bundled digits model, 5 otherwise.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="run", show_default=True,
              help="Directory for the images and report.json.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a Chrome trace (open in ui.perfetto.dev).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes to spawn; must equal the plan's world size (default: that).")
@click.option("--reference", is_flag=True,
              help="Run the single-process reference schedule instead of the ranks.")
@click.option("--oversubscribe", is_flag=True,
              help="Start more ranks than there are devices (GPUs, or CPU cores for CPU ranks).")
@click.pass_context
@user_errors
def run(ctx, model_spec, plan_path, prompt, image, size, steps, devices, batch_parallel, stride, warmup, switch_warmup,
        phases_json, extrapolation, latency_slack, compile_, timeout_s, seed, guidance, out_dir, trace_path, nproc,
        reference, oversubscribe) -> None:
    """Sample with a plan: every rank runs the pipeline, the denoiser runs asynchronously.

    With --prompt (and --image), --model is a saved diffusers pipeline folder: its own pipeline
    runs, parallelized, and writes its real output. An .onnx model (onnxruntime segments)
    denoises a seeded random latent and writes latent.npy.
    Ctrl-C or SIGTERM ends every rank and exits with status 130 or 143."""
    from asyncdiff_partition.runtime.launch import DEBUG_ENV, Interrupted, handle_interrupts

    if prompt is not None or image is not None:
        _run_pipeline(ctx, model_spec, plan_path, prompt, image, size, steps, seed, guidance, out_dir, reference,
                      trace_path, nproc, oversubscribe)
        return
    if plan_path is None:
        from asyncdiff_partition.app.pipeline_job import PipelineJobError

        raise PipelineJobError("run needs --plan FILE (from 'asyncdiff-partition plan'), or --model PIPELINE_DIR "
                               "--prompt TEXT to run a saved pipeline")
    refuse(ctx, ["size"], "only with --prompt (a plan fixes its shapes)")
    refuse(ctx, ["devices", "batch_parallel", "switch_warmup", "phases_json", "extrapolation", "latency_slack"],
           "fixed by the plan file; make another plan with `asyncdiff-partition plan` instead")

    if ctx.obj.get("debug"):
        os.environ[DEBUG_ENV] = "1"  # the ranks and the launcher keep torch's logs and warnings
    try:
        with handle_interrupts():
            from asyncdiff_partition.app.job import RunConfig, run_plan  # Note [light commands]
            from asyncdiff_partition.app.report import format_run

            config = RunConfig(model=model_spec, plan=plan_path, steps=steps, warmup=warmup, stride=stride, seed=seed,
                               guidance=guidance, out_dir=out_dir,
                               trace=trace_path, reference=reference, nproc=nproc,
                               threads=ctx.parent.params.get("threads"), timeout_s=timeout_s or 300.0,
                               oversubscribe=oversubscribe, compile=compile_)
            result = run_plan(config)  # the ONNX backend for an .onnx model or a plan of one
    except (Interrupted, KeyboardInterrupt) as interrupted:
        if ctx.obj.get("debug"):
            raise
        click.echo("error: interrupted", err=True)
        sys.exit(getattr(interrupted, "exit_code", 130))
    if result["report"] is None:  # a rank other than 0 of an outside launch
        return
    click.echo(format_run(result["summary"], wall_s=result["wall_s"]))
    for image in result["images"] + ([result["latent"]] if result.get("latent") else []):
        click.echo(f"wrote {image}")
    click.echo(f"wrote {result['report']}")
    if result["trace"]:
        click.echo(f"wrote {result['trace']}")


def _run_pipeline(ctx, model_spec, plan_path, prompt, image, size, steps, seed, guidance, out_dir, reference,
                  trace_path, nproc, oversubscribe) -> None:
    from asyncdiff_partition.app.pipeline_job import PipelineJobError, PipelineRun, run_pipeline
    from asyncdiff_partition.core.plan import Plan

    if model_spec is None:
        raise PipelineJobError("--prompt needs --model PIPELINE_DIR (a folder written by the pipeline's "
                               "save_pretrained); add --model")
    base = ParallelConfig()
    if plan_path is not None:  # the plan's configuration, unless a flag says otherwise
        loaded = Plan.load(plan_path)
        base = ParallelConfig(devices=loaded.world_size, batch_parallel=loaded.batch_parallel, stride=loaded.stride,
                              warmup=loaded.warmup, phases=loaded.phases, extrapolation=loaded.extrapolation)
    parallel = parallel_config(ctx, base, threads=ctx.parent.params.get("threads"))
    config = PipelineRun(model=model_spec, prompt=prompt, image=image, plan=plan_path, size=size, steps=steps,
                         guidance=guidance, seed=seed, out_dir=out_dir, reference=reference, trace=trace_path,
                         nproc=nproc, oversubscribe=oversubscribe, progress=True, parallel=parallel)
    result = run_pipeline(config)
    if "pipeline" not in result:
        return  # a rank other than 0 of an outside launch
    setup = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in result["setup"].items())
    click.echo(f"{result['pipeline']}: set-up {setup}; sampling {result['wall_s']:.2f} s")
    for line in result["denoisers"]:
        click.echo(f"  {line}")
    for path in result.get("images", []) + result.get("frames", []) + result.get("videos", []) + result.get("plans", []):
        click.echo(f"wrote {path}")
    click.echo(f"wrote {result['report']}")
    if result.get("trace"):
        click.echo(f"wrote {result['trace']}")


@main.command("export-onnx")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False),
              help="Plan file from `asyncdiff-partition plan`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for segment<k>.onnx and segments.json.")
@click.option("--model", "model_spec", default=None, metavar="NAME|DIR|FILE.onnx",
              help="Where to load the planned model from (default: the plan's model).")
@click.option("--opset", type=click.IntRange(min=14), default=17, show_default=True,
              help="ONNX opset for torch.onnx.export.")
@user_errors
def export_onnx(plan_path, out_dir, model_spec, opset) -> None:
    """Write one ONNX model per segment of a plan, each checked against its segment on the example inputs."""
    from asyncdiff_partition.app.onnx_export import MANIFEST, export_plan_onnx  # Note [light commands]

    manifest = export_plan_onnx(plan_path, out_dir, model_spec=model_spec, opset=opset)
    for s in manifest["segments"]:
        click.echo(f"segment {s['index']}: {s['file']}, {len(s['inputs']) + len(s['receives'])} inputs, "
                   f"{len(s['outputs'])} outputs, by {s['exporter']}; max abs error vs its source "
                   f"{s['max_abs_error']:.2e}")
    click.echo(f"wrote {os.path.join(out_dir, MANIFEST)}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/demo", show_default=True,
              help="Folder for the demo's profile, plan, images and reports.")
@click.option("--steps", type=click.IntRange(min=2), default=20, show_default=True, help="Denoising steps.")
@user_errors
def demo(out_dir: str, steps: int) -> None:
    """The main job on the bundled digits model: capture, profile, plan for 2 devices, run it async
    on 2 processes beside the sequential model; writes comparison.png and prints speedup and fidelity."""
    from asyncdiff_partition.app.demo import run_demo  # Note [light commands]

    run_demo(out_dir, steps=steps, echo=click.echo)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} expects comma-separated integers like 1,2; got {text!r}")
    return values


def _phases(text: str) -> dict:
    try:
        return check_phases(json.loads(text))
    except json.JSONDecodeError as error:
        raise PhaseError(f"--phases must be JSON, e.g. '{{\"kind\": \"adaptive\", \"threshold\": 0.3}}' ({error})") from None


@main.command("eval")
@model_option
@click.option("--segments", default="2,3,4", show_default=True,
              help="Values of N, the segments of one batch group (D = B x (N + S - 1) devices), comma-separated.")
@click.option("--stride", default="1,2", show_default=True, help="Values of S (1 and/or 2).")
@click.option("--warmup", default="0,1,3,5", show_default=True, help="Values of W, comma-separated.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Denoising steps T.")
@click.option("--images", type=click.IntRange(min=1), default=10, show_default=True,
              help="Samples per class (class-conditional models), else samples in all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, conditioning and noise.")
@click.option("--guidance", type=float, default=2.0, show_default=True,
              help="Classifier-free guidance for class-conditional models (<= 1: none).")
@click.option("--no-hand-split", is_flag=True, help="Leave out the block-boundary hand split.")
@click.option("--latency-slack", default="0.03", show_default=True,
              help="Fidelity-aware splits: latency slacks over the optimal bottleneck, comma-separated ('' for none).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Like --images, for the staleness calibration batch (drawn with other noise).")
@click.option("--batch-parallel", default="1", show_default=True,
              help="Values of B; each B > 1 adds hybrid rows (B batch groups x segments).")
@click.option("--phases", "phases_json", multiple=True,
              help='A switching policy as JSON (repeatable), e.g. \'{"kind": "adaptive", "threshold": 0.3}\'.')
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="eval", show_default=True,
              help="Folder for fidelity.csv, fidelity.md and fidelity.png.")
@user_errors
def eval_command(model_spec, segments, stride, warmup, steps, images, seed, guidance, no_hand_split, latency_slack,
                 calibration_images, batch_parallel, phases_json, out_dir) -> None:
    """Fidelity of asynchronous denoising against the sequential model, per N, S, W and split
    (PSNR, SSIM, predicted speedup; class accuracy and Fréchet distance on the digits model)."""
    from asyncdiff_partition.evaluation.evaluate import evaluate  # Note [light commands]

    result = evaluate(model_spec, devices=_int_list(segments, "--segments"), strides=_int_list(stride, "--stride"),
                      warmups=_int_list(warmup, "--warmup"), steps=steps, images=images, seed=seed,
                      guidance=guidance, hand_split=not no_hand_split,
                      latency_slacks=_float_list(latency_slack, "--latency-slack") or [],
                      calibration_images=calibration_images, out_dir=out_dir,
                      batch_parallel=_int_list(batch_parallel, "--batch-parallel"),
                      phases=[None, *(_phases(text) for text in phases_json)], echo=click.echo)
    click.echo("")
    click.echo(result.markdown)


@main.command()
@model_option
@click.option("--devices", required=True, type=click.IntRange(min=1), help="D, the devices (ranks) available.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target: the most faithful configuration within this predicted latency.")
@click.option("--min-psnr", type=float, default=None, help="Target: the fastest configuration with this PSNR (dB).")
@click.option("--max-fd-ratio", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target (digits): the fastest configuration within this Fréchet distance / sequential.")
@click.option("--steps", type=click.IntRange(min=2), default=20, show_default=True, help="Denoising steps T.")
@click.option("--images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Calibration batch: samples per class (class-conditional models), else samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, conditioning and noise.")
@click.option("--guidance", type=float, default=2.0, show_default=True,
              help="Classifier-free guidance for class-conditional models (<= 1: none).")
@click.option("--stride", default="1,2", show_default=True, help="Values of S searched.")
@click.option("--warmup", default="1", show_default=True, help="Values of W searched.")
@click.option("--latency-slack", default="0,0.03,0.1", show_default=True,
              help="Cut slacks searched (0: latency-optimal; x: least stale within (1+x) of it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="tune", show_default=True,
              help="Folder for tune.md, tune.csv, tune.png, profile.json and the chosen plan.json.")
@user_errors
def tune(model_spec, devices, max_latency_ms, min_psnr, max_fd_ratio, steps, images, seed, guidance, stride, warmup,
         latency_slack, out_dir) -> None:
    """Search N, S, W and the cut slack for a latency or fidelity target; writes the Pareto table and
    plot and the chosen plan file."""
    from asyncdiff_partition.evaluation.tune import tune as run_tune

    run_tune(model_spec, devices=devices, max_latency_ms=max_latency_ms, min_psnr=min_psnr, max_fd_ratio=max_fd_ratio,
             steps=steps, images=images, seed=seed, guidance=guidance, strides=_int_list(stride, "--stride"),
             warmups=_int_list(warmup, "--warmup"), slacks=_float_list(latency_slack, "--latency-slack") or [0.0],
             out_dir=out_dir, progress=True, echo=click.echo)


@main.command()
@click.option("--model", "model_dir", required=True, metavar="PIPELINE_DIR",
              help="A diffusers pipeline folder (what save_pretrained wrote).")
@click.option("--devices", type=click.IntRange(min=1), default=2, show_default=True,
              help="Ranks the denoiser runs on; 1 serves the plain pipeline in this process (no ranks).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Warm-up steps W.")
@click.option("--stride", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="2 = stride denoising (one extra rank).")
@click.option("--batch-parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="B batch groups (guidance branches side by side); --devices is then all D ranks.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds a rank waits for another before giving up.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile each rank's segment.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting at most; beyond, 429.")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images in one pipeline call at most.")
@click.option("--max-n", type=click.IntRange(min=1), default=4, show_default=True, help="Images one request may ask for.")
@click.option("--admission-window-ms", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="How long a batch's first request waits for others of its size and settings.")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds before a request is cancelled (504).")
@click.option("--batching", type=click.Choice(["exact", "fused"]), default="exact", show_default=True,
              help="exact: every image equals the same request run alone; fused: one batched call, faster, "
                   "equal to about 1e-6.")
@click.option("--max-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Largest height or width a request may ask for, in pixels.")
@click.option("--max-steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Most denoising steps a request may ask for.")
@click.option("--drain", "drain_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="On SIGTERM, seconds the requests in flight may take to finish.")
@click.option("--restarts", type=click.IntRange(min=0), default=2, show_default=True,
              help="How often failed ranks are started again in a row before the service reports failure.")
@click.pass_context
@user_errors
def serve(ctx, model_dir, devices, warmup, stride, batch_parallel, timeout_s, compile_, host, port, max_queue,
          max_batch, max_n, admission_window_ms, request_timeout_s, batching, max_size, max_steps, drain_s,
          restarts) -> None:
    """Serve a pipeline over HTTP (OpenAI's POST /v1/images/generations, /health, /v1/models, /metrics),
    its denoiser on --devices ranks that stay up; requests of one size and settings are batched."""
    from asyncdiff_partition.app.serve.lifecycle import serve as run_service  # Note [light commands]
    from asyncdiff_partition.app.serve.options import ServeOptions
    from asyncdiff_partition.core.config import ParallelConfig

    parallel = ParallelConfig(devices=devices, warmup=warmup, stride=int(stride), batch_parallel=batch_parallel,
                              timeout_s=timeout_s, compile=compile_, threads=ctx.parent.params.get("threads"))
    options = ServeOptions(model=model_dir, parallel=parallel, host=host, port=port, max_queue=max_queue,
                           max_batch=max_batch, max_n=max_n, admission_window_ms=admission_window_ms,
                           request_timeout_s=request_timeout_s, batching=batching, max_size=max_size,
                           max_steps=max_steps, drain_s=drain_s, restarts=restarts).checked()
    run_service(options, echo=lambda line: click.echo(line, err=True))


if __name__ == "__main__":  # pragma: no cover
    main()
