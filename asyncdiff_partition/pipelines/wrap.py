"""Run the schedule inside a denoising loop: diffusers pipelines and custom loops.

Example::

    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured = capture_for_pipeline(built, batch=2)
    schedule = ReferenceSchedule(split_graph(captured, build_op_graph(captured), plan.boundaries), warmup=1)
    wrap_pipeline(built.pipe, schedule, captured)       # pipe.unet now runs the schedule
    images = built(steps=20, guidance_scale=5.0)          # PIL images

The pipeline and its denoiser stay what they are: a :class:`ScheduledDenoiser` is installed as
the denoiser's ``forward`` (on the instance), so everything a pipeline reads or sets on the model
(``config``, ``dtype``, ``named_modules()``, attention processors, LoRA scales) is the model's own,
and each call goes to a :class:`~asyncdiff_partition.runtime.reference.StepDenoiser` (the
single-process ``ReferenceSchedule`` or one rank's ``AsyncDenoiser``). A model of your own,
outside diffusers, is run with :func:`denoise`. :func:`~asyncdiff_partition.pipelines.parallelize.
parallelize` installs scheduled denoisers for any pipeline; the ``asyncdiff-partition run``
command is :mod:`~asyncdiff_partition.app.job`.

Note [streams]
~~~~~~~~~~~~~~
A step may call the denoiser several times (conditional and unconditional passes, PAG's
perturbed pass). Each call *position* k of a step is its own stream: call k of step s reads the
stale values that call k of step s - 1 left, never those of another position. A stream is one
step denoiser with its own state; it starts at the step of its first call in a run (Wan 2.2's
``transformer_2`` starts at its boundary step) and runs to the end of its scheduler's timesteps,
with its own warm-up (``warmup`` at step 0, ``switch_warmup`` for a stream that starts later).
Steps are the scheduler's (Note [step clock] in :mod:`~asyncdiff_partition.pipelines.clock`);
warm-up is counted in the pipeline's inference steps, so ``warmup >= num_inference_steps`` is
exact whatever the scheduler (PNDM's extra call, Heun's two calls per step). Streams of calls
with the same structure share one capture, one placement and one set of weights (Note [call
structure] in :mod:`~asyncdiff_partition.pipelines.structure`).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx
from torch import Tensor

from asyncdiff_partition.core.errors import UnsupportedError
from asyncdiff_partition.core.schedule import ScheduleError
from asyncdiff_partition.fx.capture import CallError, CapturedModel, InputSpec
from asyncdiff_partition.pipelines.clock import step_clock
from asyncdiff_partition.pipelines.structure import CallKey, DenoiserOutput, OutputForm, call_key, normalize_call

__all__ = [
    "DenoiserOutput",
    "NeedsCapture",
    "ScheduledDenoiser",
    "Stream",
    "call_binding",
    "denoise",
    "denoiser_name",
    "fit_inputs",
    "install",
    "scheduled",
    "takes_argument",
    "unwrap_pipeline",
    "wrap_pipeline",
]

Inputs = dict[str, Tensor]  # model inputs by captured placeholder name


class NeedsCapture(UnsupportedError):
    """A denoiser call whose structure nothing was captured for (Note [call structure])."""

    def __init__(self, name: str, position: int, step: int, key: CallKey, hint: str):
        self.name, self.position, self.step, self.key = name, position, step, key
        super().__init__(f"the pipeline called its denoiser {name!r} (call {position} of step {step}) with a call "
                         f"structure it was not prepared for (other shapes, arguments or attention set-up); {hint}")


# --- inputs: pipeline call -> captured placeholders -------------------------------------------


def fit_inputs(captured: CapturedModel, tensors: Sequence[Tensor]) -> Inputs:
    """Flat call tensors → ``{placeholder: tensor}`` with the captured shapes and dtypes.

    A one-element tensor (a pipeline's scalar timestep) is broadcast to the captured shape;
    dtypes are cast to the captured ones. Any other shape difference is an error.

    Raises:
        CallError: a tensor's shape differs from the captured one (the latent, most often).
    """
    out: Inputs = {}
    for spec, t in zip(captured.inputs, tensors):
        t = torch.as_tensor(t)
        if tuple(t.shape) != spec.shape:
            if t.numel() != 1:
                raise CallError(_shape_error(captured, spec, tuple(t.shape)))
            t = t.reshape(()).expand(spec.shape)
        dtype = getattr(torch, spec.dtype)
        out[spec.name] = t if t.dtype == dtype else t.to(dtype)
    return out


def _shape_error(captured: CapturedModel, spec: InputSpec, shape: tuple[int, ...]) -> str:
    what = "latent" if spec.is_latent else "input"
    latent = captured.latent.shape
    return (
        f"the denoiser's {what} {spec.path!r} has shape {tuple(shape)} but the model was captured (and the "
        f"plan profiled) with {spec.shape}; run the pipeline at the profiled size (denoiser batch {latent[0]}, "
        f"latent {'x'.join(map(str, latent[2:]))}) or profile and plan again at this size"
    )


def _flatten(captured: CapturedModel, call: dict[str, Any]) -> list[Tensor]:
    """A normalized call → the captured graph's flat tensors."""
    try:
        return captured.flatten(**call)
    except CallError as error:
        captured_paths = [spec.path for spec in captured.inputs]
        raise CallError(
            f"{error}; this call passed {sorted(call)}, the captured call had tensors {captured_paths}"
        ) from None


# --- streams ----------------------------------------------------------------------------------


@dataclass
class Stream:
    """One call position's step denoiser (Note [streams]) and the capture that binds its calls."""

    binding: CapturedModel
    denoiser: Any  # a StepDenoiser
    index: int = 0
    run: Any = None  # the run it is in, and the next step it expects
    next: int = 0
    start: int = 0

    def begin(self, run: Any, step: int, values: Sequence[float | None], warmup: int) -> None:
        if hasattr(self.denoiser, "warmup"):
            self.denoiser.warmup = warmup
        self.denoiser.reset(list(values))
        self.run, self.next, self.start = run, step, step


class Program(Protocol):
    """Where a scheduled denoiser gets the stream of a call position and structure."""

    def stream(self, name: str, position: int, key: CallKey, step: int, index: int) -> Stream:
        """A new stream, or :class:`NeedsCapture` when nothing was captured for ``key``."""


@dataclass
class _Fixed:
    """The program of :func:`wrap_pipeline`: one given step denoiser, one call per step."""

    binding: CapturedModel
    denoiser: Any
    streams: dict[int, Stream] = field(default_factory=dict)

    def stream(self, name: str, position: int, key: CallKey, step: int, index: int) -> Stream:
        if position:
            raise UnsupportedError(f"the pipeline calls its denoiser {name!r} {position + 1} times in step {step}; "
                                   "wrap_pipeline runs one step denoiser once per step: use parallelize(pipe, ...), "
                                   "which gives each call its own stream")
        return self.streams.setdefault(0, Stream(self.binding, self.denoiser))


# --- the drop-in forward ----------------------------------------------------------------------


class ScheduledDenoiser:
    """The denoiser's ``forward`` while it runs a schedule (installed by :func:`install`).

    Each call finds its scheduler step and position (Note [streams]), its structure (Note
    [call structure]) and so its stream; it is flattened with the stream's capture, fitted to
    the captured shapes (:func:`fit_inputs`) and given to the stream's step denoiser; the
    prediction comes back as the model returns it (:class:`~asyncdiff_partition.pipelines.
    structure.OutputForm`).

    Args:
        module: the denoiser.
        name: its component name in the pipeline (for messages).
        program: gives the stream of a new call position or structure.
        scheduler: returns the scheduler whose steps this denoiser's calls belong to.
        form: how the loop's timestep relates to that scheduler (Note [timestep forms]); None:
            not checked.
        output: how the model returns its prediction.
        warmup: exact steps at the start of a run, in inference steps.
        switch_warmup: exact steps of a stream that starts later in a run (default ``warmup``).
    """

    def __init__(self, module: torch.nn.Module, name: str, program: Program, *, scheduler: Callable[[], Any],
                 form: str | None = "t", output: OutputForm | None = None, warmup: int = 1,
                 switch_warmup: int | None = None):
        current = module.__dict__.get("forward")
        self.original_forward: Callable[..., Any] = current if current is not None else module.forward
        self.__signature__ = inspect.signature(self.original_forward)
        self.module, self.name, self.program = module, name, program
        self._scheduler, self.form, self.output = scheduler, form, output or OutputForm("tuple")
        self.warmup = warmup
        self.switch_warmup = warmup if switch_warmup is None else switch_warmup
        param = self.__signature__.parameters.get("return_dict")
        self._return_dict = bool(param.default) if param is not None and param.default is not param.empty else False
        self.streams: dict[tuple[int, CallKey], Stream] = {}
        self._run: Any = None
        self._position: tuple[int, int] = (-1, 0)  # (step, calls made in it)
        self.step_ms: list[float] = []
        self.step_spans: list[dict[str, Any]] = []

    @property
    def denoiser(self) -> Any:
        """The step denoiser of the first stream (one per call position: see :attr:`streams`)."""
        first = next(iter(self.streams.values()), None)
        if first is None and isinstance(self.program, _Fixed):
            return self.program.denoiser
        return first.denoiser if first is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.get("return_dict", self._return_dict)
        scheduler = self._scheduler()
        clock = step_clock(scheduler)
        count, step = clock.now()
        run = (id(scheduler), count)
        if run != self._run:
            self._run, self._position = run, (-1, 0)
            self.step_ms, self.step_spans = [], []
        position = self._position[1] if self._position[0] == step else 0
        self._position = (step, position + 1)
        call = normalize_call(self.module, args, kwargs)
        key = call_key(self.module, call)
        stream = self.streams.get((position, key))
        if stream is None:
            stream = self.program.stream(self.name, position, key, step, len(self.streams))
            self.streams[(position, key)] = stream
        if stream.run != run:
            stream.begin(run, step, *self._run_of(scheduler, step))
        elif stream.next != step:
            raise ScheduleError(f"call {position} of {self.name!r} came at step {step} but its stream's last call was "
                                f"at step {stream.next - 1}; a pipeline that skips a denoiser call in some steps "
                                "cannot keep its stale values in order")
        inputs = fit_inputs(stream.binding, _flatten(stream.binding, call))
        begin = time.perf_counter()
        eps = stream.denoiser(inputs)
        end = time.perf_counter()
        stream.next = step + 1
        self.step_ms.append((end - begin) * 1e3)
        self.step_spans.append({"name": f"step {step} call {position}", "start_s": begin, "end_s": end})
        return self.output.build(eps, return_dict)

    def _run_of(self, scheduler: Any, start: int) -> tuple[list[float | None], int]:
        """The timestep values from ``start`` to the end of the run, and the stream's warm-up there."""
        from asyncdiff_partition.pipelines.recording import timestep_values

        known = timestep_values(scheduler, self.form)
        if known is None:
            begin = getattr(scheduler, "begin_index", None) or 0
            values: list[float | None] = [None] * max(len(scheduler.timesteps) - begin, start + 1)
        else:
            values = list(known)
        total = len(values)
        inference = int(getattr(scheduler, "num_inference_steps", None) or total)
        warmup = self.warmup if start == 0 else self.switch_warmup
        if self.warmup >= inference or warmup >= inference:
            exact = total - start
        else:
            exact = math.ceil(warmup * total / max(inference, 1))
        return values[start:], exact

    def abandon(self) -> None:
        """End every stream's run where it is (a pipeline call that stopped part way); every rank must."""
        for stream in self.streams.values():
            drain = getattr(stream.denoiser, "abandon", None)
            if drain is not None:
                drain()
            stream.run = None
        self._run = None

    def report(self) -> list[dict[str, Any]]:
        """Per stream and step: its step denoiser's report (``call`` = the stream's position), else this wrapper's timings."""
        rows = []
        for (position, _), stream in self.streams.items():
            if hasattr(stream.denoiser, "report"):
                rows += [dict(row, call=position, stream=stream.index) for row in stream.denoiser.report()]
        if rows:
            return rows
        if isinstance(self.program, _Fixed) and hasattr(self.program.denoiser, "report"):
            return list(self.program.denoiser.report())
        return [{"step": s, "rank": 0, "compute_ms": ms, "wait_ms": 0.0, "comm_ms": 0.0, "bytes_sent": 0}
                for s, ms in enumerate(self.step_ms)]

    def spans(self) -> list[dict[str, Any]]:
        """Every stream's spans if its step denoiser keeps them, else one span per call."""
        found = []
        for (position, _), stream in self.streams.items():
            if hasattr(stream.denoiser, "spans"):
                found += [dict(span, call=position) for span in stream.denoiser.spans()]
        return found or list(self.step_spans)

    @property
    def captured(self) -> CapturedModel:
        """The capture that binds the first stream's calls."""
        first = next(iter(self.streams.values()), None)
        if first is None and isinstance(self.program, _Fixed):
            return self.program.binding
        assert first is not None, "no call was made yet"
        return first.binding


def scheduled(module: Any) -> ScheduledDenoiser | None:
    """The scheduled denoiser installed on ``module``, if any."""
    current = getattr(module, "__dict__", {}).get("forward")
    return current if isinstance(current, ScheduledDenoiser) else None


def install(module: torch.nn.Module, denoiser: ScheduledDenoiser) -> ScheduledDenoiser:
    """Make ``denoiser`` the model's ``forward`` (an earlier one is removed first)."""
    uninstall(module)
    denoiser.original_forward = module.__dict__.get("forward") or module.forward
    module.__dict__["forward"] = denoiser
    return denoiser


def uninstall(module: torch.nn.Module) -> None:
    """The model's own ``forward`` back (or the instance forward it had before)."""
    current = scheduled(module)
    if current is None:
        return
    original = current.original_forward
    if getattr(original, "__self__", None) is module and getattr(original, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = original


def wrap_pipeline(pipe: Any, denoiser: Any, captured: CapturedModel, *, name: str | None = None,
                  form: str | None = "t") -> Any:
    """Run ``denoiser`` (one step denoiser, one call per step) in place of the pipeline's denoiser; returns ``pipe``.

    The pipeline's unmodified ``__call__`` then runs the schedule; one sampling run per call.
    For pipelines that call their denoiser more than once per step, use
    :func:`~asyncdiff_partition.pipelines.parallelize.parallelize`.

    Example:
        >>> wrap_pipeline(pipe, ReferenceSchedule(segments, warmup=50), captured)  # doctest: +SKIP

    Args:
        name: the component to replace (a recording's denoiser name); default: the attribute
            holding the captured model (:func:`denoiser_name`).
        form: how the loop's timestep relates to ``pipe.scheduler`` (Note [timestep forms]);
            None: not checked.

    Raises:
        TypeError: no ``name`` and no attribute of the pipeline holds the captured model.
    """
    name = name or denoiser_name(pipe, captured.model)
    module = getattr(pipe, name)
    scheduled_forward = ScheduledDenoiser(module, name, _Fixed(captured, denoiser),
                                          scheduler=lambda: pipe.scheduler, form=form,
                                          output=OutputForm("class", DenoiserOutput, "sample"))
    install(module, scheduled_forward)
    return pipe


def unwrap_pipeline(pipe: Any) -> Any:
    """Undo :func:`wrap_pipeline`: every component's own ``forward`` back; returns ``pipe``."""
    for value in list(vars(pipe).values()) + list(getattr(pipe, "components", {}).values()):
        if isinstance(value, torch.nn.Module):
            uninstall(value)
    return pipe


def call_binding(captured: CapturedModel) -> CapturedModel:
    """The capture without its graph and examples: what :class:`ScheduledDenoiser` needs to bind calls."""
    from dataclasses import replace

    empty = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return replace(captured, graph_module=empty, example=[])


def denoiser_name(pipe: Any, module: Any = None) -> str:
    """The pipeline attribute holding ``module``: by identity, else the one component of its class;
    without ``module``, the attribute holding a model with a :class:`ScheduledDenoiser`.

    Found, not named: no table of ``unet`` / ``transformer``; a pipeline's own call finds its
    denoisers with :func:`~asyncdiff_partition.pipelines.recording.record_denoiser_calls`.

    Raises:
        TypeError: no attribute (or several of the class) holds it.
    """
    found = [(name, value) for name, value in vars(pipe).items() if isinstance(value, torch.nn.Module)]
    same = [name for name, value in found if module is not None and value is module]
    if not same and module is not None:
        same = [name for name, value in found if type(value) is type(module)]
    if module is None:
        same = [name for name, value in found if scheduled(value) is not None]
    if len(same) != 1:
        raise TypeError(f"{len(same)} attributes of {type(pipe).__name__} hold a {type(module).__name__} denoiser "
                        f"({same}); pass name= (the attribute to replace), or use parallelize(pipe, ...), which "
                        "finds it from the pipeline's own call")
    return same[0]


# --- custom loops -----------------------------------------------------------------------------


def denoise(
    denoiser: Callable[[Mapping[str, Tensor]], Tensor],
    captured: CapturedModel,
    *,
    scheduler: Any,
    latents: Tensor,
    timesteps: Sequence[float | int] | Tensor,
    cond: Mapping[str, Tensor],
    guidance_scale: float | None = None,
    timestep_input: str = "timestep",
    generator: torch.Generator | None = None,
) -> Tensor:
    """A plain sampling loop around any step denoiser: the API for a model of your own.

    Each step calls ``denoiser`` once with the captured model's inputs by placeholder name: the
    latent (doubled for classifier-free guidance), the timestep (broadcast to its captured
    shape) and ``cond``; then ``scheduler.step``. ``denoiser.reset(timesteps)`` is called first
    when it has a ``reset``.

    Example::

        class Net(torch.nn.Module):                      # your own noise predictor
            def forward(self, x, t, ctx): ...

        net = Net().eval()
        x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([999, 999]), torch.randn(2, 8, 32)
        captured = capture_model(net, (x, t, ctx), latent="x")   # placeholders: x, t, ctx
        segments = split_graph(captured, build_op_graph(captured), plan.boundaries)
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(20)
        image = denoise(ReferenceSchedule(segments, warmup=2, timestep_input="t"), captured,
                        scheduler=scheduler, latents=torch.randn(1, 4, 16, 16),
                        timesteps=scheduler.timesteps, cond={"ctx": torch.cat([uncond, text])},
                        guidance_scale=5.0, timestep_input="t")

    Args:
        denoiser: a StepDenoiser, or any callable ``inputs -> eps`` (``captured.graph_module``
            via ``lambda inputs: captured.graph_module(*inputs.values())`` for instance).
        captured: the capture whose placeholder names the inputs use.
        scheduler: a diffusers-style scheduler (``step(eps, t, x).prev_sample``; optional
            ``scale_model_input`` and ``init_noise_sigma`` are honoured only for the former).
        latents: the initial noise ``x_T`` (batch = the images, not doubled).
        timesteps: the loop's timesteps in order.
        cond: every other tensor input by placeholder name, already batched as the model takes
            them (with guidance: unconditional half first, then conditional).
        guidance_scale: classifier-free guidance scale; None or <= 1 for no guidance.
        timestep_input: the placeholder name of the timestep.
        generator: handed to ``scheduler.step`` when it takes one (stochastic samplers).

    Returns:
        The final latent ``x_0``.

    Raises:
        CallError: inputs missing or unknown, or shapes that differ from the captured ones.
    """
    names = [spec.name for spec in captured.inputs]
    latent = captured.latent.name
    expected = set(names) - {latent, timestep_input}
    if timestep_input not in names:
        raise CallError(f"timestep_input {timestep_input!r} is not a captured input; inputs: {names}")
    if set(cond) != expected:
        raise CallError(
            f"cond must hold exactly the inputs {sorted(expected)} (by placeholder name); got {sorted(cond)}"
        )
    cfg = guidance_scale is not None and guidance_scale > 1
    step_kwargs = {"generator": generator} if generator is not None and takes_argument(scheduler.step, "generator") else {}
    steps = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
    if hasattr(denoiser, "reset"):
        denoiser.reset(steps)
    x = latents
    for t in timesteps:
        model_in = torch.cat([x, x]) if cfg else x
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        flat = [model_in if n == latent else torch.as_tensor(t) if n == timestep_input else cond[n] for n in names]
        eps = denoiser(fit_inputs(captured, flat))
        if eps.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): keep the noise half
            eps = eps[:, : x.shape[1]]
        if cfg:
            assert guidance_scale is not None  # cfg says so
            uncond, text = eps.chunk(2)
            eps = uncond + guidance_scale * (text - uncond)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def takes_argument(fn: Callable[..., Any], name: str) -> bool:
    """True if ``fn`` has a parameter called ``name`` (e.g. a scheduler's ``step`` taking ``generator``)."""
    return name in inspect.signature(fn).parameters
