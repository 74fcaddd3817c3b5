"""A recorded denoiser call made into finished segments: captured, planned, split, checked.

Example::

    plans = PlanBook(config, cache_dir=None, steps=50, plan_path=None)
    compiled = compile_call(record, record.calls[0], config, plans)       # all segments, ready
    compiled.segments[1].module, compiled.plan.boundaries, compiled.binding.inputs

One capture per distinct call structure; the structures of one denoiser share one placement (and
so one set of weights per rank) whenever their graphs have the same nodes. With batch groups
(``batch_parallel`` B > 1) the call is captured at batch / B (Note [batch slices] in
runtime/batch.py), and its binding takes the pipeline's whole batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.plan import Plan, PlanError, make_plan, with_calls_per_step
from asyncdiff_partition.core.schedule import world_size
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.fx.layout import ReadySegment
from asyncdiff_partition.pipelines.recording import Call, DenoiserRecord
from asyncdiff_partition.pipelines.structure import configured

__all__ = ["CACHE_ENV", "Compiled", "PlanBook", "branch_groups", "choose_plan", "compile_call", "default_cache_dir", "own_forward",
           "used_names", "whole_batch"]

CACHE_ENV = "ASYNCDIFF_CACHE"
Agree = Callable[[Callable[[], Plan]], Plan]  # how the ranks of a run come to one plan (rank 0 decides)


def default_cache_dir() -> Path:
    """Where profiles are cached: ``$ASYNCDIFF_CACHE``, else ``~/.cache/asyncdiff-partition``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "asyncdiff-partition")


@dataclass
class Compiled:
    """One call structure of one denoiser, finished.

    Attributes:
        binding: binds the pipeline's calls to the graph's inputs (at the whole batch).
        plan: the plan its segments follow.
        segments: every segment, ready (a rank keeps its own).
        timestep, latent: placeholder names of the timestep and the latent.
        inputs: every placeholder name, in order.
        captured: the capture (None once dropped).
    """

    binding: CapturedModel
    plan: Plan
    segments: list[ReadySegment]
    timestep: str
    latent: str
    inputs: list[str]
    captured: CapturedModel | None = None
    branches: bool = False  # batch groups take a step's separate calls (Note [pending predictions]), not slices


class PlanBook:
    """The plans of one parallelized pipeline: the first of each denoiser is reused by its other
    structures when their graphs have the same nodes."""

    def __init__(self, config: ParallelConfig, *, cache_dir: str | Path | None, steps: int,
                 plan_path: str | Path | None, agree: Agree | None = None):
        self.config, self.cache_dir, self.steps, self.plan_path = config, cache_dir, steps, plan_path
        self.agree: Agree = agree or (lambda decide: decide())
        self.first: dict[str, tuple[Plan, list[str]]] = {}

    def choose(self, name: str, module: torch.nn.Module, captured: CapturedModel, calls_per_step: int) -> Plan:
        names = [n.name for n in captured.graph_module.graph.nodes]
        first = self.first.get(name)

        def decide() -> Plan:
            from asyncdiff_partition.core.profile import fingerprint
            from asyncdiff_partition.fx.opgraph import build_op_graph

            if first is not None and first[1] == names:
                return replace(first[0], fingerprint=fingerprint(build_op_graph(captured),
                                                                 [s.to_dict() for s in captured.inputs]))
            return self._make(module, captured)

        plan = with_calls_per_step(self.agree(decide), calls_per_step)
        self.first.setdefault(name, (plan, names))
        return plan

    def _make(self, module: torch.nn.Module, captured: CapturedModel) -> Plan:
        config = self.config
        plan = choose_plan(captured, module, config.segments, stride=config.stride, warmup=config.warmup,
                           plan=self.plan_path, cache_dir=self.cache_dir, steps=self.steps,
                           latency_slack=config.latency_slack, extrapolation=config.extrapolation)
        if config.groups > 1 or config.phases is not None:
            b = config.groups  # each group runs 1 / B of the batch: the plan was made for that slice
            predicted = dict(plan.predicted, speedup=plan.predicted["speedup"] * b,
                             ideal_speedup=plan.predicted["ideal_speedup"] * b,
                             full_sequential_step_ms=plan.predicted["sequential_step_ms"] * b)
            plan = replace(plan, batch_parallel=b, phases=None if config.phases is None else dict(config.phases),
                           world_size=world_size(plan.n_devices, plan.stride, b), predicted=predicted)
        return plan


@contextlib.contextmanager
def own_forward(module: torch.nn.Module) -> Iterator[None]:
    """The model's own ``forward`` for a while, not a scheduled one installed on it (pipelines/wrap.py)."""
    current = module.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if current is not None:
            module.__dict__["forward"] = current


