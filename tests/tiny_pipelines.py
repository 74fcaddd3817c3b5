"""Tiny real diffusers pipelines of every family, built offline from configs with seeded random weights.

Every builder takes a folder for the locally made tokenizer files and returns
``(pipeline, call kwargs)``: ``pipe(**kwargs)`` samples at a size that runs in well under a
second on one CPU core. The same seed gives the same pipeline in every process (the ranks of a
2-process test build their own). Nothing is downloaded: the tokenizers are byte-level CLIP BPE
tokenizers without merges, written to ``folder``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TEXT = 32  # hidden size of every tiny text encoder
TOKENS = 16  # max length of the T5 prompts (Flux, PixArt)
SIZE = 16  # image height and width of every family (latent 8 x 8; the upscaler takes 16 px, makes 64)


def tokenizer(folder: str | Path) -> Any:
    """A CLIP tokenizer over single bytes (no merges), written to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder) / "tokenizer"
    if not (folder / "vocab.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        chars = _byte_chars()
        vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars),
                                                      "<|startoftext|>", "<|endoftext|>"])}
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies spell tokens with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_text(*, projection: bool = False, hidden: int = TEXT) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_text(hidden: int = TEXT) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=1000, d_model=hidden, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def vae(latent: int = 4, **extra: Any) -> Any:
    """A two-level AutoencoderKL: the latent is the image / 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=32, **extra).eval()


def sd_unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=TEXT,
                  attention_head_dim=4, use_linear_projection=True)
    return UNet2DConditionModel(**{**config, **extra}).eval()


def random_image(seed: int, size: int = 32) -> Any:
    """A seeded random RGB PIL image (the conditioning image of image-to-X pipelines)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _ddim() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# --- the families -----------------------------------------------------------------------------


def sd(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD 1.5 / 2.1 layout: CLIP text encoder, UNet2DConditionModel, DDIM."""
    from diffusers import StableDiffusionPipeline

    _seeded(seed)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder), unet=sd_unet(),
                                   scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, guidance_scale=5.0)


def sdxl_parts(folder: str | Path) -> dict[str, Any]:
    """SDXL's components: two CLIP encoders, a text_time UNet (added_cond_kwargs), Euler (leading)."""
    from diffusers import EulerDiscreteScheduler

    unet = sd_unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * TEXT,
                   transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + TEXT)
    tok = tokenizer(folder)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(vae=vae(), text_encoder=clip_text(), text_encoder_2=clip_text(projection=True), tokenizer=tok,
                tokenizer_2=tok, unet=unet, scheduler=scheduler)


