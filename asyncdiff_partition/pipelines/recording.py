"""Recording of a pipeline's denoiser calls during a dry run of the user's own call.

Example::

    recording = record_denoiser_calls(pipe, kwargs=dict(prompt="a red cube", height=512, width=512))
    denoiser = recording.denoisers[0]
    denoiser.name, denoiser.per_step, [c.position for c in denoiser.calls]    # 'transformer', 2, [0, 1]
    captured = capture_model(denoiser.module, (), denoiser.calls[0].call)

Note [finding the denoiser]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
No class table: during the dry run every ``torch.nn.Module`` component's ``forward`` is
recorded and every scheduler's ``step`` marks a step boundary (Note [step clock] in
:mod:`~asyncdiff_partition.pipelines.clock`). In each step, the denoiser is the component called in
it whose output looks most like the ``model_output`` handed to that ``step`` (a ControlNet or an
adapter is called every step too), then the one called last. A pipeline may call its denoiser
several times per step (separate guidance passes, PAG's perturbed pass, Heun's corrector), use
two denoisers in one run (Wan 2.2's ``transformer`` and ``transformer_2``) or run two loops on two
schedulers (Kandinsky's prior and decoder): all are found, each with its scheduler. The timestep
argument is the tensor input whose value follows the scheduler's timesteps in one of the forms
pipelines use (Note [timestep forms]).

Note [dry run]
~~~~~~~~~~~~~~
The dry run is the user's call as it is: ``output_type``, ``strength`` and the step count are
never overridden, arguments are copied before ``forward`` runs (a pipeline may empty a list it
passed, as T2I-Adapter's does), generators are copies in the same state and the global random
state is restored after. To keep it short, every component runs for real in the first
:data:`REAL_STEPS` steps it is called in; after that a call of the same structure returns a copy
of that component's last real output (right shapes, no compute), so the loop and the decoding
still run to the end and every denoiser of every loop is seen.

Note [timestep forms]
~~~~~~~~~~~~~~~~~~~~~
=========  ==============================================  ===================================
form       the loop passes                                  pipelines
=========  ==============================================  ===================================
t          ``scheduler.timesteps[k]``                       SD, SDXL, SD3, SVD, PixArt, DiT, ...
t/1000     ``scheduler.timesteps[k] / 1000``                Flux, Qwen-Image, Chroma
sigma      ``scheduler.sigmas[k]``                          sigma-parameterised models
=========  ==============================================  ===================================
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.clock import is_scheduler, remove_clock, step_clock
from asyncdiff_partition.pipelines.structure import (
    CallKey,
    OutputForm,
    call_key,
    configuration_state,
    normalize_call,
)

__all__ = ["FORMS", "REAL_STEPS", "Call", "DenoiserRecord", "Recording", "RecordingError", "components",
           "record_denoiser_calls", "schedulers", "timestep_values"]

REAL_STEPS = 2  # two steps tell the timestep input apart from constants (Note [dry run])

FORMS: dict[str, Callable[[Any], Tensor]] = {  # Note [timestep forms]: scheduler -> values per step
    "t": lambda scheduler: torch.as_tensor(scheduler.timesteps).double(),
    "t/1000": lambda scheduler: torch.as_tensor(scheduler.timesteps).double() / 1000,
    "sigma": lambda scheduler: torch.as_tensor(scheduler.sigmas).double(),
}


class RecordingError(AsyncDiffError, ValueError):
    """The dry run failed, or showed no denoiser called in the steps of a scheduler."""


@dataclass
class Call:
    """One denoiser call as the pipeline made it (tensors copied before ``forward`` ran).

    Attributes:
        step: the scheduler step it was made in (Note [step clock]).
        position: it was the ``position``-th call of this denoiser in that step.
        call: the normalized call (:func:`~asyncdiff_partition.pipelines.structure.normalize_call`).
        key: its structure (:func:`~asyncdiff_partition.pipelines.structure.call_key`).
        configuration: the attention processors in place during the call (capture under
            :func:`~asyncdiff_partition.pipelines.structure.configured`).
    """

    step: int
    position: int
    call: dict[str, Any]
    key: CallKey
    configuration: dict[str, Any] = field(default_factory=dict)


@dataclass
class DenoiserRecord:
    """One denoiser of a pipeline and its calls in the dry run.

    Attributes:
        name: the pipeline component (``unet``, ``transformer_2``, ``prior``, ...).
        module: the model.
        scheduler: the scheduler whose steps its predictions feed.
        calls: the first call of every distinct (position, structure), in call order.
        steps: the scheduler steps it was called in.
        per_step: the most calls it got in one step.
        timestep: the argument path of the timestep, None if no input follows the scheduler.
        form: how that input relates to the scheduler (a key of :data:`FORMS`), or None.
        output: how it returns its prediction.
        rows: the batch of its prediction (the latent's batch: guidance passes batched in).
    """

    name: str
    module: torch.nn.Module
    scheduler: Any
    calls: list[Call]
    steps: list[int]
    per_step: int
    timestep: str | None
    form: str | None
    output: OutputForm
    rows: int = 1


@dataclass
class Recording:
    """What the dry run showed: every denoiser, in the order of their first calls."""

    denoisers: list[DenoiserRecord]
    pipeline: str = ""
    steps: dict[str, int] = field(default_factory=dict)  # scheduler component -> steps made

    def denoiser(self, name: str) -> DenoiserRecord:
        return next(d for d in self.denoisers if d.name == name)


def timestep_values(scheduler: Any, form: str | None) -> list[float] | None:
    """The values the loop feeds the denoiser at each step (Note [timestep forms]); None if unknown.

    Starts at the scheduler's ``begin_index`` when it has one (image-to-image loops skip steps).
    """
    if form is None:
        return None
    values = FORMS[form](scheduler).tolist()
    begin = getattr(scheduler, "begin_index", None) or 0
    return values[begin:]


def components(pipe: Any) -> dict[str, Any]:
    """The pipeline's registered components by name (``pipe.components``, else its attributes)."""
    found = getattr(pipe, "components", None)
    return dict(found) if isinstance(found, Mapping) else dict(vars(pipe))


def schedulers(pipe: Any) -> dict[str, Any]:
    """The pipeline's schedulers by component name, each object once."""
    seen: set[int] = set()
    found = {}
    for name, value in components(pipe).items():
        if is_scheduler(value) and id(value) not in seen:
            seen.add(id(value))
            found[name] = value
    return found


# --- the dry run ------------------------------------------------------------------------------


@dataclass
class _Event:
    kind: str  # "call" or "step"
    interval: int  # steps of any scheduler made before it
    name: str = ""  # component, or scheduler
    position: int = 0
    call: dict[str, Any] | None = None  # copied, for real calls only
    key: Any = None
    shape: tuple[int, ...] | None = None  # first output leaf / model_output
    clocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    output: Any = None  # the first real output of a component
    configuration: dict[str, Any] = field(default_factory=dict)  # its attention processors then


def record_denoiser_calls(pipe: Any, args: tuple = (), kwargs: Mapping[str, Any] | None = None, *,
                          real_steps: int = REAL_STEPS, run: Callable[..., Any] | None = None) -> Recording:
    """Run ``pipe(*args, **kwargs)`` once as a dry run and record its denoisers' calls (Note [dry run]).

    ``run`` calls the pipeline instead of ``pipe(...)`` (a parallelized pipeline's own call).

    Raises:
        RecordingError: the pipeline has no scheduler, failed, or no denoiser was found.
    """
    name = type(pipe).__name__
    modules = {n: m for n, m in components(pipe).items() if isinstance(m, torch.nn.Module)}
    clocks_of = schedulers(pipe)
    if not modules:
        raise RecordingError(f"{name} has no torch.nn.Module components to record")
    if not clocks_of:
        raise RecordingError(f"{name} has no scheduler (no component with set_timesteps and step); parallelize needs "
                             "a pipeline that denoises step by step with a diffusers-style scheduler")
    installed = {n: "step" not in vars(s) for n, s in clocks_of.items()}
    clocks = {n: step_clock(s) for n, s in clocks_of.items()}
    events: list[_Event] = []
    steps_made = [0]
    listeners = {}
    for sname, clock in clocks.items():
        def listener(a: tuple, kw: dict, sname: str = sname) -> None:
            model_output = a[0] if a else kw.get("model_output")
            events.append(_Event("step", steps_made[0], sname, shape=_shape(model_output)))
            steps_made[0] += 1
        listeners[sname] = listener
        clock.listeners.append(listener)
    real: dict[tuple[str, int, Any], list[int]] = defaultdict(list)  # (name, position, key) -> intervals run
    last_output: dict[tuple[str, int, Any], Any] = {}
    calls_in: dict[tuple[str, int], int] = defaultdict(int)
    patched: list[tuple[torch.nn.Module, Any]] = []  # (module, its own instance forward or None)
    for cname, module in modules.items():
        forward = _unscheduled_forward(module)

        def record(*a: Any, _name: str = cname, _module: torch.nn.Module = module,
                   _forward: Callable[..., Any] = forward, **kw: Any) -> Any:
            interval = steps_made[0]
            position = calls_in[(_name, interval)]
            calls_in[(_name, interval)] += 1
            call: dict[str, Any] | None = None
            key: Any = ("unbound", interval, position)
            try:
                call = normalize_call(_module, a, kw)
                key = call_key(_module, call)
            except AsyncDiffError:
                pass
            slot = (_name, position, key)
            seen = real[slot]
            replay = len(seen) >= real_steps and seen[-1] != interval
            event = _Event("call", interval, _name, position, key=key,
                           clocks={n: c.now() for n, c in clocks.items()})
            if replay:
                out = _clone(last_output[slot])
            else:
                event.call = _clone(call) if call is not None else None
                event.configuration = configuration_state(_module)
                out = _forward(*a, **kw)
                if interval not in seen:
                    seen.append(interval)
                last_output[slot] = _clone(out)
                event.output = out
            event.shape = _first_shape(out)
            events.append(event)
            return out

        patched.append((module, module.__dict__.get("forward")))
        module.__dict__["forward"] = functools.wraps(forward)(record)  # pipelines read its signature
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            with torch.no_grad():
                (run or pipe)(*args, **_dry_kwargs(dict(kwargs or {})))
    except AsyncDiffError:
        raise
    except Exception as error:
        raise RecordingError(f"the dry run of {name} with {sorted(kwargs or {})} failed: {type(error).__name__}: "
                             f"{' '.join(str(error).split())}; check the call arguments by calling the pipeline "
                             "once without parallelize") from error
    finally:
        for module, before in patched:
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = before
        for sname, clock in clocks.items():
            clock.listeners.remove(listeners[sname])
            if installed[sname]:
                remove_clock(clocks_of[sname])
    return _analyse(name, modules, clocks_of, events)


def _unscheduled_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """The model's own forward, also under a scheduled denoiser installed on it (pipelines.wrap)."""
    current = module.__dict__.get("forward")
    original = getattr(current, "original_forward", None)
    return original if original is not None else module.forward


def _dry_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The user's arguments; generators replaced by copies in the same state."""
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        kwargs["generator"] = _copy_generator(generator)
    elif isinstance(generator, list):
        kwargs["generator"] = [_copy_generator(g) if isinstance(g, torch.Generator) else g for g in generator]
    return kwargs


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    return copy


def _clone(value: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, value)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _first_shape(out: Any) -> tuple[int, ...] | None:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, Tensor)]
    return tuple(leaves[0].shape) if leaves else None


