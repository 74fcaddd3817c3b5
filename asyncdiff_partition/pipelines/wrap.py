"""Run the schedule inside a denoising loop: diffusers pipelines and custom loops.

Example::

    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured = capture_for_pipeline(built, batch=2)
    schedule = ReferenceSchedule(split_graph(captured, build_op_graph(captured), plan.boundaries), warmup=1)
    wrap_pipeline(built.pipe, schedule, captured)       # pipe.unet now runs the schedule
    images = built(steps=20, guidance_scale=5.0)          # PIL images

The pipeline's own ``__call__`` is left as it is: :class:`ScheduledDenoiser` takes the place of
``pipe.unet`` / ``pipe.transformer``, turns each call into the captured graph's flat inputs and
hands them to a :class:`~asyncdiff_partition.runtime.reference.StepDenoiser` (the single-process
``ReferenceSchedule`` or one rank's ``AsyncDenoiser``). A model of your own, outside diffusers,
is run with :func:`denoise`. Offline pipelines around zoo models are built by
:mod:`~asyncdiff_partition.pipelines.offline`; the ``asyncdiff-partition run`` command is
:mod:`~asyncdiff_partition.runtime.job`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor

from asyncdiff_partition.core.errors import UsageError
from asyncdiff_partition.fx.capture import CallError, CapturedModel, InputSpec

__all__ = [
    "DenoiserOutput",
    "ScheduledDenoiser",
    "call_binding",
    "denoise",
    "denoiser_name",
    "fit_inputs",
    "takes_argument",
    "unwrap_pipeline",
    "wrap_pipeline",
]

Inputs = dict[str, Tensor]  # model inputs by captured placeholder name


@dataclass
class DenoiserOutput:
    """What a diffusers denoiser returns with ``return_dict=True``: ``out.sample`` or ``out[0]``."""

    sample: Tensor

    def __getitem__(self, index: int) -> Tensor:
        return (self.sample,)[index]

    def to_tuple(self) -> tuple[Tensor]:
        return (self.sample,)


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


def _bind_call(model: Any, captured: CapturedModel, args: tuple, kwargs: dict) -> list[Tensor]:
    """A pipeline's call → the captured graph's flat tensors.

    Pipelines pass arguments the example call left out, at their defaults (``timestep_cond=None``,
    ``cross_attention_kwargs=None``): those are dropped, so the call has the captured structure.
    """
    kwargs.pop("return_dict", None)
    captured_names = set(captured.treespec.context or ()) if captured.treespec is not None else set()
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError as error:
        raise CallError(f"the pipeline's call does not fit {type(model).__name__}.forward: {error}") from None
    call: dict[str, Any] = {}
    for name, value in bound.items():
        param = signature.parameters[name]
        if param.kind == param.VAR_KEYWORD:
            call.update(value)
        elif param.kind == param.VAR_POSITIONAL:
            raise CallError(f"{type(model).__name__}.forward takes *{name}; call it with named arguments")
        elif name in captured_names or not (value is param.default or (value is None and param.default is None)):
            call[name] = value
    try:
        return captured.flatten(**call)
    except CallError as error:
        captured_paths = [spec.path for spec in captured.inputs]
        raise CallError(
            f"{error}; this call passed {sorted(call)}, the captured call had tensors {captured_paths}"
        ) from None


# --- the drop-in denoiser ---------------------------------------------------------------------


class ScheduledDenoiser(torch.nn.Module):
    """Drop-in replacement for ``pipe.unet`` / ``pipe.transformer`` that runs a step denoiser.

    Example:
        >>> pipe.unet = ScheduledDenoiser(schedule, captured, pipe.unet,  # doctest: +SKIP
        ...                               timesteps=lambda: pipe.scheduler.timesteps)

    Attribute reads the module itself cannot answer (``config``, ``in_channels``, ...) go to the
    original module; ``dtype`` and ``device`` are the original's at wrap time. The original is
    not registered as a sub-module, so ``pipe.to(...)`` leaves the step denoiser's placement alone.

    Each call is flattened with ``captured.flatten``, fitted to the captured shapes
    (:func:`fit_inputs`) and given to ``denoiser``; the result is returned as the original
    would return it (``(eps,)`` with ``return_dict=False``, else an object with ``.sample``).

    A new sampling run starts (``denoiser.reset(timesteps)``) on the first call, whenever the
    ``timesteps`` callable returns another object than in the current run (schedulers make a new
    tensor in every ``set_timesteps``), and after the run's last step.

    Args:
        denoiser: a :class:`~asyncdiff_partition.runtime.reference.StepDenoiser`.
        captured: the capture whose placeholders ``denoiser`` expects.
        original: the module replaced; defaults to the captured model.
        timesteps: returns the current run's timesteps (``lambda: pipe.scheduler.timesteps``);
            without it, call :meth:`reset` before each run.
        values: maps the run's timesteps to the values the loop feeds the denoiser, in the
            pipeline's own form (t / 1000, sigmas: Note [timestep forms] in
            :mod:`~asyncdiff_partition.pipelines.recording`); None entries are not checked.
            Steps follow the call count, not the timestep's value.
    """

    def __init__(
        self,
        denoiser: Any,
        captured: CapturedModel,
        original: torch.nn.Module | None = None,
        *,
        timesteps: Callable[[], Any] | None = None,
        values: Callable[[Any], Sequence[float | None] | None] | None = None,
    ) -> None:
        super().__init__()
        original = original if original is not None else captured.model
        param = next(original.parameters(), None) if isinstance(original, torch.nn.Module) else None
        # object.__setattr__: neither is a sub-module (see the class docstring).
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "denoiser", denoiser)
        self.captured = captured
        self._timesteps = timesteps
        self._values = values
        self._dtype = param.dtype if param is not None else torch.float32
        self._device = param.device if param is not None else torch.device("cpu")
        self._run: Any = None  # the timesteps object of the current run
        self._steps: list[float] = []
        self.step = 0
        self.step_ms: list[float] = []
        self.step_spans: list[dict[str, Any]] = []

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)

    def reset(self, timesteps: Sequence[float | int] | Tensor) -> None:
        """Start a new sampling run over ``timesteps`` (the loop's T timesteps, in order)."""
        steps = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
        if self._values is not None:
            fed = self._values(timesteps)
            steps = list(fed) if fed is not None else [None] * len(steps)
        self.denoiser.reset(steps)
        self._run, self._steps, self.step = timesteps, steps, 0
        self.step_ms, self.step_spans = [], []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.get("return_dict", True)
        inputs = fit_inputs(self.captured, _bind_call(self.original, self.captured, args, dict(kwargs)))
        self._maybe_reset()
        begin = time.perf_counter()
        eps = self.denoiser(inputs)
        end = time.perf_counter()
        self.step_ms.append((end - begin) * 1e3)
        self.step_spans.append({"name": f"step {self.step}", "start_s": begin, "end_s": end})
        self.step += 1
        return DenoiserOutput(eps) if return_dict else (eps,)

    def _maybe_reset(self) -> None:
        if self._timesteps is None:
            if self._run is None:
                raise UsageError("ScheduledDenoiser has no timesteps source: call .reset(timesteps) before a run")
            if self.step >= len(self._steps):
                self.reset(self._run)
            return
        current = self._timesteps()
        if current is not self._run or self.step >= len(self._steps):
            self.reset(current)

    def report(self) -> list[dict[str, Any]]:
        """The step denoiser's per-step report if it keeps one, else this wrapper's timings."""
        if hasattr(self.denoiser, "report"):
            return list(self.denoiser.report())
        return [{"step": s, "rank": 0, "compute_ms": ms, "wait_ms": 0.0, "comm_ms": 0.0, "bytes_sent": 0}
                for s, ms in enumerate(self.step_ms)]

    def spans(self) -> list[dict[str, Any]]:
        """The step denoiser's spans if it keeps them, else one span per step."""
        if hasattr(self.denoiser, "spans"):
            return list(self.denoiser.spans())
        return list(self.step_spans)


def wrap_pipeline(pipe: Any, denoiser: Any, captured: CapturedModel, *, name: str | None = None,
                  form: str | None = "t") -> Any:
    """Put ``denoiser`` in place of the pipeline's denoiser; returns ``pipe``.

    The pipeline's unmodified ``__call__`` then runs the schedule; one sampling run per call.

    Example:
        >>> wrap_pipeline(pipe, ReferenceSchedule(segments, warmup=50), captured)  # doctest: +SKIP

    Args:
        name: the attribute to replace (a :class:`~asyncdiff_partition.pipelines.recording.Recording`'s
            ``name``); default: the attribute holding the captured model (:func:`denoiser_name`).
        form: how the loop's timestep relates to ``pipe.scheduler`` (Note [timestep forms]);
            None: not checked.

    Raises:
        TypeError: no ``name`` and no attribute of the pipeline holds the captured model.
    """
    from asyncdiff_partition.pipelines.recording import timestep_values

    name = name or denoiser_name(pipe, captured.model)
    original = getattr(pipe, name)
    if isinstance(original, ScheduledDenoiser):
        original = original.original
    scheduled = ScheduledDenoiser(denoiser, captured, original, timesteps=lambda: pipe.scheduler.timesteps,
                                  values=lambda _: timestep_values(pipe.scheduler, form))
    setattr(pipe, name, scheduled)
    return pipe


def unwrap_pipeline(pipe: Any) -> Any:
    """Undo :func:`wrap_pipeline`: the original denoiser back in place; returns ``pipe``."""
    for name, current in list(vars(pipe).items()):
        if isinstance(current, ScheduledDenoiser):
            setattr(pipe, name, current.original)
    return pipe


def call_binding(captured: CapturedModel) -> CapturedModel:
    """The capture without its graph and examples: what :class:`ScheduledDenoiser` needs to bind calls."""
    from dataclasses import replace

    empty = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return replace(captured, graph_module=empty, example=[])


def denoiser_name(pipe: Any, module: Any = None) -> str:
    """The pipeline attribute holding ``module``: by identity, else the one component of its class;
    without ``module``, the attribute holding a :class:`ScheduledDenoiser`.

    Found, not named: no table of ``unet`` / ``transformer``; a pipeline's own call finds its
    denoiser with :func:`~asyncdiff_partition.pipelines.recording.record_denoiser_call`.

    Raises:
        TypeError: no attribute (or several of the class) holds it.
    """
    found = list(vars(pipe).items())

    def held(value: Any) -> Any:
        return value.original if isinstance(value, ScheduledDenoiser) else value

    same = [name for name, value in found if module is not None and held(value) is module]
    if not same and module is not None:
        same = [name for name, value in found if type(held(value)) is type(module)]
    if module is None:
        same = [name for name, value in found if isinstance(value, ScheduledDenoiser)]
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
