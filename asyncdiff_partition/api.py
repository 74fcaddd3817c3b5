"""High-level entry points that chain the stages; the CLI is a thin layer over these.

Example::

    model, inputs = load_denoiser("tiny-unet2d-condition", batch=2)
    summary = inspect_model("tiny-unet2d-condition")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.plan import ASYNCDIFF_SD21_BOUNDARIES, Plan, PlanError, make_plan
from asyncdiff_partition.core.profile import Profile, fingerprint
from asyncdiff_partition.core.summary import ModelSummary, summarize
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model, time_segments
from asyncdiff_partition.pipelines import zoo

__all__ = [
    "capture_profiled",
    "capture_spec",
    "check_sample_size",
    "compare_asyncdiff",
    "inspect_model",
    "load_denoiser",
    "measure_plan",
    "profile_spec",
    "run_demo",
]


def load_denoiser(
    spec: str | None, *, batch: int = 2, sample_size: int | None = None, seed: int = 0
) -> tuple[torch.nn.Module, zoo.ModelInputs]:
    """A zoo model or local directory, with example inputs of the requested shape.

    Raises:
        ValueError: unknown model, missing directory, or a shape the model cannot take.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    model = zoo.load_model(spec or zoo.DEFAULT_MODEL, seed=seed)
    if sample_size is not None:
        check_sample_size(model, sample_size)
    return model, zoo.example_inputs(model, batch=batch, sample_size=sample_size, seed=seed)


def check_sample_size(model: torch.nn.Module, size: int) -> None:
    """Reject latent sizes the model's down-sampling or patching cannot divide."""
    config = getattr(model, "config", None)
    if size < 1:
        raise ValueError(f"latent size must be positive, got {size}")
    if config is None:
        return
    factor = 1
    if "block_out_channels" in config and "down_block_types" in config:
        factor = 2 ** (len(config["down_block_types"]) - 1)
    elif config.get("patch_size"):
        factor = int(config["patch_size"])
    if size % factor:
        lower = max(factor, size - size % factor)
        raise ValueError(
            f"latent size {size} does not fit {type(model).__name__}: it must be a multiple of "
            f"{factor}; try {lower} or {lower + factor}"
        )


def capture_spec(
    spec: str | None, *, batch: int = 2, sample_size: int | None = None, seed: int = 0
) -> tuple[str, CapturedModel]:
    """Load and capture a model given by zoo name or directory: ``(name, captured)``."""
    model, inputs = load_denoiser(spec, batch=batch, sample_size=sample_size, seed=seed)
    captured = capture_model(model, inputs.args, inputs.kwargs, latent=inputs.latent)
    return spec or zoo.DEFAULT_MODEL, captured


def inspect_model(
    spec: str | None, *, batch: int = 2, sample_size: int | None = None, seed: int = 0
) -> ModelSummary:
    """Capture a model and summarise its op graph (what ``asyncdiff-partition inspect`` shows)."""
    name, captured = capture_spec(spec, batch=batch, sample_size=sample_size, seed=seed)
    return summarize(captured, build_op_graph(captured), model_name=name)


def profile_spec(
    spec: str | None,
    *,
    batch: int = 2,
    sample_size: int | None = None,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    progress: bool = False,
    command: str = "",
    seed: int = 0,
) -> Profile:
    """Load, capture and profile a model given by zoo name or directory."""
    name, captured = capture_spec(spec, batch=batch, sample_size=sample_size, seed=seed)
    return profile_model(captured, model_name=name, device=device, warmup=warmup, repeats=repeats,
                         progress=progress, command=command)


def compare_asyncdiff(profile: Profile, n_devices: int, **plan_options: Any) -> Plan:
    """AsyncDiff's hand split of the SD 2.1 UNet at ``n_devices``, as a plan of this profile."""
    if n_devices not in ASYNCDIFF_SD21_BOUNDARIES:
        raise PlanError(f"AsyncDiff's published SD 2.1 splits are for N = 2, 3, 4, not {n_devices}")
    return make_plan(profile, n_devices, boundaries=ASYNCDIFF_SD21_BOUNDARIES[n_devices], **plan_options)


