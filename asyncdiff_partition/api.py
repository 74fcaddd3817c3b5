"""High-level entry points that chain the stages; the CLI is a thin layer over these.

Example::

    model, inputs = load_denoiser("tiny-unet2d-condition", batch=2)
    summary = inspect_model("tiny-unet2d-condition")
"""

from __future__ import annotations

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
    specs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "latent": s.is_latent} for s in captured.inputs]
    found = fingerprint(build_op_graph(captured), specs)
    if found != profile.fingerprint:
        raise PlanError(f"the profile was made for model fingerprint {profile.fingerprint} but "
                        f"{model_spec or profile.model} is {found}; profile this model again")
    return captured


def measure_plan(profile: Profile, plan: Plan, *, repeats: int = 3, model_spec: str | None = None) -> list[float]:
    """Median ms of each of the plan's segments run alone (to set against the predictions)."""
    return time_segments(capture_profiled(profile, model_spec=model_spec), plan.boundaries, repeats=repeats)