def sdxl(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SDXL: two CLIP encoders, a text_time UNet (added_cond_kwargs)."""
    from diffusers import StableDiffusionXLPipeline

    _seeded(seed)
    pipe = StableDiffusionXLPipeline(**sdxl_parts(folder))
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, guidance_scale=5.0)


def sd3(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD3: two CLIP encoders with projection (T5 left out), SD3Transformer2DModel, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seeded(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=2 * TEXT, pooled_projection_dim=2 * TEXT,
                                        pos_embed_max_size=16).eval()
    tok = tokenizer(folder)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(shift_factor=0.06), text_encoder=clip_text(projection=True), tokenizer=tok,
                                    text_encoder_2=clip_text(projection=True), tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None)
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, guidance_scale=5.0)


def flux(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Flux: CLIP + T5 encoders, FluxTransformer2DModel called with t / 1000 and packed latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seeded(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                         pooled_projection_dim=TEXT, axes_dims_rope=(4, 6, 6)).eval()
    tok = tokenizer(folder)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.06),
                        text_encoder=clip_text(), tokenizer=tok, text_encoder_2=t5_text(), tokenizer_2=tok,
                        transformer=transformer)
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, guidance_scale=3.5, max_sequence_length=TOKENS)


def controlnet(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD with a ControlNet: the UNet also takes the ControlNet's list of residuals."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    _seeded(seed)
    net = ControlNetModel(in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                          cross_attention_dim=TEXT, attention_head_dim=4, use_linear_projection=True,
                          conditioning_embedding_out_channels=(8, 16)).eval()
    pipe = StableDiffusionControlNetPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder),
                                             unet=sd_unet(), controlnet=net, scheduler=_ddim(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    return pipe, dict(prompt="a red cube", image=image, height=SIZE, width=SIZE, guidance_scale=5.0)


def upscaler(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD x4 upscaler: latent + low-res image channels, ``class_labels`` = noise level."""
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    _seeded(seed)
    unet = sd_unet(in_channels=7, num_class_embeds=1000)
    pipe = StableDiffusionUpscalePipeline(vae=vae(scaling_factor=0.08333), text_encoder=clip_text(),
                                          tokenizer=tokenizer(folder), unet=unet, low_res_scheduler=DDPMScheduler(),
                                          scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                          watermarker=None, max_noise_level=350)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return pipe, dict(prompt="a red cube", image=image, guidance_scale=5.0)


def pixart(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """PixArt-alpha: T5 encoder, PixArtTransformer2DModel (learned sigma)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    _seeded(seed)
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=TEXT, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer(folder), text_encoder=t5_text(), vae=vae(), transformer=transformer,
                               scheduler=_ddim())
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, guidance_scale=4.5, use_resolution_binning=False,
                      max_sequence_length=TOKENS, clean_caption=False)


def svd(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Stable Video Diffusion: CLIP image encoder, spatio-temporal UNet, EDM Euler."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, num_frames=2, layers_per_block=1,
        block_out_channels=(32, 64), num_attention_heads=(2, 4), cross_attention_dim=TEXT,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24).eval()
    decoder = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                                           down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                                           layers_per_block=1).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TEXT, projection_dim=TEXT, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=56)).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       interpolation_type="linear", num_train_timesteps=1000, prediction_type="v_prediction",
                                       sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
                                       timestep_type="continuous", use_karras_sigmas=True)
    processor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    pipe = StableVideoDiffusionPipeline(vae=decoder, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=processor)
    return pipe, dict(image=random_image(seed), height=SIZE, width=SIZE, num_frames=2, decode_chunk_size=2)


def animatediff(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """AnimateDiff: the pipeline turns UNet2DConditionModel + MotionAdapter into a UNetMotionModel."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    _seeded(seed)
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    pipe = AnimateDiffPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder), unet=sd_unet(),
                               motion_adapter=adapter, scheduler=_ddim())
    return pipe, dict(prompt="a red cube", height=SIZE, width=SIZE, num_frames=2, guidance_scale=5.0)


def dit(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """DiT: class-conditional DiTTransformer2DModel, learned sigma."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    _seeded(seed)
    transformer = DiTTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=1000,
                                        norm_num_groups=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=_ddim())
    return pipe, dict(class_labels=[3], guidance_scale=4.0)


def ddpm(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """DDPM: an unconditional pixel-space UNet2DModel."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    _seeded(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), dict(batch_size=1)


FAMILIES: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "sd": sd, "sdxl": sdxl, "sd3": sd3, "flux": flux, "controlnet": controlnet, "upscaler": upscaler,
    "pixart": pixart, "svd": svd, "animatediff": animatediff, "dit": dit, "ddpm": ddpm,
}


def build(family: str, folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``(pipeline, call kwargs)`` of one family; progress bars off."""
    pipe, kwargs = FAMILIES[family](folder, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def sample(pipe: Any, kwargs: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """The pipeline's final latent (or image) as a tensor, from a seeded generator."""
    import numpy as np

    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent")
    value = out[0]
    return torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value


def parallel_sample(families: list[str], folder: str, cache_dir: str, steps: int,
                    plans: dict[str, str] | None = None) -> dict[str, Any]:
    """One rank of a 2-process test: every family built with the same seed, parallelized, sampled.

    ``plans``: a saved plan file per family (rank 0 loads it and sends it); default: rank 0 plans.
    Returns ``{family: (output, plan as a dict)}``; runs under ``launch.launch``.
    """
    from asyncdiff_partition.pipelines.parallelize import parallelize

    torch.set_num_threads(1)
    results = {}
    for family in families:
        pipe, kwargs = build(family, folder)
        parallelize(pipe, devices=2, warmup=1, cache_dir=cache_dir, plan=(plans or {}).get(family), timeout_s=120,
                    **kwargs)
        output = sample(pipe, kwargs, steps)
        denoiser = next(v for v in vars(pipe).values() if isinstance(v, torch.nn.Module) and "plan" in vars(v))
        results[family] = (output, denoiser.plan.to_dict())
    return results
