"""Example inputs for a bare denoiser, synthesised from its forward signature and its config.

Example::

    model = UNet2DConditionModel.from_pretrained("folder/unet", local_files_only=True)
    inputs = synthesize_inputs(model, batch=2)          # sample, timestep, encoder_hidden_states
    (eps,) = model(*inputs.args, **inputs.kwargs)

This is the fallback for a model folder without its pipeline (``inspect`` / ``profile`` on a
``unet/``-only directory). A pipeline records its denoiser's real call instead
(:mod:`~asyncdiff_partition.pipelines.recording`). No class names: each argument of
``forward`` is made from the config keys that size it (Note [synthesised arguments]); an
argument that is required and cannot be made is one :class:`SynthesisError` naming it.

Note [synthesised arguments]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
=========================  ===================================  ==============================================
argument                   made when                            shape (B = batch, H x W = latent)
=========================  ===================================  ==============================================
first (the latent)         always                               (B, in_channels, H, W); config ``num_frames``:
                                                                (B, F, C, H, W); ``motion_max_seq_length``:
                                                                (B, C, F, H, W) with F = :data:`FRAMES`
timestep                   always                               (B,) one value; float when the config has
                                                                ``num_frames`` (EDM) or ``pooled_projection_dim``
                                                                (flow matching), else int64
encoder_hidden_states      ``encoder_hid_dim``,                 (B, 77, width); one token with ``num_frames``
                           ``joint_attention_dim``,             (an image embedding); B x F rows with
                                                                ``motion_max_seq_length`` (one per frame)
                           ``caption_channels`` or
                           ``cross_attention_dim``
pooled_projections         ``pooled_projection_dim``            (B, pooled_projection_dim)
class_labels               ``num_class_embeds``,                (B,) int64, or (B, projection dim) for
                           ``class_embed_type`` or              projection class embeddings
                           ``norm_type == "ada_norm_zero"``
added_cond_kwargs          ``addition_embed_type="text_time"``  text_embeds (B, n), time_ids (B, 6)
                           or ``use_additional_conditions``     resolution (B, 2), aspect_ratio (B, 1)
added_time_ids             always when it is an argument        (B, projection_class_embeddings_input_dim /
                                                                addition_time_embed_dim)
=========================  ===================================  ==============================================
Anything else is left to its default; a required argument outside this table (or one such as
Flux's ``img_ids`` that only the pipeline's latent packing defines) raises :class:`SynthesisError`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["FRAMES", "SDXL_TIME_IDS", "TEXT_TOKENS", "ModelInputs", "SynthesisError", "synthesize_inputs"]

TEXT_TOKENS = 77  # CLIP's context length: the encoder_hidden_states length SD pipelines use
SDXL_TIME_IDS = 6  # (orig h, orig w, crop top, crop left, target h, target w)
FRAMES = 2  # frames of a motion model's latent when its config does not fix them
PIPELINE_ONLY = ("img_ids", "txt_ids", "controlnet_cond")  # defined by the pipeline's packing or image
HINT = "profile the pipeline folder instead ('--model PIPELINE_DIR --prompt TEXT'), or capture_model(model, args, kwargs)"


class SynthesisError(AsyncDiffError, TypeError):
    """A denoiser argument cannot be made from the model's config alone."""


@dataclass
class ModelInputs:
    """Example inputs of a denoiser: call it as ``model(*inputs.args, **inputs.kwargs)``.

    ``args`` holds the latent alone; every other input is in ``kwargs`` by name, with
    ``return_dict=False`` so that diffusers models return a plain tuple.
    """

    args: tuple
    kwargs: dict[str, Any]
    latent: str  # the latent argument's name: "sample" or "hidden_states"


