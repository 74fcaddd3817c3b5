"""Run the schedule inside a denoising loop: diffusers pipelines and custom loops.

Example::

    built = build_pipeline("tiny-unet2d-condition", seed=0)
    captured = capture_for_pipeline(built, batch=2)
    schedule = ReferenceSchedule(split_graph(captured, build_op_graph(captured), plan.boundaries), warmup=1)
    wrap_pipeline(built.pipe, schedule, captured)       # pipe.unet now runs the schedule
    images = built(steps=20, guidance_scale=5.0)          # PIL images

The pipeline's own ``__call__`` is left as it is: :class:`ScheduledDenoiser` takes the place of
``pipe.unet`` / ``pipe.transformer``, turns each call into the captured graph's flat inputs and
hands them to a :class:`~asyncdiff_partition.schedule.StepDenoiser` (the single-process
``ReferenceSchedule`` or one rank's ``AsyncDenoiser``). A model of your own, outside diffusers,
is run with :func:`denoise`. The ``asyncdiff-partition run`` command is :func:`run_plan`.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import Tensor

from . import zoo
from .capture import CapturedModel, InputSpec, capture_model
from .report import peak_resident_bytes, resident_bytes
from .shipping import ShippedSegments

__all__ = [
    "BuiltPipeline",
    "DenoiserOutput",
    "PromptEmbedsPipeline",
    "RunConfig",
    "ScheduledDenoiser",
    "build_pipeline",
    "capture_for_pipeline",
    "denoise",
    "plan_input_shapes",
    "run_plan",
    "run_worker",
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
        ValueError: a tensor's shape differs from the captured one (the latent, most often).
    """
    out: Inputs = {}
    for spec, t in zip(captured.inputs, tensors):
        t = torch.as_tensor(t)
        if tuple(t.shape) != spec.shape:
            if t.numel() != 1:
                raise ValueError(_shape_error(captured, spec, tuple(t.shape)))
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
    captured_names = set(captured._treespec.context or ()) if captured._treespec is not None else set()
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError as error:
        raise ValueError(f"the pipeline's call does not fit {type(model).__name__}.forward: {error}") from None
    call: dict[str, Any] = {}
    for name, value in bound.items():
        param = signature.parameters[name]
        if param.kind == param.VAR_KEYWORD:
            call.update(value)
        elif param.kind == param.VAR_POSITIONAL:
            raise ValueError(f"{type(model).__name__}.forward takes *{name}; call it with named arguments")
        elif name in captured_names or not (value is param.default or (value is None and param.default is None)):
            call[name] = value
    try:
        return captured.flatten(**call)
    except ValueError as error:
        captured_paths = [spec.path for spec in captured.inputs]
        raise ValueError(
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
        denoiser: a :class:`~asyncdiff_partition.schedule.StepDenoiser`.
        captured: the capture whose placeholders ``denoiser`` expects.
        original: the module replaced; defaults to the captured model.
        timesteps: returns the current run's timesteps (``lambda: pipe.scheduler.timesteps``);
            without it, call :meth:`reset` before each run.
    """

    def __init__(
        self,
        denoiser: Any,
        captured: CapturedModel,
        original: torch.nn.Module | None = None,
        *,
        timesteps: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        original = original if original is not None else captured._signature_model
        param = next(original.parameters(), None) if isinstance(original, torch.nn.Module) else None
        # object.__setattr__: neither is a sub-module (see the class docstring).
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "denoiser", denoiser)
        self.captured = captured
        self._timesteps = timesteps
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
                raise RuntimeError("ScheduledDenoiser has no timesteps source: call .reset(timesteps) before a run")
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


_DENOISER_ATTRS = ("unet", "transformer")


def wrap_pipeline(pipe: Any, denoiser: Any, captured: CapturedModel) -> Any:
    """Put ``denoiser`` in place of ``pipe.unet`` or ``pipe.transformer``; returns ``pipe``.

    The pipeline's unmodified ``__call__`` then runs the schedule; one sampling run per call.

    Example:
        >>> wrap_pipeline(pipe, ReferenceSchedule(segments, warmup=50), captured)  # doctest: +SKIP

    Raises:
        TypeError: the pipeline has neither a ``unet`` nor a ``transformer`` module.
    """
    name = _denoiser_attr(pipe)
    original = getattr(pipe, name)
    if isinstance(original, ScheduledDenoiser):
        original = original.original
    setattr(pipe, name, ScheduledDenoiser(denoiser, captured, original, timesteps=lambda: pipe.scheduler.timesteps))
    return pipe


def unwrap_pipeline(pipe: Any) -> Any:
    """Undo :func:`wrap_pipeline`: the original denoiser back in place; returns ``pipe``."""
    name = _denoiser_attr(pipe)
    current = getattr(pipe, name)
    if isinstance(current, ScheduledDenoiser):
        setattr(pipe, name, current.original)
    return pipe


def _denoiser_attr(pipe: Any) -> str:
    for name in _DENOISER_ATTRS:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise TypeError(f"{type(pipe).__name__} has neither a 'unet' nor a 'transformer' module to replace")


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
        ValueError: inputs missing or unknown, or shapes that differ from the captured ones.
    """
    names = [spec.name for spec in captured.inputs]
    latent = captured.latent.name
    expected = set(names) - {latent, timestep_input}
    if timestep_input not in names:
        raise ValueError(f"timestep_input {timestep_input!r} is not a captured input; inputs: {names}")
    if set(cond) != expected:
        raise ValueError(
            f"cond must hold exactly the inputs {sorted(expected)} (by placeholder name); got {sorted(cond)}"
        )
    cfg = guidance_scale is not None and guidance_scale > 1
    step_kwargs = {"generator": generator} if generator is not None and _takes(scheduler.step, "generator") else {}
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
            uncond, text = eps.chunk(2)
            eps = uncond + guidance_scale * (text - uncond)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def _takes(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


# --- offline pipelines around zoo models ------------------------------------------------------

try:
    from diffusers import DiffusionPipeline as _DiffusionPipeline
except ImportError:  # pragma: no cover - diffusers is a dependency
    _DiffusionPipeline = object  # type: ignore[assignment,misc]


class PromptEmbedsPipeline(_DiffusionPipeline):  # type: ignore[misc,valid-type]
    """StableDiffusionPipeline's denoising loop, with the prompt given as embeddings.

    diffusers' ``StableDiffusionPipeline`` cannot be imported without ``transformers`` (its
    text encoder); this pipeline has no text encoder, tokenizer or safety checker and otherwise
    does what it does: the (negative, positive) embedding batch, ``scale_model_input``, the same
    unet call, guidance, ``scheduler.step``, VAE decoding and post-processing. SDXL-style UNets
    (``addition_embed_type="text_time"``) also take ``added_cond_kwargs``.
    """

    def __init__(self, unet: Any, vae: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        from diffusers.image_processor import VaeImageProcessor

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: Tensor,
        negative_prompt_embeds: Tensor | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        negative_added_cond_kwargs: dict[str, Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        height, width = height or h * self.vae_scale_factor, width or w * self.vae_scale_factor
        cfg = guidance_scale > 1
        device = self._execution_device
        embeds, added = prompt_embeds, added_cond_kwargs
        if cfg:
            negative = negative_prompt_embeds if negative_prompt_embeds is not None else torch.zeros_like(embeds)
            embeds = torch.cat([negative, embeds])
            if added is not None:
                neg_added = negative_added_cond_kwargs or {k: torch.zeros_like(v) for k, v in added.items()}
                added = {k: torch.cat([neg_added[k], v]) for k, v in added.items()}
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        extra = {"generator": generator} if _takes(self.scheduler.step, "generator") else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise_pred = self.unet(
                model_in, t, encoder_hidden_states=embeds, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=added, return_dict=False,
            )[0]
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


@dataclass
class BuiltPipeline:
    """An offline pipeline around a denoiser, with the random conditioning it is called with.

    Call it as ``built(steps=20, guidance_scale=5.0, images=1)``: the denoiser then sees a batch
    of ``images``, twice that with guidance (> 1) for conditional models. The conditioning
    (prompt embeddings, class labels) and the initial noise come from ``seed``.
    """

    pipe: Any
    model: torch.nn.Module
    kind: str  # "text" (prompt embeddings), "class" (class labels) or "unconditional"
    seed: int
    note: str = ""  # why a local pipeline stands in for the diffusers one, if it does
    text: dict[str, Any] = field(default_factory=dict, repr=False)  # "text": the prompt call arguments

    def images_for_batch(self, batch: int, guidance_scale: float) -> int:
        """How many images make a denoiser batch of ``batch`` (the profiled one).

        Raises:
            ValueError: guidance doubles the batch and ``batch`` is odd.
        """
        per = 2 if self.kind != "unconditional" and guidance_scale > 1 else 1
        if batch % per:
            raise ValueError(
                f"the plan was profiled at denoiser batch {batch}, which guidance {guidance_scale} cannot give "
                f"(it doubles the batch: cond + uncond); use --guidance 1 or profile with an even --batch"
            )
        return batch // per

    def __call__(self, *, steps: int, guidance_scale: float = 5.0, images: int = 1, output_type: str = "pil") -> Any:
        generator = torch.Generator(self.pipe.device).manual_seed(self.seed)
        common = dict(generator=generator, num_inference_steps=steps, output_type=output_type)
        if self.kind == "text":
            kwargs = {k: _repeat(v, images) for k, v in self.text.items()}
            out = self.pipe(**kwargs, guidance_scale=guidance_scale, **common)
        elif self.kind == "class":
            if hasattr(self.pipe, "default_labels"):  # ClassGuidedPipeline: every class in turn
                labels = self.pipe.default_labels(images)
            else:
                labels = torch.randint(0, self.model.config.num_embeds_ada_norm, (images,),
                                       generator=torch.Generator().manual_seed(self.seed)).tolist()
            out = self.pipe(class_labels=labels, guidance_scale=guidance_scale, **common)
        else:
            out = self.pipe(batch_size=images, **common)
        return out.images


def _repeat(value: Any, n: int) -> Any:
    if isinstance(value, dict):
        return {k: _repeat(v, n) for k, v in value.items()}
    return value.expand(n, *value.shape[1:]) if isinstance(value, Tensor) else value


_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, sample_size=32)
_PIPELINES = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel")


def build_pipeline(spec: str, *, seed: int = 0, sample_size: int | tuple[int, int] | None = None,
                   model: torch.nn.Module | None = None) -> BuiltPipeline:
    """An offline diffusers pipeline around a zoo model or local directory; same seed, same pipeline.

    ============================  =========================================================
    denoiser                      pipeline
    ============================  =========================================================
    UNet2DConditionModel          :class:`PromptEmbedsPipeline` (StableDiffusionPipeline's
                                  loop; needs no transformers), tiny AutoencoderKL, DDIM
                                  with SD's betas; random prompt embeddings (1, 77, ctx)
    UNet2DModel                   DDIMPipeline (pixel space)
    UNet2DModel, num_class_embeds :class:`~asyncdiff_partition.class_pipeline.ClassGuidedPipeline`
                                  (pixel space, DDIM, guidance); labels 0, 1, 2, ... in turn
    DiTTransformer2DModel         DiTPipeline, tiny AutoencoderKL, DDIM; random class labels
    ============================  =========================================================

    The VAE is built from a small config with random weights whatever the denoiser's size: it
    only decodes the final latent. A pipeline directory's own ``vae/`` and ``scheduler/`` are
    used when present.

    Args:
        spec: a zoo name or a local diffusers model / pipeline directory.
        seed: seeds the weights and the conditioning; every rank builds the same pipeline.
        sample_size: latent height and width (default: the model's ``sample_size``).
        model: the denoiser ``spec`` loads, already built (a capture's model, say).

    Raises:
        TypeError: a denoiser class with no pipeline here (use :func:`denoise`).
        ValueError: unknown model or a size the model cannot take.
    """
    import diffusers

    model = model if model is not None else zoo.load_model(spec, seed=seed)
    kind = type(model).__name__
    if kind not in _PIPELINES:
        raise TypeError(
            f"build_pipeline supports {', '.join(_PIPELINES)}, not {kind}; run other models with "
            "asyncdiff_partition.pipeline.denoise in a loop of your own"
        )
    if sample_size is not None:
        from .api import check_sample_size

        for size in (sample_size,) if isinstance(sample_size, int) else sample_size:
            check_sample_size(model, size)
        model.register_to_config(sample_size=sample_size)
    directory = Path(spec) if spec not in zoo.list_models() else None
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    cfg = model.config
    if kind == "UNet2DModel" and cfg.num_class_embeds is not None:  # class-conditional, guided
        from .class_pipeline import ClassGuidedPipeline

        return BuiltPipeline(ClassGuidedPipeline(unet=model, scheduler=_scheduler(directory, {})), model, "class", seed)
    if kind == "UNet2DModel":
        scheduler = _scheduler(directory, {})
        return BuiltPipeline(diffusers.DDIMPipeline(unet=model, scheduler=scheduler), model, "unconditional", seed)
    vae = _vae(directory)
    if kind == "DiTTransformer2DModel":
        pipe = diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=_scheduler(directory, {}))
        return BuiltPipeline(pipe, model, "class", seed)
    ctx = cfg.encoder_hid_dim or cfg.cross_attention_dim
    ctx = ctx if isinstance(ctx, int) else ctx[0]
    text: dict[str, Any] = {name: torch.randn(1, zoo.TEXT_TOKENS, ctx, generator=gen)
                            for name in ("prompt_embeds", "negative_prompt_embeds")}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
        h, w = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else cfg.sample_size
        n_text = cfg.projection_class_embeddings_input_dim - zoo.SDXL_TIME_IDS * cfg.addition_time_embed_dim
        ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32)
        for name in ("added_cond_kwargs", "negative_added_cond_kwargs"):
            text[name] = {"text_embeds": torch.randn(1, n_text, generator=gen), "time_ids": ids}
    elif cfg.addition_embed_type is not None:
        raise TypeError(f"UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r} has no pipeline "
                        "here; use asyncdiff_partition.pipeline.denoise")
    pipe = PromptEmbedsPipeline(unet=model, vae=vae, scheduler=_scheduler(directory, _SD_SCHEDULER))
    note = "diffusers' StableDiffusionPipeline needs transformers; PromptEmbedsPipeline runs its loop"
    return BuiltPipeline(pipe, model, "text", seed, note=note, text=text)


def _vae(directory: Path | None) -> Any:
    import diffusers

    if directory is not None and (directory / "vae" / "config.json").is_file():
        return diffusers.AutoencoderKL.from_pretrained(str(directory / "vae"), local_files_only=True).eval()
    return diffusers.AutoencoderKL(**_TINY_VAE).eval()


def _scheduler(directory: Path | None, config: dict[str, Any]) -> Any:
    import diffusers

    path = directory / "scheduler" / "scheduler_config.json" if directory is not None else None
    if path is not None and path.is_file():
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return diffusers.DDIMScheduler.from_config(config)


def capture_for_pipeline(built: BuiltPipeline, *, batch: int, sample_size: Any = None,
                         verify: bool = True) -> CapturedModel:
    """Capture the pipeline's denoiser at denoiser batch ``batch`` and the given latent size."""
    inputs = zoo.example_inputs(built.model, batch=batch, sample_size=sample_size)
    return capture_model(built.model, inputs.args, inputs.kwargs, latent=inputs.latent, verify=verify)


# --- the `run` command: one sampling run from a plan ------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """What ``asyncdiff-partition run`` was asked for; handed (pickled) to every worker.

    ``steps``, ``warmup`` and ``stride`` default to the plan's; ``threads`` to one per rank's
    share of the CPU cores.
    """

    model: str | None  # None: the plan's
    plan: str
    steps: int | None = None
    warmup: int | None = None
    stride: int | None = None
    seed: int = 0
    guidance: float | None = None  # None: the model's own (see default_guidance)
    out_dir: str = "run"
    trace: str | None = None
    reference: bool = False
    nproc: int | None = None
    threads: int | None = None
    timeout_s: float = 300.0
    progress: bool = True


def plan_input_shapes(plan: Any, plan_path: str | Path | None = None) -> list[dict[str, Any]] | None:
    """The input specs (name, shape, dtype, latent) the plan's profile was made with, if known.

    Read from ``plan.profile["inputs"]`` when the plan records them, else from the profile file
    the plan names (as given, or next to the plan file).
    """
    if plan.profile.get("inputs"):
        return list(plan.profile["inputs"])
    recorded = plan.profile.get("path")
    if not recorded:
        return None
    from .files import FileFormatError
    from .profile import Profile, ProfileError

    candidates = [Path(recorded)]
    if plan_path is not None and not Path(recorded).is_absolute():
        candidates.append(Path(plan_path).parent / recorded)
    for candidate in candidates:
        if candidate.is_file():
            try:
                profile = Profile.load(candidate)
            except (FileFormatError, ProfileError):
                continue
            if profile.fingerprint == plan.fingerprint:
                return list(profile.inputs)
    return None


def _latent_shape(plan: Any, plan_path: str | Path | None) -> tuple[int, Any, str]:
    """(denoiser batch, latent size, how it is known) for the plan's profile."""
    inputs = plan_input_shapes(plan, plan_path)
    if inputs is None:
        return 2, None, "the plan's profile file was not found, so batch 2 and the model's sample_size were assumed"
    shape = next(i["shape"] for i in inputs if i["latent"])
    h, w = shape[-2:]
    return int(shape[0]), (h if h == w else (h, w)), "the shape of the plan's profile"


def _prepare(
    config: RunConfig, plan: Any, *, verify: bool = True, device: Any = "cpu", world: int | None = None,
    stride: int | None = None, captured: CapturedModel | None = None,
) -> tuple[BuiltPipeline, CapturedModel, int]:
    """Build the pipeline on ``device`` and capture its denoiser at the plan's shapes.

    Given ``captured`` (the model captured elsewhere, with those shapes), the pipeline is
    built around its model instead. With ``world``, the plan is checked against the capture
    and that many ranks (``runtime.check_plan``). Returns the pipeline, the capture and the
    number of images a run makes.
    """
    from .plan import PlanError
    from .runtime import check_plan

    batch, size, source = _latent_shape(plan, config.plan)
    model = captured._signature_model if captured is not None else None
    built = build_pipeline(config.model, seed=config.seed, sample_size=size, model=model)
    built.pipe.to(device)  # before a capture: the graph's constants live where the model does
    images = built.images_for_batch(batch, config.guidance)
    if captured is None:
        captured = capture_for_pipeline(built, batch=batch, sample_size=size, verify=verify)
    if world is not None:
        try:
            check_plan(captured, plan, world, stride=stride)
        except PlanError as error:
            raise PlanError(f"{error} (model {config.model!r} captured at latent shape "
                            f"{captured.latent.shape}, {source})") from None
    return built, captured, images


def _settings(config: RunConfig, plan: Any) -> tuple[int, int, int, int]:
    """(steps, warmup, stride, world size) after defaulting to the plan's."""
    steps = config.steps if config.steps is not None else plan.steps
    warmup = config.warmup if config.warmup is not None else plan.warmup
    stride = config.stride if config.stride is not None else plan.stride
    if steps < 1 or warmup < 0 or stride not in (1, 2):
        raise ValueError(f"need steps >= 1, warmup >= 0 and stride 1 or 2; got {steps}, {warmup}, {stride}")
    return steps, warmup, stride, plan.n_devices + stride - 1


def run_worker(config: RunConfig, captured: CapturedModel | ShippedSegments | None = None) -> dict[str, Any]:
    """One rank of an asynchronous run (the entry point ``launch`` starts on every rank).

    Joins the process group, builds the same pipeline as every other rank, captures the
    denoiser (or takes ``captured``: the launching process's capture, or its per-segment files
    from :func:`~asyncdiff_partition.shipping.ship_segments`, of which this rank loads its own),
    keeps only this rank's segment (:func:`release_weights`) and runs the pipeline with this
    rank's :class:`~asyncdiff_partition.runtime.AsyncDenoiser` in place of the denoiser; rank 0
    saves the images. Returns this rank's report rows, spans, timings and memory (picklable).
    """
    from . import comm, runtime
    from .plan import Plan
    from .schedule import slot_segment

    torch.set_num_threads(config.threads or 1)
    plan = Plan.load(config.plan)
    steps, warmup, stride, _ = _settings(config, plan)
    rank, _, device = comm.init(timeout_s=config.timeout_s)
    try:
        if isinstance(captured, ShippedSegments):
            captured = captured.load(slot_segment(rank, plan.n_devices))
        built, captured, images = _prepare(config, plan, device=device, captured=captured)
        denoiser = runtime.AsyncDenoiser(captured, plan, warmup=warmup, stride=stride, timestep_input="timestep",
                                         timeout_s=config.timeout_s)
        wrap_pipeline(built.pipe, denoiser, _inputs_only(captured))
        del captured
        kept = release_weights(built.model, denoiser._segment.module)  # the only weights this rank needs
        result = _sample(config, built, denoiser, rank=rank, steps=steps, images=images)
        # Resident after the run, not after set-up: the weights are mapped from a file and
        # become resident as the first step touches them.
        return {**result, "param_bytes": kept, "rss_after_run": resident_bytes(), "peak_rss": peak_resident_bytes()}
    finally:
        comm.shutdown()


def release_weights(model: torch.nn.Module, keep: torch.nn.Module) -> int:
    """Swap every parameter and buffer of ``model`` that ``keep`` does not hold for a meta tensor.

    A rank's pipeline keeps the original denoiser for its attributes (``config``, ...), not its
    weights: after this, only the weights of this rank's segment (``keep``) stay in memory, once
    nothing else refers to the old tensors (drop the capture first). Returns the bytes kept.
    """
    own = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    kept = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type == "meta":
                    continue
                if id(t) in own:
                    kept += t.numel() * t.element_size()
                    continue
                meta = t.detach().to("meta")
                is_param = isinstance(t, torch.nn.Parameter)
                store[name] = torch.nn.Parameter(meta, requires_grad=False) if is_param else meta
    return kept


def _inputs_only(captured: CapturedModel) -> CapturedModel:
    """The capture without its graph and examples: what ScheduledDenoiser needs to bind calls."""
    from dataclasses import replace

    empty = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return replace(captured, graph_module=empty, example=[])


def _sample(config: RunConfig, built: BuiltPipeline, denoiser: Any, *, rank: int, steps: int,
            images: int) -> dict[str, Any]:
    """Run the wrapped pipeline once; rank 0 saves the images. This rank's results."""
    built.pipe.set_progress_bar_config(disable=not (config.progress and rank == 0), desc=f"sampling {config.model}")
    begin = time.perf_counter()
    with torch.no_grad():
        pictures = built(steps=steps, guidance_scale=config.guidance, images=images)
    wall_s = time.perf_counter() - begin
    wrapped = getattr(built.pipe, _denoiser_attr(built.pipe))
    paths: list[str] = []
    if rank == 0:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            paths.append(str(out / f"image-{i}.png"))
            picture.save(paths[-1])
    return {"rank": rank, "report": wrapped.report(), "spans": wrapped.spans(), "wall_s": wall_s, "images": paths,
            "method": wrapped.captured.method, "latent_shape": list(wrapped.captured.latent.shape), "note": built.note,
            "threads": torch.get_num_threads(), "device": str(built.pipe.device)}


def default_guidance(spec: str) -> float:
    """The guidance scale ``run`` uses when none is given: the bundled digits model's own, else 5."""
    from .digits import GUIDANCE

    return GUIDANCE if spec in zoo.TRAINED_MODELS else 5.0


def run_plan(config: RunConfig) -> dict[str, Any]:
    """``asyncdiff-partition run``: check the plan, sample on its ranks, write images and report.

    Everything the user can get wrong (missing plan, plan of another model, shapes, world size)
    is checked in this process before any worker starts. Without ``reference`` the plan's world
    size of workers is spawned (``runtime.launch``), unless this process was itself started by
    an outside launcher (torchrun), in which case it runs as its rank. With ``reference`` the
    single-process :class:`~asyncdiff_partition.schedule.ReferenceSchedule` runs the same
    segments here.

    Returns:
        ``{"images": [paths], "report": path, "trace": path or None, "summary": {...}}``;
        empty paths on ranks other than 0.

    Raises:
        FileFormatError, PlanError: the plan file is missing, corrupt or made for another model.
        ValueError: settings that do not fit the plan (``nproc``, guidance vs. batch, sizes).
    """
    from dataclasses import replace

    from .plan import Plan, ideal_speedup

    plan = Plan.load(config.plan)
    config = replace(config, model=config.model or plan.model)
    if config.guidance is None:
        config = replace(config, guidance=default_guidance(config.model))
    steps, warmup, stride, world = _settings(config, plan)
    if not config.reference and config.nproc is not None and config.nproc != world:
        raise ValueError(
            f"the plan needs {world} processes ({plan.n_devices} segments, stride {stride}) but --nproc is "
            f"{config.nproc}; leave --nproc out or make a plan with --devices {config.nproc - stride + 1}"
        )
    built, captured, images = _prepare(config, plan, verify=True, world=world, stride=stride)
    meta = {"model": config.model, "plan": str(config.plan), "mode": "reference" if config.reference else "async",
            "n_devices": plan.n_devices, "stride": stride, "world_size": 1 if config.reference else world,
            "steps": steps, "warmup": warmup, "guidance": config.guidance, "seed": config.seed, "images": images,
            "boundaries": plan.boundaries, "predicted": plan.predicted,
            "ideal_speedup": ideal_speedup(steps, warmup, plan.n_devices, stride)}
    if config.reference:
        from .fx_adapter import build_op_graph
        from .schedule import ReferenceSchedule
        from .split import split_graph

        segments = split_graph(captured, build_op_graph(captured), plan.boundaries)
        schedule = ReferenceSchedule(segments, warmup=warmup, stride=stride, timestep_input="timestep")
        wrap_pipeline(built.pipe, schedule, captured)
        results = {0: {**_sample(config, built, schedule, rank=0, steps=steps, images=images),
                       "peak_rss": peak_resident_bytes()}}
    else:
        from .fx_adapter import build_op_graph
        from .launch import is_launched_externally, launch
        from .shipping import ship_segments
        from .split import split_graph

        threads = config.threads or max(1, torch.get_num_threads() // world)
        worker_config = replace(config, threads=threads)
        del built  # every worker builds its own pipeline around the capture
        if is_launched_externally():
            # Each rank returns only its own rows: rank 0's report holds rank 0 alone (ranks_reported).
            mine = run_worker(worker_config, captured)
            results = {mine["rank"]: mine}
        else:
            # The workers get this capture, each with only its segment's weights: no capture per
            # rank, the same graph everywhere, no full replica in any worker.
            with tempfile.TemporaryDirectory(prefix="asyncdiff-run-") as directory:
                segments = split_graph(captured, build_op_graph(captured), plan.boundaries)
                shipped = ship_segments(captured, segments, directory)
                del segments
                results = launch(run_worker, (worker_config, shipped), world, timeout_s=config.timeout_s)
    return _write_outputs(config, meta, results)


def _write_outputs(config: RunConfig, meta: dict[str, Any], results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Rank 0: the run report (and trace) from every reported rank's results."""
    from .report import summarise, write_report, write_trace

    first = results[min(results)]
    if first["rank"] != 0:  # launched from outside, not rank 0: rank 0 writes
        return {"images": [], "report": None, "trace": None, "summary": {}}
    meta = {**meta, "wall_s": max(r["wall_s"] for r in results.values()), "capture_method": first["method"],
            "latent_shape": first["latent_shape"], "pipeline_note": first["note"],
            "ranks_reported": sorted(results), "threads_per_rank": first["threads"], "device": first["device"]}
    for key in ("param_bytes", "rss_after_run", "peak_rss"):
        if all(key in r for r in results.values()):
            meta[f"{key}_per_rank"] = [results[rank][key] for rank in sorted(results)]
    rows = {rank: r["report"] for rank, r in results.items()}
    report = write_report(Path(config.out_dir) / "report.json", rows, meta)
    trace = write_trace(config.trace, {rank: r["spans"] for rank, r in results.items()}) if config.trace else None
    return {"images": first["images"], "report": str(report), "trace": str(trace) if trace else None,
            "summary": summarise(rows, warmup=meta["warmup"]), "wall_s": meta["wall_s"]}
