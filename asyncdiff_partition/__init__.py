"""asyncdiff-partition: run any diffusion model's denoiser across several devices at once.

AsyncDiff (arXiv 2406.06911) cuts the noise-prediction network into N consecutive segments,
one per device, and lets each segment use its upstream segment's output from the previous
denoising step, so all segments compute at the same time. This package makes that general.

The stages, and the subpackage each lives in::

    capture    fx/capture.py       any model -> one flat, verified torch.fx graph
    graph      fx/opgraph.py       -> core/graph.py: framework-agnostic op graph, fresh values, cuts
    profile    fx/profiler.py      per-node cost on the target device -> core/profile.py (the file)
    partition  core/partition.py   exact min-max split into N contiguous segments (no torch)
    plan       core/plan.py        the saved result, with predicted and ideal speedups
    placement  core/placement.py   which node runs in which segment, what each sends and receives
    split      fx/split.py         one fx.GraphModule per segment (fx/ready.py: finished segments)
    schedule   core/schedule.py    the asynchronous schedule as one table (no torch);
               runtime/reference.py evaluates it in one process
    run        runtime/            the schedule on N ranks: comm (the only torch.distributed
                                   user), launch, denoiser (one rank), job (the `run` command)
    pipelines  pipelines/          parallelize(pipe) for any diffusers pipeline, plain loops; the zoo
    onnx       onnx/               .onnx models through the same graph, plan and runtime
    evaluation evaluation/         fidelity of asynchronous against sequential samples

``api.py`` chains the stages for the CLI's ``inspect``, ``profile`` and ``plan --measure``;
``demo.py`` is the ``demo`` command. ``docs/design.md`` explains the design.

``asyncdiff_partition.core`` imports neither torch nor diffusers; this package's top level is
lazy, so ``import asyncdiff_partition`` is cheap and each name loads its stage on first use.

Example::

    from asyncdiff_partition import build_op_graph, capture_model
    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    graph = build_op_graph(captured)
    graph.cheapest_cuts(3)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it (loaded on first access, see __getattr__)
_EXPORTS = {
    # capture and graph
    "CapturedModel": "asyncdiff_partition.fx.capture",
    "capture_model": "asyncdiff_partition.fx.capture",
    "OpGraph": "asyncdiff_partition.core.graph",
    "build_op_graph": "asyncdiff_partition.fx.opgraph",
    # profile, partition, plan
    "Profile": "asyncdiff_partition.core.profile",
    "profile_model": "asyncdiff_partition.fx.profiler",
    "balance_segments": "asyncdiff_partition.core.partition",
    "Plan": "asyncdiff_partition.core.plan",
    "make_plan": "asyncdiff_partition.core.plan",
    # split and schedule
    "split_graph": "asyncdiff_partition.fx.split",
    "make_schedule": "asyncdiff_partition.core.schedule",
    "ReferenceSchedule": "asyncdiff_partition.runtime.reference",
    # run
    "AsyncDenoiser": "asyncdiff_partition.runtime.denoiser",
    "launch": "asyncdiff_partition.runtime.launch",
    "run_plan": "asyncdiff_partition.app.job",
    # pipelines and models
    "denoise": "asyncdiff_partition.pipelines.wrap",
    "parallelize": "asyncdiff_partition.pipelines.parallelize",
    "wrap_pipeline": "asyncdiff_partition.pipelines.wrap",
    "load_model": "asyncdiff_partition.pipelines.zoo",
    # fidelity
    "evaluate": "asyncdiff_partition.evaluation.evaluate",
    # errors
    "AsyncDiffError": "asyncdiff_partition.core.errors",
}

__all__ = [
    "AsyncDenoiser",
    "AsyncDiffError",
    "balance_segments",
    "build_op_graph",
    "capture_model",
    "CapturedModel",
    "denoise",
    "evaluate",
    "launch",
    "load_model",
    "make_plan",
    "make_schedule",
    "OpGraph",
    "parallelize",
    "Plan",
    "Profile",
    "profile_model",
    "ReferenceSchedule",
    "run_plan",
    "split_graph",
    "wrap_pipeline",
]

if TYPE_CHECKING:
    from asyncdiff_partition.app.job import run_plan
    from asyncdiff_partition.core.errors import AsyncDiffError
    from asyncdiff_partition.core.graph import OpGraph
    from asyncdiff_partition.core.partition import balance_segments
    from asyncdiff_partition.core.plan import Plan, make_plan
    from asyncdiff_partition.core.profile import Profile
    from asyncdiff_partition.core.schedule import make_schedule
    from asyncdiff_partition.evaluation.evaluate import evaluate
    from asyncdiff_partition.fx.capture import CapturedModel, capture_model
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.fx.split import split_graph
    from asyncdiff_partition.pipelines.parallelize import parallelize
    from asyncdiff_partition.pipelines.wrap import denoise, wrap_pipeline
    from asyncdiff_partition.pipelines.zoo import load_model
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
