"""One call that runs any diffusers pipeline's denoiser asynchronously on N devices.

Example (``torchrun --nproc_per_node 2 script.py``; every rank runs the same script)::

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    parallelize(pipe, devices=2, prompt="a red cube", height=512, width=512)
    image = pipe(prompt="a red cube", height=512, width=512).images[0]   # unchanged call

:func:`parallelize` records the denoiser's real call in a two-step dry run of the pipeline
(:mod:`~asyncdiff_partition.pipelines.recording`), captures it at those shapes, makes a plan
(rank 0 profiles, cached by model fingerprint and device, and sends the plan to the others) or
takes a saved one, and puts the schedule in the denoiser's place
(:func:`~asyncdiff_partition.pipelines.wrap.wrap_pipeline`). Each rank keeps only its segment's
weights. Other components (text encoders, VAE, a ControlNet) stay whole on every rank.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.plan import Plan, PlanError, SegmentPlan, make_plan
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.pipelines.recording import Recording, record_denoiser_call
from asyncdiff_partition.pipelines.wrap import call_binding, unwrap_pipeline, wrap_pipeline

__all__ = ["CACHE_ENV", "ParallelizeError", "choose_plan", "default_cache_dir", "parallelize"]

CACHE_ENV = "ASYNCDIFF_CACHE"


class ParallelizeError(AsyncDiffError, RuntimeError):
    """parallelize cannot run here as asked (no launcher, wrong world size, unknown timestep form)."""


def default_cache_dir() -> Path:
    """Where profiles are cached: ``$ASYNCDIFF_CACHE``, else ``~/.cache/asyncdiff-partition``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "asyncdiff-partition")


def parallelize(
    pipe: Any,
    devices: int = 2,
    *,
    stride: int = 1,
    warmup: int = 1,
    plan: str | Path | None = None,
    reference: bool = False,
    cache_dir: str | Path | None = None,
    steps: int = 50,
    timeout_s: float | None = None,
    **call_kwargs: Any,
) -> Any:
    """Replace ``pipe``'s denoiser with the asynchronous schedule over ``devices`` segments; returns ``pipe``.

    The plan in use is ``getattr(pipe, name).plan`` afterwards (``pipe.unet.plan``, say).
    Call it on every rank with the arguments you will call the pipeline with (size, batch,
    guidance, inputs: ``call_kwargs``); then call ``pipe(...)`` as before. Under a launcher
    (``torchrun``, :func:`~asyncdiff_partition.runtime.launch.launch`) there must be
    ``devices + stride - 1`` ranks; ``reference=True`` runs the single-process reference schedule.

    Args:
        pipe: a diffusers pipeline (any family: the denoiser is found, Note [finding the denoiser]).
        devices: N, the number of segments.
        stride: 1, or 2 (one extra rank).
        warmup: exact warm-up steps W (W >= the number of steps reproduces the pipeline exactly).
        plan: a saved plan file for this model at these shapes; default: make one.
        reference: run every segment in this process (fidelity checks; no launcher needed).
        cache_dir: where profiles are cached (default :func:`default_cache_dir`).
        steps: the T the plan's predicted speedup is written for.
        timeout_s: bound on every wait for another rank.
        call_kwargs: the pipeline call to record (``prompt``, ``height``, ``image``, ...).

    Raises:
        ParallelizeError: no launcher and not ``reference``, or another world size than the plan needs.
        RecordingError: the dry run did not find one denoiser call per step.
        PlanError: ``plan`` was made for another model or other shapes.
    """
    from asyncdiff_partition.runtime.launch import is_launched_externally

    world = devices + stride - 1
    launched = is_launched_externally() and not reference
    if not reference and not launched:
        raise ParallelizeError(
            f"parallelize(devices={devices}, stride={stride}) runs one process per segment ({world} in all), but this "
            f"process was not started by a launcher; run 'torchrun --nproc_per_node {world} script.py' (every rank "
            f"calls parallelize) or 'asyncdiff-partition run --model DIR --prompt TEXT --devices {devices}', "
            "or pass reference=True for the single-process reference schedule"
        )
    if launched and int(os.environ["WORLD_SIZE"]) != world:
        raise ParallelizeError(
            f"parallelize(devices={devices}, stride={stride}) needs {world} ranks but WORLD_SIZE is "
            f"{os.environ['WORLD_SIZE']}; start {world} processes or pass devices={int(os.environ['WORLD_SIZE']) - stride + 1}"
        )
    unwrap_pipeline(pipe)
    if launched:
        from asyncdiff_partition.runtime import comm

        _, _, device = comm.init(timeout_s=timeout_s)
        if device.type == "cuda":
            pipe.to(device)
    recording = record_denoiser_call(pipe, **call_kwargs)
    captured = _capture(recording, keep=reference)
    timestep = _timestep_input(captured, recording, stride)
    decide = functools.partial(choose_plan, captured, recording, devices, stride=stride, warmup=warmup, plan=plan,
                               cache_dir=cache_dir, steps=steps)
    chosen = _agree(decide, launched)
    del decide
    if reference:
        from asyncdiff_partition.fx.ready import ready_segments
        from asyncdiff_partition.runtime.reference import ReferenceSchedule

        segments = ready_segments(captured, chosen)
        schedule = ReferenceSchedule(segments, warmup=warmup, stride=stride, timestep_input=timestep,
                                     extrapolation=chosen.extrapolation)
        wrap_pipeline(pipe, schedule, captured, name=recording.name, form=recording.form)
        getattr(pipe, recording.name).plan = chosen
        return pipe
    from asyncdiff_partition.fx.ready import ready_segments
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser, segment_for_rank
    from asyncdiff_partition.runtime.pipeline_backend import release_weights

    # Every rank compiled the same plan for itself; AsyncDenoiser checks that the ranks agree.
    segment = segment_for_rank(ready_segments(captured, chosen, world_size=world, stride=stride))
    denoiser = AsyncDenoiser(segment, chosen, input_names=[s.name for s in captured.inputs],
                             latent=captured.latent.name, warmup=warmup, stride=stride, timestep_input=timestep,
                             timeout_s=timeout_s)
    wrap_pipeline(pipe, denoiser, call_binding(captured), name=recording.name, form=recording.form)
    getattr(pipe, recording.name).plan = chosen
    del captured
    kept = segment.module
    assert isinstance(kept, torch.nn.Module)
    del segment
    release_weights(recording.module, kept)  # only this rank's segment stays
    recording.args, recording.kwargs = (), {}
    return pipe


