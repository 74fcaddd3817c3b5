"""Recording of a pipeline's denoiser call during a short dry run of the pipeline itself.

Example::

    recording = record_denoiser_call(pipe, prompt="a red cube", height=512, width=512)
    recording.name, recording.kwargs.keys()      # 'unet', the exact call the loop makes
    captured = capture_model(recording.module, recording.args, recording.kwargs)

Note [finding the denoiser]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
No class table: during the dry run every ``torch.nn.Module`` component's ``forward`` is
recorded and ``scheduler.step`` marks the step boundaries. The denoiser is the component
called the same number of times between every two scheduler steps (text and image encoders run
once, before the loop; the VAE after it), and among those (a ControlNet is called every step
too) the one whose output looks most like the ``model_output`` handed to ``scheduler.step``,
then the one called last in the step. The timestep argument is the tensor input whose value
follows the scheduler's timesteps in one of the forms pipelines use (Note [timestep forms]).

Note [timestep forms]
~~~~~~~~~~~~~~~~~~~~~
=========  ==============================================  ===================================
form       the loop passes                                  pipelines
=========  ==============================================  ===================================
t          ``scheduler.timesteps[k]``                       SD, SDXL, SD3, SVD, PixArt, DiT, ...
t/1000     ``scheduler.timesteps[k] / 1000``                Flux
sigma      ``scheduler.sigmas[k]``                          sigma-parameterised models
=========  ==============================================  ===================================
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["FORMS", "Recording", "RecordingError", "record_denoiser_call", "timestep_values"]

DRY_RUN_STEPS = 2  # two steps tell the timestep input apart from constants

FORMS: dict[str, Callable[[Any], Tensor]] = {  # Note [timestep forms]: scheduler -> values per step
    "t": lambda scheduler: scheduler.timesteps.double(),
    "t/1000": lambda scheduler: scheduler.timesteps.double() / 1000,
    "sigma": lambda scheduler: torch.as_tensor(scheduler.sigmas).double(),
}


class RecordingError(AsyncDiffError, ValueError):
    """The dry run did not show one denoiser called once per scheduler step."""


@dataclass
class Recording:
    """The denoiser's first call of a dry run, exactly as the pipeline made it.

    Attributes:
        name: the pipeline attribute holding the denoiser (``unet``, ``transformer``, ...).
        module: the denoiser.
        args, kwargs: its first call (tensors cloned), ``None`` keyword arguments, nesting and
            the timestep's own shape included.
        timestep: the bound argument path of the timestep (``timestep``, ``t``), None if no
            input follows the scheduler's timesteps.
        form: how the timestep relates to the scheduler (a key of :data:`FORMS`), or None.
        steps: scheduler steps the dry run made.
    """

    name: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    timestep: str | None
    form: str | None
    steps: int


def timestep_values(scheduler: Any, form: str | None) -> list[float] | None:
    """The values the loop feeds the denoiser at each step (Note [timestep forms]); None if unknown.

    Starts at the scheduler's ``begin_index`` when it has one (image-to-image loops skip steps).
    """
    if form is None:
        return None
    values = FORMS[form](scheduler).tolist()
    begin = getattr(scheduler, "begin_index", None) or 0
    return values[begin:]


class _Stop(Exception):
    """Ends the dry run once enough steps were seen."""


def record_denoiser_call(pipe: Any, *, steps: int = DRY_RUN_STEPS, **call_kwargs: Any) -> Recording:
    """Run ``pipe(**call_kwargs)`` for ``steps`` steps and record its denoiser's call.

    The pipeline is left as it was: its scheduler is a copy during the run, the global random
    state is restored, a generator in ``call_kwargs`` is replaced by a fresh seeded one, and the
    run stops after ``steps`` scheduler steps (no decoding). Note [finding the denoiser].

    Raises:
        RecordingError: no component was called once per step, or the pipeline failed.
    """
    components = _components(pipe)
    if not components:
        raise RecordingError(f"{type(pipe).__name__} has no torch.nn.Module components to record")
    events: list[tuple[str, Any]] = []
    scheduler = pipe.scheduler
    dry = copy.deepcopy(scheduler)
    original_step = dry.step

    def step(*args: Any, **kwargs: Any) -> Any:
        model_output = args[0] if args else kwargs.get("model_output")
        events.append(("step", _shape(model_output)))
        result = original_step(*args, **kwargs)
        if sum(kind == "step" for kind, _ in events) >= steps:
            raise _Stop
        return result

    dry.step = step
    for name, module in components.items():
        module.forward = _recorder(name, module.forward, events)
    pipe.scheduler = dry
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            with torch.no_grad():
                pipe(**_dry_kwargs(pipe, call_kwargs, steps))
    except _Stop:
        pass
    except AsyncDiffError:
        raise
    except Exception as error:
        raise RecordingError(f"the dry run of {type(pipe).__name__} with {sorted(call_kwargs)} failed: "
                             f"{type(error).__name__}: {' '.join(str(error).split())}; check the call arguments "
                             f"by calling the pipeline once without parallelize") from error
    finally:
        pipe.scheduler = scheduler
        for module in components.values():
            module.__dict__.pop("forward", None)
    return _analyse(pipe, components, events, dry)


def _components(pipe: Any) -> dict[str, torch.nn.Module]:
    found = getattr(pipe, "components", None)
    if not isinstance(found, dict):
        found = vars(pipe)
    return {name: m for name, m in found.items() if isinstance(m, torch.nn.Module)}


def _dry_kwargs(pipe: Any, call_kwargs: dict[str, Any], steps: int) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(call_kwargs)
    if "num_inference_steps" in params:
        kwargs["num_inference_steps"] = steps
    if "output_type" in params:
        kwargs["output_type"] = "latent"
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        kwargs["generator"] = torch.Generator(generator.device).manual_seed(0)
    elif isinstance(generator, list):
        kwargs["generator"] = [torch.Generator(g.device).manual_seed(0) for g in generator]
    return kwargs


def _recorder(name: str, forward: Callable[..., Any], events: list[tuple[str, Any]]) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        events.append(("call", (name, _clone(args), _clone(kwargs), _first_shape(out))))
        return out

    return record


def _clone(value: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, value)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _first_shape(out: Any) -> tuple[int, ...] | None:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, Tensor)]
    return tuple(leaves[0].shape) if leaves else None


def _analyse(pipe: Any, components: dict[str, torch.nn.Module], events: list[tuple[str, Any]], scheduler: Any) -> Recording:
    intervals: list[list[tuple]] = [[]]
    outputs: list[tuple[int, ...] | None] = []
    for kind, data in events:
        if kind == "step":
            intervals.append([])
            outputs.append(data)
        else:
            intervals[-1].append(data)
    loop = intervals[: len(outputs)]
    pipeline = type(pipe).__name__
    if not loop:
        raise RecordingError(f"the dry run of {pipeline} never called scheduler.step; parallelize needs a "
                             "pipeline whose loop calls its scheduler once per step")
    counts = [{name: sum(c[0] == name for c in calls) for name in components} for calls in loop]
    candidates = [name for name in components if counts[0][name] >= 1 and all(c[name] == counts[0][name] for c in counts)]
    if not candidates:
        raise RecordingError(f"no component of {pipeline} ({', '.join(components)}) was called in every step of the "
                             "dry run; parallelize needs the denoiser called once per scheduler step")

    def score(name: str) -> tuple[int, int]:
        out, expected = [c[3] for c in loop[0] if c[0] == name][-1], outputs[0]
        last = max(i for i, c in enumerate(loop[0]) if c[0] == name)
        if out is None or expected is None or out[2:] != expected[2:]:
            return 0, last
        return (3 if out[1:] == expected[1:] else 2 if out[1] == 2 * expected[1] else 1), last

    name = max(candidates, key=score)
    if counts[0][name] != 1:
        raise RecordingError(f"{pipeline} calls its denoiser {name!r} {counts[0][name]} times per step (separate "
                             "guidance passes?); parallelize needs one call per step: batch the passes")
    calls = [next(c for c in interval if c[0] == name) for interval in loop]
    module = components[name]
    timestep, form = _find_timestep(module, calls, scheduler)
    _, args, kwargs, _ = calls[0]
    return Recording(name, module, args, kwargs, timestep, form, len(loop))


def _find_timestep(module: torch.nn.Module, calls: list[tuple], scheduler: Any) -> tuple[str | None, str | None]:
    """The bound argument path whose value follows the scheduler in one of :data:`FORMS`."""
    bound = []
    signature = inspect.signature(module.forward)
    for _, args, kwargs, _ in calls:
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return None, None
        bound.append(dict(pytree.tree_flatten_with_path(dict(arguments))[0]))
    for form, values in FORMS.items():
        try:
            expected = values(scheduler)
        except (AttributeError, TypeError):
            continue
        for path in bound[0]:
            if all(_follows(b.get(path), expected, k) for k, b in enumerate(bound)):
                return pytree.keystr(path).removeprefix("['").split("']")[0], form
    return None, None


def _follows(value: Any, expected: Tensor, k: int) -> bool:
    if not isinstance(value, Tensor) or value.numel() == 0 or k >= len(expected) or not value.dtype.is_floating_point \
            and value.dtype not in (torch.int32, torch.int64):
        return False
    flat = value.detach().double().flatten().cpu()
    return bool(torch.all(flat == flat[0])) and bool(torch.isclose(flat[0], expected[k], rtol=5e-3, atol=1e-4))