def synthesize_inputs(model: torch.nn.Module, *, batch: int = 2, sample_size: int | None = None,
                      seed: int = 0) -> ModelInputs:
    """Random inputs of the right shapes and dtypes for ``model`` (Note [synthesised arguments]).

    Args:
        model: a denoiser with a diffusers-style ``config`` (a ``dict``-like with ``in_channels``).
        batch: batch size; 2 is one classifier-free-guidance pair.
        sample_size: latent height and width; defaults to ``config.sample_size``.
        seed: seed of the torch.Generator that draws every input.

    Raises:
        SynthesisError: an argument the model needs cannot be made from its config.
    """
    kind = type(model).__name__
    params = [p for name, p in inspect.signature(model.forward).parameters.items() if name != "self"]
    config = dict(getattr(model, "config", None) or {})
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise SynthesisError(f"{kind}.forward takes no latent argument first; {HINT}")
    for p in params[1:]:
        if p.name in PIPELINE_ONLY:
            raise SynthesisError(f"cannot make {kind}'s argument {p.name!r} from its config (the pipeline defines it); "
                                 f"{HINT}")
    if "in_channels" not in config:
        raise SynthesisError(f"cannot make {kind}'s argument {params[0].name!r}: its config has no in_channels; {HINT}")
    size = sample_size if sample_size is not None else config.get("sample_size")
    if size is None:
        raise SynthesisError(f"cannot make {kind}'s argument {params[0].name!r}: no sample_size in its config; "
                             "pass a latent size (--size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def randint(high: int) -> torch.Tensor:
        return torch.randint(0, high, (batch,), generator=gen).to(device)

    t_long = torch.randint(0, 1000, (1,), generator=gen).expand(batch).to(device)  # one t shared by the batch
    latent = params[0].name
    channels = config["in_channels"]
    if config.get("num_frames"):
        x = randn(batch, config["num_frames"], channels, h, w)
    elif config.get("motion_max_seq_length"):
        x = randn(batch, channels, FRAMES, h, w)
    else:
        x = randn(batch, channels, h, w)
    makers = {
        "timestep": lambda: _timestep(config, t_long, gen, dtype),
        "timesteps": lambda: _timestep(config, t_long, gen, dtype),
        "encoder_hidden_states": lambda: _context(config, batch, randn),
        "pooled_projections": lambda: randn(batch, config["pooled_projection_dim"]) if config.get(
            "pooled_projection_dim") else None,
        "class_labels": lambda: _class_labels(kind, config, batch, randint, randn),
        "added_cond_kwargs": lambda: _added_conditions(kind, model, config, batch, h, w, randn),
        "added_time_ids": lambda: _time_ids(kind, config, batch, dtype, device),
    }
    kwargs: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "return_dict":
            continue
        value = makers[p.name]() if p.name in makers else None
        if value is not None:
            kwargs[p.name] = value
        elif p.default is p.empty:
            raise SynthesisError(f"cannot make {kind}'s required argument {p.name!r} from its config "
                                 f"(Note [synthesised arguments]); {HINT}")
    kwargs["return_dict"] = False
    return ModelInputs(args=(x,), kwargs=kwargs, latent=latent)


def _timestep(config: dict[str, Any], t_long: torch.Tensor, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if config.get("num_frames"):  # EDM preconditioning: c_noise = log(sigma) / 4, sigma in [0.002, 700]
        log_sigma = torch.empty(1).uniform_(-6.2146, 6.5511, generator=gen)
        return (0.25 * log_sigma).expand(t_long.shape).to(t_long.device, dtype)
    if config.get("pooled_projection_dim"):  # flow matching: 1000 * sigma, a float
        return (torch.rand(1, generator=gen) * 1000).expand(t_long.shape).to(t_long.device, dtype)
    return t_long


def _context(config: dict[str, Any], batch: int, randn: Any) -> torch.Tensor | None:
    width = next((config[k] for k in ("encoder_hid_dim", "joint_attention_dim", "caption_channels",
                                      "cross_attention_dim") if config.get(k)), None)
    if width is None:
        return None
    width = width if isinstance(width, int) else width[0]
    rows = batch * FRAMES if config.get("motion_max_seq_length") else batch  # one context per frame
    return randn(rows, 1 if config.get("num_frames") else TEXT_TOKENS, width)


def _class_labels(kind: str, config: dict[str, Any], batch: int, randint: Any, randn: Any) -> torch.Tensor | None:
    embed_type = config.get("class_embed_type")
    if embed_type is None and config.get("num_class_embeds"):
        return randint(config["num_class_embeds"])
    if embed_type is None and config.get("norm_type") == "ada_norm_zero" and config.get("num_embeds_ada_norm"):
        return randint(config["num_embeds_ada_norm"])
    if embed_type is None:
        return None
    if embed_type == "timestep":
        return randint(1000)
    if embed_type in ("projection", "simple_projection"):
        return randn(batch, config["projection_class_embeddings_input_dim"])
    raise SynthesisError(f"cannot make {kind}'s argument 'class_labels' for class_embed_type={embed_type!r}; {HINT}")


def _added_conditions(kind: str, model: torch.nn.Module, config: dict[str, Any], batch: int, h: int, w: int,
                      randn: Any) -> dict[str, torch.Tensor] | None:
    embed_type = config.get("addition_embed_type")
    if embed_type == "text_time":
        n_text = config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * config["addition_time_embed_dim"]
        ids = torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=torch.float32)
        text = randn(batch, n_text)
        return {"text_embeds": text, "time_ids": ids.expand(batch, -1).to(text)}
    if embed_type is not None:
        raise SynthesisError(f"cannot make {kind}'s argument 'added_cond_kwargs' for addition_embed_type="
                             f"{embed_type!r}; {HINT}")
    if getattr(model, "use_additional_conditions", False):  # PixArt at 1024 px: resolution and aspect ratio
        size = randn(batch, 2)
        return {"resolution": torch.tensor([h * 8.0, w * 8.0]).expand(batch, -1).to(size),
                "aspect_ratio": torch.tensor([h / w]).expand(batch, -1).to(size)}
    return None


def _time_ids(kind: str, config: dict[str, Any], batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    try:
        n_ids = config["projection_class_embeddings_input_dim"] // config["addition_time_embed_dim"]
    except (KeyError, TypeError):
        raise SynthesisError(f"cannot make {kind}'s argument 'added_time_ids': its config lacks "
                             f"projection_class_embeddings_input_dim / addition_time_embed_dim; {HINT}") from None
    ids = torch.tensor([6.0, 127.0, 0.02] + [0.0] * max(0, n_ids - 3))[:n_ids]  # fps-1, motion bucket, noise aug
    return ids.expand(batch, -1).to(device=device, dtype=dtype)
