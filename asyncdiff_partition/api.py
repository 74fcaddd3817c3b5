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

from . import zoo
from .capture import CapturedModel, capture_model
from .fx_adapter import build_op_graph
from .plan import ASYNCDIFF_SD21_BOUNDARIES, Plan, PlanError, make_plan
from .profile import Profile, fingerprint, profile_model, time_segments
from .summary import ModelSummary, summarize

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


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 10, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The main job on the default model, end to end on this machine's CPU cores.

    capture -> op graph -> profile -> plan for 2 devices -> the plan run asynchronously on 2
    processes, and the same seed run sequentially (the unsplit model) for comparison.

    Returns:
        Paths of what was written and the measured figures.
    """
    import numpy as np
    from PIL import Image

    from .pipeline import RunConfig, run_plan
    from .plan import format_plan
    from .report import format_run
    from .summary import format_summary

    torch.set_num_threads(1)  # on CPU one thread stands for one device
    out = Path(out_dir)
    echo(f"asyncdiff-partition demo on {zoo.DEFAULT_MODEL} (random weights, CPU, 1 thread per device)\n")
    name, captured = capture_spec(zoo.DEFAULT_MODEL)
    echo(format_summary(summarize(captured, build_op_graph(captured), model_name=name)))
    profiled = profile_model(captured, model_name=name, repeats=3, command="asyncdiff-partition demo")
    profile_path = profiled.save(out / f"{name}.cpu-1t.profile.json")
    echo(f"\nprofile: {len(profiled.costs)} nodes, eager {profiled.eager_ms['median']:.1f} ms, "
         f"sum of node medians {profiled.node_ms_sum:.1f} ms\n")
    planned = make_plan(profiled, 2, steps=steps, profile_path=str(profile_path))
    plan_path = planned.save(out / "plan-2.json")
    echo(format_plan(planned, title="plan for 2 devices"))
    runs = {}
    for label, config in (
        ("sequential", RunConfig(model=None, plan=str(plan_path), steps=steps, warmup=steps, reference=True,
                                 out_dir=str(out / "sequential"), progress=False)),
        ("async", RunConfig(model=None, plan=str(plan_path), steps=steps, out_dir=str(out / "async"),
                            threads=1, progress=False)),
    ):
        runs[label] = run_plan(config)
        echo(f"\n{label:<10} " + format_run(runs[label]["summary"], wall_s=runs[label]["wall_s"]))
    seq = np.asarray(Image.open(runs["sequential"]["images"][0]), dtype=np.float64)
    asy = np.asarray(Image.open(runs["async"]["images"][0]), dtype=np.float64)
    mse = float(np.mean((seq - asy) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    step_seq = runs["sequential"]["summary"]["step_ms"]["median"]
    step_async = runs["async"]["summary"].get("async_step_ms", runs["async"]["summary"]["step_ms"])["median"]
    echo(f"\nspeedup of the denoising loop: {runs['sequential']['wall_s'] / runs['async']['wall_s']:.2f}x wall, "
         f"{step_seq / step_async:.2f}x per asynchronous step (plan predicts {planned.predicted['speedup']:.2f}x, "
         f"ideal {planned.predicted['ideal_speedup']:.2f}x); async vs sequential image PSNR {psnr:.1f} dB")
    echo(f"\nwrote {profile_path}, {plan_path}, {out / 'sequential'}/ and {out / 'async'}/")
    return {"profile": str(profile_path), "plan": str(plan_path), "runs": runs, "psnr": psnr}