# --- what the events show --------------------------------------------------------------------


def _score(shape: tuple[int, ...] | None, expected: tuple[int, ...] | None) -> int:
    """How much an output looks like the prediction a scheduler step took (0: not at all).

    The batch is left out (guidance passes are split after the call); one dimension twice as
    large is a learned variance (DiT's channels, Shap-E's last dimension).
    """
    if shape is None or expected is None or len(shape) != len(expected):
        return 0
    mine, theirs = shape[1:], expected[1:]
    if mine == theirs:
        return 3
    differ = [(a, b) for a, b in zip(mine, theirs) if a != b]
    if len(differ) == 1 and differ[0][0] == 2 * differ[0][1]:
        return 2
    return 1 if shape[2:] == expected[2:] else 0


def _analyse(pipeline: str, modules: dict[str, torch.nn.Module], scheds: dict[str, Any],
             events: list[_Event]) -> Recording:
    steps = [e for e in events if e.kind == "step"]
    if not steps:
        raise RecordingError(f"the dry run of {pipeline} never called scheduler.step; parallelize needs a pipeline "
                             "whose loop steps its scheduler once per denoising step")
    calls = [e for e in events if e.kind == "call"]
    owner: dict[str, str] = {}  # denoiser -> scheduler
    for step in steps:
        inside = [e for e in calls if e.interval == step.interval]
        best = max(inside, key=lambda e: (_score(e.shape, step.shape), calls.index(e)), default=None)
        if best is None or _score(best.shape, step.shape) == 0:
            continue
        if owner.setdefault(best.name, step.name) != step.name:
            raise RecordingError(f"{pipeline}'s component {best.name!r} feeds the steps of two schedulers "
                                 f"({owner[best.name]!r} and {step.name!r}); parallelize cannot tell its loops apart")
    if not owner:
        raise RecordingError(f"no component of {pipeline} ({', '.join(modules)}) returned the prediction its scheduler "
                             "steps on; parallelize needs a denoiser called in every denoising step")
    order = sorted(owner, key=lambda n: next(i for i, e in enumerate(calls) if e.name == n))
    return Recording([_denoiser(pipeline, n, modules[n], owner[n], scheds[owner[n]], calls) for n in order], pipeline,
                     {n: sum(s.name == n for s in steps) for n in scheds})


