"""The inspect, profile and plan entry points: a model given by name or folder through the stages.

The CLI's ``inspect``, ``profile`` and ``plan --measure`` are thin layers over these (``run`` is
:mod:`asyncdiff_partition.app.job`, ``demo`` :mod:`asyncdiff_partition.app.demo`).

Example::

    model, inputs = load_denoiser("tiny-unet2d-condition", batch=2)
    summary = inspect_model("tiny-unet2d-condition")
"""

from __future__ import annotations

import torch

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.plan import Plan, PlanError
from asyncdiff_partition.core.profile import Profile, fingerprint
from asyncdiff_partition.core.summary import ModelSummary, summarize_model
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model, time_segments
from asyncdiff_partition.pipelines import zoo

__all__ = [
    "capture_profiled",
    "capture_spec",
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
        UnknownModelError: unknown model or missing directory.
        ConfigError: a batch or shape the model cannot take.
    """
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    model = zoo.load_model(spec or zoo.DEFAULT_MODEL, seed=seed)
    if sample_size is not None:
        zoo.check_sample_size(model, sample_size)
    return model, zoo.example_inputs(model, batch=batch, sample_size=sample_size, seed=seed)


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
    return summarize_model(captured, build_op_graph(captured), model_name=name)


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
    compile: bool = False,
) -> Profile:
    """Load, capture and profile a model given by zoo name or directory.

    With ``compile``, the costs are scaled to compiled time (Note [compiled profile] in
    :mod:`asyncdiff_partition.fx.compile`)."""
    name, captured = capture_spec(spec, batch=batch, sample_size=sample_size, seed=seed)
    profiled = profile_model(captured, model_name=name, device=device, warmup=warmup, repeats=repeats,
                             progress=progress, command=command)
    if compile:
        from asyncdiff_partition.fx.compile import compile_profile

        profiled = compile_profile(profiled, captured, warmup=warmup, repeats=repeats)
    return profiled


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