_CAPTURE_ATTR = "_asyncdiff_capture"  # on the denoiser: (call key, capture); a cycle, so the gc frees both


def _capture(recording: Recording, *, keep: bool) -> CapturedModel:
    """Capture the recorded call; with ``keep`` (reference runs, weights stay) a capture of the same
    module at the same call structure, shapes and dtypes is reused, so parallelizing again
    (another warm-up, another plan) does not capture again."""
    leaves, spec = pytree.tree_flatten((recording.args, recording.kwargs))
    key = (str(spec), tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
                            for x in leaves))
    cached = recording.module.__dict__.pop(_CAPTURE_ATTR, None)
    if keep and cached is not None and cached[0] == key:
        captured = cached[1]
    else:
        captured = capture_model(recording.module, recording.args, recording.kwargs)
    if keep:
        object.__setattr__(recording.module, _CAPTURE_ATTR, (key, captured))
    return captured


def _timestep_input(captured: CapturedModel, recording: Recording, stride: int) -> str:
    name = next((s.name for s in captured.inputs if s.path == recording.timestep), None)
    if name is None and stride == 2:
        raise ParallelizeError(
            f"stride 2 sets the timestep of the next step, but no input of {type(recording.module).__name__} follows "
            f"the scheduler's timesteps (inputs: {[s.path for s in captured.inputs]}); use stride=1"
        )
    return name or "timestep"


def _agree(decide: Callable[[], Plan], launched: bool) -> Plan:
    """Rank 0 decides the plan and sends it; every rank gets the same plan, or the same error."""
    if not launched:
        return decide()
    from asyncdiff_partition.runtime import comm

    message: dict[str, Any] = {}
    if comm.rank() == 0:
        try:
            message = {"plan": decide().to_dict()}
        except AsyncDiffError as error:
            message = {"error": str(error)}
    message = comm.broadcast_object(message, src=0, what="the plan")
    if "error" in message:
        raise PlanError(message["error"])
    data = dict(message["plan"])
    data["segments"] = [SegmentPlan(**s) for s in data["segments"]]
    return Plan(**data)


def choose_plan(captured: CapturedModel, recording: Recording, devices: int, *, stride: int, warmup: int,
                plan: str | Path | None, cache_dir: str | Path | None, steps: int) -> Plan:
    """``plan`` loaded and checked against ``captured``, or a plan made from its (cached) profile.

    Raises:
        PlanError: ``plan`` was made for another model or shapes, or for another number of segments.
    """
    from asyncdiff_partition.core.profile import Profile, fingerprint
    from asyncdiff_partition.fx.opgraph import build_op_graph

    found = fingerprint(build_op_graph(captured), [s.to_dict() for s in captured.inputs])
    if plan is not None:
        loaded = Plan.load(plan, fingerprint=found)
        if loaded.n_devices != devices:
            raise PlanError(f"plan {str(plan)!r} splits the model into {loaded.n_devices} segments but devices={devices}; "
                            f"pass devices={loaded.n_devices} or make a plan for {devices}")
        return loaded
    param = next(recording.module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tag = f"{device.type}{device.index if device.index is not None else ''}-{torch.get_num_threads()}t"
    path = Path(cache_dir or default_cache_dir()) / f"{found}.{tag}.profile.json"
    if path.is_file():
        profile = Profile.load(path)
    else:
        from asyncdiff_partition.fx.profiler import profile_model

        profile = profile_model(captured, model_name=type(recording.module).__name__, device=str(device), repeats=3,
                                command="parallelize")
        profile.save(path)
    return make_plan(profile, devices, stride=stride, warmup=warmup, steps=steps, profile_path=str(path))