def _denoiser(pipeline: str, name: str, module: torch.nn.Module, sname: str, scheduler: Any,
              events: list[_Event]) -> DenoiserRecord:
    mine = [e for e in events if e.name == name and sname in e.clocks]
    by_step: dict[int, list[_Event]] = defaultdict(list)
    for e in mine:
        by_step[e.clocks[sname][1]].append(e)
    first: dict[tuple[int, Any], Call] = {}
    for e in mine:
        slot = (e.position, e.key)
        if slot not in first:
            if e.call is None:
                raise RecordingError(f"{pipeline} calls its denoiser {name!r} in a way parallelize cannot bind to "
                                     f"{type(module).__name__}.forward (positional *args?)")
            first[slot] = Call(e.clocks[sname][1], e.position, e.call, e.key, e.configuration)
    output = next(e.output for e in mine if e.output is not None)
    form_of = OutputForm.of(output, f"{pipeline}'s denoiser {name!r} ({type(module).__name__})")
    timestep, form = _find_timestep(module, [e for e in mine if e.position == 0 and e.call is not None], sname,
                                    scheduler)
    shape = next(e.shape for e in mine if e.shape)
    return DenoiserRecord(name, module, scheduler, list(first.values()), sorted(by_step),
                          max(len(v) for v in by_step.values()), timestep, form, form_of, shape[0] if shape else 1)


def _find_timestep(module: torch.nn.Module, calls: list[_Event], sname: str,
                   scheduler: Any) -> tuple[str | None, str | None]:
    """The argument path whose value follows the scheduler in one of :data:`FORMS`, at every recorded step."""
    flat = []
    for e in calls:
        assert e.call is not None
        flat.append((e.clocks[sname][1], dict(pytree.tree_flatten_with_path(e.call)[0])))
    for form in FORMS:
        try:
            values = timestep_values(scheduler, form)
        except (AttributeError, TypeError, RuntimeError):
            continue
        if not values:
            continue
        for path in flat[0][1]:
            if all(_follows(leaves.get(path), values, step) for step, leaves in flat):
                return pytree.keystr(path).removeprefix("['").split("']")[0], form
    return None, None


def _follows(value: Any, expected: list[float], step: int) -> bool:
    if not isinstance(value, Tensor) or value.numel() == 0 or step >= len(expected) or not (
            value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
        return False
    flat = value.detach().double().flatten().cpu()
    target = torch.tensor(expected[step], dtype=torch.float64)
    return bool(torch.all(flat == flat[0])) and bool(torch.isclose(flat[0], target, rtol=5e-3, atol=1e-4))