def compile_call(record: DenoiserRecord, call: Call, config: ParallelConfig, plans: PlanBook, *,
                 world: int | None = None, captures: dict[Any, CapturedModel] | None = None) -> Compiled:
    """Capture, plan and split one recorded call of a denoiser (the model set up as it was for the call).

    Args:
        world: ranks the segments are for (checked against the plan); None: one process.
        captures: a cache of captures by call structure, reused across parallelize calls.

    Raises:
        CaptureError, PlanError, SplitError: the model, the plan or the split cannot be kept exact.
        ConfigError: a batch that does not split into the configured groups.
    """
    from asyncdiff_partition.fx.ready import ready_segments

    module = record.module
    branches = branch_groups(record, config)
    sliced = 1 if branches else config.groups
    with own_forward(module), configured(module, call.configuration):
        captures = {} if captures is None else captures
        if (call.key, sliced) not in captures:
            captures[(call.key, sliced)] = capture_model(module, (), _group_call(call.call, record.rows, sliced))
        captured = captures[(call.key, sliced)]
        timestep = _timestep_input(captured, record, config.stride)
        plan = plans.choose(record.name, module, captured, record.per_step)
        segments = ready_segments(captured, plan, world_size=world, stride=config.stride)
    binding = whole_batch(captured, sliced)
    return Compiled(binding, plan, segments, timestep, captured.latent.name, [s.name for s in captured.inputs], captured,
                    branches)


def branch_groups(record: DenoiserRecord, config: ParallelConfig) -> bool:
    """Whether the batch groups take the separate calls of a step (one call each, Note [pending
    predictions] in pipelines/pending.py) rather than slices of one call's batch.

    Raises:
        ConfigError: B groups and a denoiser called neither once nor B times per step.
    """
    if config.groups == 1 or record.per_step == 1:
        return False
    if record.per_step == config.groups:
        return True
    raise ConfigError(f"{record.name!r} is called {record.per_step} times per step; batch_parallel={config.groups} "
                      f"groups can take one call each only with batch_parallel={record.per_step}, or slice the batch "
                      "of a denoiser called once per step")


def _group_call(call: dict[str, Any], rows: int, groups: int) -> dict[str, Any]:
    """The call one batch group makes: every input of the latent's batch cut to its first rows / B."""
    if groups == 1:
        return call
    if rows % groups:
        raise ConfigError(f"the denoiser batch of {rows} does not split into batch_parallel={groups} groups; use "
                          f"a batch_parallel that divides it")
    size = rows // groups
    return pytree.tree_map(lambda x: x[:size] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == rows else x,
                           call)


def whole_batch(captured: CapturedModel, groups: int) -> CapturedModel:
    """The binding of a capture made at batch / B: its batch inputs take B times the rows."""
    if groups == 1:
        return captured
    rows = captured.latent.shape[0]
    inputs = [replace(spec, shape=(spec.shape[0] * groups, *spec.shape[1:])) if spec.shape and spec.shape[0] == rows
              else spec for spec in captured.inputs]
    return replace(captured, inputs=inputs)


def used_names(segments: list[ReadySegment]) -> set[str]:
    """The model's parameter and buffer names some segment reads (what a rank may release of its own copy)."""
    found: set[str] = set()
    for segment in segments:
        module = segment.module
        if isinstance(module, torch.nn.Module):
            found.update(name for name, _ in (*module.named_parameters(), *module.named_buffers()))
    return found


def _timestep_input(captured: CapturedModel, record: DenoiserRecord, stride: int) -> str:
    name = next((s.name for s in captured.inputs if s.path == record.timestep), None)
    if name is None and stride == 2:
        raise ConfigError(
            f"stride 2 sets the timestep of the next step, but no input of {type(record.module).__name__} follows "
            f"the scheduler's timesteps (inputs: {[s.path for s in captured.inputs]}); use stride=1"
        )
    return name or "timestep"


def choose_plan(captured: CapturedModel, module: torch.nn.Module, segments: int, *, stride: int, warmup: int,
                plan: str | Path | None, cache_dir: str | Path | None, steps: int, latency_slack: float = 0.0,
                extrapolation: float = 0.0) -> Plan:
    """``plan`` loaded and checked against ``captured``, or a plan made from its (cached) profile.

    Raises:
        PlanError: ``plan`` was made for another model or shapes, or for another number of segments.
    """
    from asyncdiff_partition.core.profile import Profile, fingerprint
    from asyncdiff_partition.fx.opgraph import build_op_graph

    found = fingerprint(build_op_graph(captured), [s.to_dict() for s in captured.inputs])
    if plan is not None:
        loaded = Plan.load(plan, fingerprint=found)
        if loaded.n_devices != segments:
            raise PlanError(f"plan {str(plan)!r} splits the model into {loaded.n_devices} segments but this run has "
                            f"{segments}; pass the devices the plan was made for or make a plan for these")
        return loaded
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    tag = f"{device.type}{device.index if device.index is not None else ''}-{torch.get_num_threads()}t"
    path = Path(cache_dir or default_cache_dir()) / f"{found}.{tag}.profile.json"
    if path.is_file():
        profile = Profile.load(path)
    else:
        from asyncdiff_partition.fx.profiler import profile_model

        profile = profile_model(captured, model_name=type(module).__name__, device=str(device), repeats=3,
                                command="parallelize")
        profile.save(path)
    return make_plan(profile, segments, stride=stride, warmup=warmup, steps=steps, profile_path=str(path),
                     latency_slack=latency_slack, extrapolation=extrapolation)
