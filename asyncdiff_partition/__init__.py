"""asyncdiff-partition: run any diffusion model's denoiser across several devices at once.

AsyncDiff (arXiv 2406.06911) cuts the noise-prediction network into N consecutive segments,
one per device, and lets each segment use its upstream segment's output from the previous
denoising step, so all segments compute at the same time. This package makes that general.

The stages, and the layer each lives in (each layer imports only those above it)::

    core/       torch-free: graph, partition, plan, placement, schedule (the table), config, files
    fx/         the compiler half: capture (any model -> one flat, verified torch.fx graph),
                opgraph, profiler, split (one fx.GraphModule per segment), ready (finished segments),
                layout, shipping, weights
    onnx/       .onnx models through the same op graph and plan
    runtime/    the runtime half: comm (the only torch.distributed user), launch, ranks (ranks that
                stay up), denoiser (one rank), hybrid (batch groups), reference (the oracle)
    pipelines/  parallelize(pipe): recording, structure, compiler, prepared, engine, wrap; the zoo
    evaluation/ fidelity of asynchronous against sequential samples (eval, tune)
    app/        the commands: run, profile, plan, demo, export-onnx, serve (cli/ is a thin click layer)

``asyncdiff_partition.core`` imports neither torch nor diffusers; this package's top level is
lazy, so ``import asyncdiff_partition`` is cheap and each name loads its stage on first use.
``docs/design.md`` explains the design.

Example::

    from asyncdiff_partition import parallelize
    parallelize(pipe, devices=2)                 # any diffusers pipeline; ranks start at the first call
    image = pipe(prompt="a red cube").images[0]

    from asyncdiff_partition import build_op_graph, capture_model, make_plan, profile_model, ready_segments
    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    plan = make_plan(profile_model(captured), 2)
    segments = ready_segments(captured, plan)    # then ReferenceSchedule(segments, warmup=1) or, per rank,
                                                 # AsyncDenoiser(segments, plan, ...) under launch(...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it (loaded on first access, see __getattr__)
_EXPORTS = {
    # configuration and errors
    "ParallelConfig": "asyncdiff_partition.core.config",
    "AsyncDiffError": "asyncdiff_partition.core.errors",
    # capture, graph, profile, plan
    "CapturedModel": "asyncdiff_partition.fx.capture",
    "capture_model": "asyncdiff_partition.fx.capture",
    "build_op_graph": "asyncdiff_partition.fx.opgraph",
    "profile_model": "asyncdiff_partition.fx.profiler",
    "Profile": "asyncdiff_partition.core.profile",
    "make_plan": "asyncdiff_partition.core.plan",
    "Plan": "asyncdiff_partition.core.plan",
    # finished segments and the schedule
    "ready_segments": "asyncdiff_partition.fx.ready",
    "ReferenceSchedule": "asyncdiff_partition.runtime.reference",
    "AsyncDenoiser": "asyncdiff_partition.runtime.denoiser",
    "launch": "asyncdiff_partition.runtime.launch",
    "denoise": "asyncdiff_partition.pipelines.wrap",
    # any diffusers pipeline
    "parallelize": "asyncdiff_partition.pipelines.parallelize",
    "warm": "asyncdiff_partition.pipelines.parallelize",
    "describe": "asyncdiff_partition.pipelines.parallelize",
}

__all__ = [
    "AsyncDenoiser",
    "AsyncDiffError",
    "build_op_graph",
    "capture_model",
    "CapturedModel",
    "denoise",
    "describe",
    "launch",
    "make_plan",
    "ParallelConfig",
    "parallelize",
    "Plan",
    "Profile",
    "profile_model",
    "ready_segments",
    "ReferenceSchedule",
    "warm",
]

if TYPE_CHECKING:
    from asyncdiff_partition.core.config import ParallelConfig
    from asyncdiff_partition.core.errors import AsyncDiffError
    from asyncdiff_partition.core.plan import Plan, make_plan
    from asyncdiff_partition.core.profile import Profile
    from asyncdiff_partition.fx.capture import CapturedModel, capture_model
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.fx.ready import ready_segments
    from asyncdiff_partition.pipelines.parallelize import describe, parallelize, warm
    from asyncdiff_partition.pipelines.wrap import denoise
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser
    from asyncdiff_partition.runtime.launch import launch
    from asyncdiff_partition.runtime.reference import ReferenceSchedule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncdiff_partition' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
