"""Offline diffusers pipelines around zoo models and local directories: nothing is downloaded.

Example::

    built = build_pipeline("tiny-unet2d-condition", seed=0)   # pipeline + its random conditioning
    captured = capture_for_pipeline(built, batch=2)           # its denoiser, at the pipeline's shapes
    images = built(steps=20, guidance_scale=5.0)              # PIL images

Every rank of a run builds the same pipeline from the same seed (:func:`build_pipeline`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.fx
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from asyncdiff_partition.core.errors import ConfigError, UnsupportedError
from asyncdiff_partition.fx.capture import CapturedModel, capture_model
from asyncdiff_partition.pipelines import synthesis, zoo
from asyncdiff_partition.pipelines.class_guided import ClassGuidedPipeline
from asyncdiff_partition.pipelines.wrap import takes_argument

__all__ = ["BuiltPipeline", "PromptEmbedsPipeline", "build_pipeline", "capture_for_pipeline"]


# --- offline pipelines around zoo models ------------------------------------------------------

class PromptEmbedsPipeline(DiffusionPipeline):
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
        extra = {"generator": generator} if takes_argument(self.scheduler.step, "generator") else {}
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
            ConfigError: guidance doubles the batch and ``batch`` is odd.
        """
        per = 2 if self.kind != "unconditional" and guidance_scale > 1 else 1
        if batch % per:
            raise ConfigError(
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
                config: Any = self.model.config
                labels = torch.randint(0, config.num_embeds_ada_norm, (images,),
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
    UNet2DModel, num_class_embeds :class:`~asyncdiff_partition.pipelines.class_guided.ClassGuidedPipeline`
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
        UnsupportedError: a denoiser class with no pipeline here (use :func:`denoise`).
        UnknownModelError: unknown model.
        ConfigError: a size the model cannot take.
    """
    model = model if model is not None else zoo.load_model(spec, seed=seed)
    kind = type(model).__name__
    if kind not in _PIPELINES:
        raise UnsupportedError(
            f"build_pipeline supports {', '.join(_PIPELINES)}, not {kind}; run other models with "
            "asyncdiff_partition.pipelines.wrap.denoise in a loop of your own"
        )
    if sample_size is not None:
        for size in (sample_size,) if isinstance(sample_size, int) else sample_size:
            zoo.check_sample_size(model, size)
        model.register_to_config(sample_size=sample_size)  # type: ignore[operator]  # a diffusers ModelMixin
    directory = Path(spec) if spec not in zoo.list_models() else None
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    cfg: Any = model.config  # a diffusers FrozenDict read by attribute
    if kind == "UNet2DModel" and cfg.num_class_embeds is not None:  # class-conditional, guided
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
    text: dict[str, Any] = {name: torch.randn(1, synthesis.TEXT_TOKENS, ctx, generator=gen)
                            for name in ("prompt_embeds", "negative_prompt_embeds")}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
        h, w = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else cfg.sample_size
        n_text = cfg.projection_class_embeddings_input_dim - synthesis.SDXL_TIME_IDS * cfg.addition_time_embed_dim
        ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32)
        for name in ("added_cond_kwargs", "negative_added_cond_kwargs"):
            text[name] = {"text_embeds": torch.randn(1, n_text, generator=gen), "time_ids": ids}
    elif cfg.addition_embed_type is not None:
        raise UnsupportedError(f"UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r} has no pipeline "
                        "here; use asyncdiff_partition.pipelines.wrap.denoise")
    pipe = PromptEmbedsPipeline(unet=model, vae=vae, scheduler=_scheduler(directory, _SD_SCHEDULER))
    note = "diffusers' StableDiffusionPipeline needs transformers; PromptEmbedsPipeline runs its loop"
    return BuiltPipeline(pipe, model, "text", seed, note=note, text=text)


def _vae(directory: Path | None) -> Any:
    if directory is not None and (directory / "vae" / "config.json").is_file():
        return diffusers.AutoencoderKL.from_pretrained(str(directory / "vae"), local_files_only=True).eval()
    return diffusers.AutoencoderKL(**_TINY_VAE).eval()


def _scheduler(directory: Path | None, config: dict[str, Any]) -> Any:
    path = directory / "scheduler" / "scheduler_config.json" if directory is not None else None
    if path is not None and path.is_file():
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return diffusers.DDIMScheduler.from_config(config)


def capture_for_pipeline(built: BuiltPipeline, *, batch: int, sample_size: Any = None,
                         verify: bool = True) -> CapturedModel:
    """Capture the pipeline's denoiser at denoiser batch ``batch`` and the given latent size."""
    inputs = zoo.example_inputs(built.model, batch=batch, sample_size=sample_size)
    return capture_model(built.model, inputs.args, inputs.kwargs, latent=inputs.latent, verify=verify)