def capture_profiled(profile: Profile, *, model_spec: str | None = None) -> CapturedModel:
    """Capture the model a profile was made of, at the profiled shapes, and check it is the same.

    Raises:
        PlanError: the model captured now has another fingerprint than the profiled one.
    """
    latent = next(spec for spec in profile.inputs if spec["latent"])
    _, captured = capture_spec(model_spec or profile.model, batch=latent["shape"][0],
                               sample_size=latent["shape"][-1])
    found = fingerprint(build_op_graph(captured), [s.to_dict() for s in captured.inputs])
    if found != profile.fingerprint:
        raise PlanError(f"the profile was made for model fingerprint {profile.fingerprint} but "
                        f"{model_spec or profile.model} is {found}; profile this model again")
    return captured


def measure_plan(profile: Profile, plan: Plan, *, repeats: int = 3, model_spec: str | None = None) -> list[float]:
    """Median ms of each of the plan's segments run alone (to set against the predictions)."""
    return time_segments(capture_profiled(profile, model_spec=model_spec), plan.boundaries, repeats=repeats)


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 20, guidance: float = 2.0,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The main job on the bundled digits model, end to end on this machine's CPU cores.

    capture -> op graph -> profile -> plan for 2 devices -> the plan run asynchronously on 2
    processes, and the same seeds run sequentially (the unsplit schedule: warm-up = all steps),
    one sample of every digit 0-9 (the denoiser sees 20 images: conditional + unconditional).
    Writes the profile, the plan, both runs' images and reports, and ``comparison.png`` (the
    sequential and asynchronous samples side by side, per digit); prints latency, speedup,
    ideal speedup and fidelity (PSNR and SSIM of each asynchronous sample against its
    sequential one).

    Example:
        >>> run_demo("out/demo")  # doctest: +SKIP

    Returns:
        Paths of what was written and the measured figures.
    """
    import numpy as np
    from PIL import Image

    from asyncdiff_partition.core.plan import format_plan, ideal_speedup
    from asyncdiff_partition.core.summary import format_bytes, format_summary
    from asyncdiff_partition.evaluation.metrics import psnr, ssim
    from asyncdiff_partition.pipelines.digits import NUM_CLASSES
    from asyncdiff_partition.runtime.job import RunConfig, run_plan

    torch.set_num_threads(1)  # on CPU one thread stands for one device
    out = Path(out_dir)
    name = zoo.DEFAULT_MODEL
    echo(f"asyncdiff-partition demo: the bundled '{name}' model (a class-conditional UNet trained on "
         "scikit-learn's digits), CPU, 1 thread per device\n")
    _, captured = capture_spec(name, batch=2 * NUM_CLASSES)  # one image per digit, cond + uncond
    echo(format_summary(summarize(captured, build_op_graph(captured), model_name=name)))
    profiled = profile_model(captured, model_name=name, repeats=5, command="asyncdiff-partition demo")
    profile_path = profiled.save(out / f"{name}.cpu-1t.profile.json")
    echo(f"\nprofile: {len(profiled.costs)} nodes, eager {profiled.eager_ms['median']:.1f} ms, "
         f"sum of node medians {profiled.node_ms_sum:.1f} ms\n")
    planned = make_plan(profiled, 2, steps=steps, profile_path=str(profile_path))
    plan_path = planned.save(out / "plan-2.json")
    echo(format_plan(planned, title="plan for 2 devices"))
    common = dict(model=None, plan=str(plan_path), steps=steps, guidance=guidance, progress=False)
    runs = {
        "sequential": run_plan(RunConfig(**common, warmup=steps, reference=True, out_dir=str(out / "sequential"))),
        "async": run_plan(RunConfig(**common, threads=1, out_dir=str(out / "async"))),
    }
    seq, asy = ([np.asarray(Image.open(p), dtype=np.float64) / 255.0 for p in runs[k]["images"]] for k in runs)
    fidelity = [(psnr(a, s), ssim(a, s)) for s, a in zip(seq, asy)]
    comparison = _comparison_png(out / "comparison.png", seq, asy, fidelity)
    warmup = planned.warmup
    rows = [("sequential, 1 process", runs["sequential"], None),
            ("asynchronous, 2 processes", runs["async"], ideal_speedup(steps, warmup, 2, 1))]
    echo(f"\n{steps} DDIM steps, guidance {guidance}, warm-up {warmup}; latency = the sampling call "
         "(denoising loop), step = median denoiser step")
    echo(f"{'run':<27}{'latency':>9}{'step':>10}{'speedup':>9}{'ideal':>8}{'plan':>8}")
    base = runs["sequential"]["wall_s"]
    for label, result, ideal in rows:
        step_ms = result["summary"]["step_ms"]["median"]
        extra = f"{ideal:>7.2f}x{planned.predicted['speedup']:>7.2f}x" if ideal else ""
        echo(f"{label:<27}{result['wall_s']:>8.2f}s{step_ms:>8.1f}ms{base / result['wall_s']:>8.2f}x{extra}")
    ranks = "; ".join(f"rank {r['rank']} compute {r['compute_ms']:.1f}, communication {r['comm_ms']:.1f}, "
                      f"wait {r['wait_ms']:.1f}" for r in runs["async"]["summary"]["per_rank"])
    sent = runs["async"]["summary"]["bytes_sent_per_step"]["median"]
    echo(f"asynchronous step, median ms: {ranks}; {format_bytes(int(sent))} sent per step")
    psnrs, ssims = [p for p, _ in fidelity], [s for _, s in fidelity]
    echo("\nfidelity, asynchronous vs sequential sample of each digit")
    echo("digit   " + "".join(f"{d:>7}" for d in range(len(fidelity))) + "   mean")
    echo("PSNR dB " + "".join(f"{p:>7.1f}" for p in psnrs) + f"{_mean(psnrs):>7.1f}")
    echo("SSIM    " + "".join(f"{s:>7.3f}" for s in ssims) + f"{_mean(ssims):>7.3f}")
    echo(f"\nwrote {comparison} (sequential above, asynchronous below), {profile_path}, {plan_path}, "
         f"{out / 'sequential'}/ and {out / 'async'}/ (images and report.json)")
    return {"profile": str(profile_path), "plan": str(plan_path), "comparison": str(comparison), "runs": runs,
            "psnr": psnrs, "ssim": ssims, "speedup": base / runs["async"]["wall_s"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")  # inf when a PSNR is (identical images)


def _comparison_png(path: Path, top: list[Any], bottom: list[Any], fidelity: list[tuple[float, float]],
                    *, scale: int = 8) -> Path:
    """Two labelled rows of images in [0, 1] (sequential above, asynchronous below), one column per digit."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font: Any = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    side, gap, left, head, foot = top[0].shape[0] * scale, 6, 120, 24, 40
    width = left + len(top) * (side + gap)
    sheet = Image.new("RGB", (width, head + 2 * (side + gap) + foot), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate((("sequential", top), ("asynchronous", bottom))):
        y = head + row * (side + gap)
        draw.text((6, y + side // 2 - 8), label, fill="black", font=font)
        for col, image in enumerate(images):
            tile = Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"))
            sheet.paste(tile.resize((side, side), Image.NEAREST).convert("RGB"), (left + col * (side + gap), y))
    for col, (p, s) in enumerate(fidelity):
        x = left + col * (side + gap)
        draw.text((x + side // 2 - 4, 4), str(col), fill="black", font=font)
        draw.text((x, head + 2 * (side + gap)), f"{p:.1f} dB", fill="black", font=font)
        draw.text((x, head + 2 * (side + gap) + 18), f"SSIM {s:.3f}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path


def hybrid_plan(profile_path: str, devices: int, *, sliced_path: str | None, batch_parallel: int | None,
                max_stale_hops: int, phases_json: str | None, warmup: int, steps: int,
                bandwidth_gbps: float | None, out_path: str) -> str:
    """``plan`` with batch groups (core.hybrid_plan): cost every D = B x (N + S - 1), save the winner; the printout."""
    import json

    from asyncdiff_partition.core.hybrid_plan import format_candidates, make_hybrid_plan
    from asyncdiff_partition.core.plan import format_plan
    from asyncdiff_partition.runtime.policy import PhaseError, check_phases

    try:
        phases = check_phases(json.loads(phases_json)) if phases_json else None
    except json.JSONDecodeError as error:
        raise PhaseError(f"--phases must be JSON, e.g. '{{\"kind\": \"adaptive\", \"threshold\": 0.3}}' ({error})") from None
    choice = make_hybrid_plan(Profile.load(profile_path), devices,
                              sliced=Profile.load(sliced_path) if sliced_path else None, batch_parallel=batch_parallel,
                              steps=steps, warmup=warmup, phases=phases, max_stale_hops=max_stale_hops,
                              bandwidth_gbps=bandwidth_gbps, profile_path=profile_path, sliced_path=sliced_path or "")
    choice.plan.save(out_path)
    w = choice.winner
    title = f"{choice.plan.model}: {devices} device(s) as B={w.batch_parallel} group(s) x N={w.n_devices} S={w.stride}"
    return "\n".join([format_candidates(choice), "", format_plan(choice.plan, title=title), f"wrote {out_path}"])
