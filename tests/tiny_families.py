"""Tiny real diffusers pipelines of more families, built offline from configs with seeded random weights.

The companion of ``tiny_pipelines.py`` (whose helpers it reuses): every builder takes a folder
for the locally made tokenizer files and returns ``(pipeline, call kwargs)``, uses the real
diffusers pipeline class with tiny components (hidden sizes 4-64, 1-2 layers, 16 px images,
a few frames), and is seeded so that the same seed gives the same pipeline in every process.
Nothing is downloaded: text tokenizers are the byte-level CLIP tokenizer of ``tiny_pipelines``
(the T5 / UMT5 / Llama / Qwen pipelines take any tokenizer that pads and truncates).

``sample(pipe, kwargs, steps, seed)`` runs one call and returns the pipeline's main output as one
tensor; per-family call details (``output_type`` above all) are in the kwargs the builder returns.
``DENOISERS`` names the denoiser attribute(s) of each family, ``CALLS_PER_STEP`` how often the
denoiser runs per scheduler step, ``STEPS`` the step count a family needs at least (where 3 is
not enough).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tiny_pipelines import TEXT, TOKENS, _byte_chars, _ddim, _seeded, clip_text, random_image, sd_unet, t5_text, tokenizer, vae

__all__ = ["NEW_FAMILIES", "DENOISERS", "CALLS_PER_STEP", "STEPS", "build", "sample", "denoiser"]

SIZE = 16  # image height and width of the image families
PROMPT = "a red cube"
NEGATIVE = "blurry"

Builder = Callable[..., tuple[Any, dict[str, Any]]]


# --- shared tiny components ---------------------------------------------------------------------


def umt5_text(hidden: int = TEXT) -> Any:
    """A 1-layer UMT5 encoder (Wan, SkyReels V2)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=1000, d_model=hidden, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                        relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval()


def wan_vae() -> Any:
    """AutoencoderKLWan with base_dim 3: 8x spatial, 4x temporal compression, 16 latent channels."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_transformer(in_channels: int = 16, **extra: Any) -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=16, text_dim=TEXT, freq_dim=32, ffn_dim=32,
                                 num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, **extra).eval()


def clip_vision(hidden: int = TEXT, image_size: int = 32, patch_size: int = 8, projection: bool = True,
                projection_dim: int | None = None) -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=hidden, projection_dim=projection_dim or hidden, num_hidden_layers=1,
                              num_attention_heads=2, image_size=image_size, intermediate_size=37,
                              patch_size=patch_size)
    return (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).eval()


def clip_processor(size: int = 32) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=size, size={"shortest_edge": size})


# --- the families -------------------------------------------------------------------------------


def wan_t2v(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Wan 2.1 text-to-video: UMT5 (1 layer, d 32), WanTransformer3DModel (1 layer, 2 x 12 heads), AutoencoderKLWan.

    16 x 16 px, 5 frames -> latent 16 x 2 x 2 x 2 (2 tokens per frame pair). guidance_scale 5 and a negative
    prompt: the transformer is called twice per step (cond, then uncond, two separate batch-1 calls).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _seeded(seed)
    pipe = WanPipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), vae=wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=wan_transformer())
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=5,
                      guidance_scale=5.0, max_sequence_length=TOKENS, output_type="latent")


def wan_i2v(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Wan 2.1 image-to-video: as wan_t2v plus a CLIP vision encoder (hidden 4, 32 px) and an input image.

    The transformer takes 36 channels (16 latent + 4 mask + 16 image-condition) and the CLIP image tokens
    (image_dim 4). Two transformer calls per step (cond, uncond). Quirk: the prompts are passed as
    ``prompt_embeds`` / ``negative_prompt_embeds`` (made by WanPipeline's encoder), because the I2V pipeline's
    prompt cleaning calls ``ftfy`` without checking that it is installed.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    _seeded(seed)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), vae=wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_processor=clip_processor(32),
                                   image_encoder=clip_vision(hidden=4, image_size=32, patch_size=8, projection=False),
                                   transformer=wan_transformer(in_channels=36, image_dim=4))
    # WanImageToVideoPipeline's prompt cleaning calls ftfy.fix_text unguarded (NameError where ftfy is not
    # installed, as here): encode the prompts with WanPipeline's identical encoder and pass the embeddings.
    with torch.no_grad():
        embeds, negative = (WanPipeline._get_t5_prompt_embeds(pipe, text, max_sequence_length=TOKENS,
                                                              device=torch.device("cpu"))
                            for text in (PROMPT, NEGATIVE))
    return pipe, dict(image=random_image(seed, SIZE), prompt_embeds=embeds, negative_prompt_embeds=negative,
                      height=SIZE, width=SIZE, num_frames=5, guidance_scale=5.0, output_type="latent")


def wan22(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 text-to-video with two experts: ``transformer`` (high noise) and ``transformer_2`` (low noise).

    boundary_ratio 0.875 with a flow shift of 3: steps with t >= 875 run ``transformer``, the rest
    ``transformer_2``: at 3 steps (t = 1000, 750, 3) one step on the first and two on the second, at 6 steps
    two and four. Each step calls its expert twice (cond, uncond; guidance_scale_2 = guidance_scale).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _seeded(seed)
    pipe = WanPipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), vae=wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=wan_transformer(),
                       transformer_2=wan_transformer(), boundary_ratio=0.875)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=5,
                      guidance_scale=5.0, max_sequence_length=TOKENS, output_type="latent")


# --- registry, sample ---------------------------------------------------------------------------

NEW_FAMILIES: dict[str, Builder] = {
    "wan_t2v": wan_t2v, "wan_i2v": wan_i2v, "wan22": wan22,
}

DENOISERS: dict[str, tuple[str, ...]] = {
    "wan_t2v": ("transformer",), "wan_i2v": ("transformer",), "wan22": ("transformer", "transformer_2"),
}

CALLS_PER_STEP: dict[str, int] = {
    "wan_t2v": 2, "wan_i2v": 2, "wan22": 2,
}

STEPS: dict[str, int] = {}


def build(family: str, folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``(pipeline, call kwargs)`` of one family; progress bars off."""
    pipe, kwargs = NEW_FAMILIES[family](folder, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def denoiser(pipe: Any, name: str) -> torch.nn.Module:
    """The module ``pipe.<name>`` (a dotted name reaches into a sub-pipeline)."""
    value = pipe
    for part in name.split("."):
        value = getattr(value, part)
    return value


def sample(pipe: Any, kwargs: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """The pipeline's main output (first field of its output) as one float tensor, from a seeded generator."""
    import numpy as np

    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    value = out[0]
    if isinstance(value, (list, tuple)):
        value = np.stack([np.asarray(v) for v in value])
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
