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
denoiser runs per scheduler step, ``expected_calls`` how often it runs in one call of T steps
(Heun, PNDM and strength change the count), ``STEPS`` the step count a family needs at least
(where 3 is not enough).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tiny_pipelines import (
    TEXT,
    TOKENS,
    _ddim,
    _seeded,
    clip_text,
    random_image,
    sd_unet,
    sdxl_parts,
    t5_text,
    tokenizer,
    vae,
)

__all__ = ["NEW_FAMILIES", "DENOISERS", "CALLS_PER_STEP", "STEPS", "STEP_ARGS", "build", "sample", "expected_calls"]

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


def wan_prompt_embeds(pipe: Any, *texts: str) -> list[torch.Tensor]:
    """UMT5 embeddings of ``texts`` by WanPipeline's own encoder code, for pipelines whose prompt cleaning calls
    ``ftfy.fix_text`` unguarded (WanImageToVideoPipeline, SkyReelsV2Pipeline: NameError without ftfy)."""
    from diffusers import WanPipeline

    with torch.no_grad():
        return [WanPipeline._get_t5_prompt_embeds(pipe, text, max_sequence_length=TOKENS, device=torch.device("cpu"))
                for text in texts]


# --- the families -------------------------------------------------------------------------------


def wan_t2v(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Wan 2.1 text-to-video: UMT5 (1 layer, d 32), WanTransformer3DModel (1 layer, 2 x 12 heads), AutoencoderKLWan.

    16 x 16 px, 5 frames -> latent (1, 16, 2, 2, 2): 2 latent frames of one 2 x 2 patch each, 2 tokens.
    guidance_scale 5 and a negative prompt: the transformer is called twice per step (cond, then uncond, two
    separate batch-1 calls).
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
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    _seeded(seed)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), vae=wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_processor=clip_processor(32),
                                   image_encoder=clip_vision(hidden=4, image_size=32, patch_size=8, projection=False),
                                   transformer=wan_transformer(in_channels=36, image_dim=4))
    embeds, negative = wan_prompt_embeds(pipe, PROMPT, NEGATIVE)
    return pipe, dict(image=random_image(seed, SIZE), prompt_embeds=embeds, negative_prompt_embeds=negative,
                      height=SIZE, width=SIZE, num_frames=5, guidance_scale=5.0, output_type="latent")


def wan22(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 text-to-video with two experts: ``transformer`` (high noise) and ``transformer_2`` (low noise).

    boundary_ratio 0.875 with a flow shift of 3: steps with t >= 875 run ``transformer``, the rest
    ``transformer_2``: at 3 steps (t = 1000, 750, 3) one step on the first and two on the second; 4 steps:
    1 + 3, 5 steps: 2 + 3, 6 steps: 2 + 4. Each step calls its expert twice (cond, uncond; guidance_scale_2 = guidance_scale).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _seeded(seed)
    pipe = WanPipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), vae=wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=wan_transformer(),
                       transformer_2=wan_transformer(), boundary_ratio=0.875)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=5,
                      guidance_scale=5.0, max_sequence_length=TOKENS, output_type="latent")


def chroma(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Chroma: T5 encoder (2 layers, d 32), ChromaTransformer2DModel (1 double + 1 single block, 2 x 16 heads).

    Flux-style packed latents (AutoencoderKL with 4 latent channels, 16 px -> 4 packed tokens).
    guidance_scale 4 with a negative prompt: the transformer is called twice per step (cond, then uncond).
    """
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seeded(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                           axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.06),
                          text_encoder=t5_text(), tokenizer=tokenizer(folder), transformer=transformer)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=4.0,
                      max_sequence_length=TOKENS, output_type="latent")


def skyreels(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SkyReels V2 text-to-video: UMT5 (1 layer), SkyReelsV2Transformer3DModel (1 layer, 2 x 12 heads), Wan VAE.

    UniPC multistep with flow sigmas (its scheduler). 16 px, 5 frames. guidance_scale 5 and a negative prompt:
    two transformer calls per step (cond, uncond). Quirk: prompts passed as embeddings (``wan_prompt_embeds``:
    the pipeline's prompt cleaning calls ``ftfy`` unguarded).
    """
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    _seeded(seed)
    transformer = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                               in_channels=16, out_channels=16, text_dim=TEXT, freq_dim=32,
                                               ffn_dim=32, num_layers=1, cross_attn_norm=True,
                                               qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SkyReelsV2Pipeline(tokenizer=tokenizer(folder), text_encoder=umt5_text(), transformer=transformer,
                              vae=wan_vae(), scheduler=scheduler)
    embeds, negative = wan_prompt_embeds(pipe, PROMPT, NEGATIVE)
    return pipe, dict(prompt_embeds=embeds, negative_prompt_embeds=negative, height=SIZE, width=SIZE, num_frames=5,
                      guidance_scale=5.0, output_type="latent")


def qwen_true_cfg(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Qwen-Image with true CFG: a tiny Qwen2.5-VL (text 2 layers d 16, vocab 1000; vision 1 block), QwenImageTransformer2DModel
    (1 layer, 3 x 16 heads), AutoencoderKLQwenImage (z 4, 4x spatial).

    true_cfg_scale 4 with a negative prompt: the transformer is called twice per step (cond, then uncond).
    The prompt goes through Qwen's chat template (its first 34 tokens dropped), with the byte tokenizer.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seeded(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    autoencoder = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                         temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                         latents_std=[1.0] * 4).eval()
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=1000, bos_token_id=512, eos_token_id=513,
                         rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default"),
                         rope_theta=1000000.0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=1000, bos_token_id=512, eos_token_id=513, vision_start_token_id=997,
        vision_end_token_id=998, vision_token_id=999, image_token_id=996, video_token_id=995)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=autoencoder, text_encoder=text_encoder,
                             tokenizer=tokenizer(folder), transformer=transformer)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=SIZE, width=SIZE,
                      max_sequence_length=TOKENS, output_type="latent")


def cogvideox(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """CogVideoX: T5 encoder (2 layers, d 32), CogVideoXTransformer3DModel (1 layer, 4 x 8 heads, sincos positions),
    AutoencoderKLCogVideoX (4 levels of 8 channels: 8x spatial, 4x temporal, 4 latent channels), CogVideoX DDIM.

    16 px, 5 frames -> latent (1, 2, 4, 2, 2). guidance_scale 6: ONE transformer call per step on a batch of 2
    (uncond and cond latents concatenated).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    _seeded(seed)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=TEXT, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=5, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=TOKENS).eval()
    autoencoder = AutoencoderKLCogVideoX(in_channels=3, out_channels=3,
                                         down_block_types=("CogVideoXDownBlock3D",) * 4,
                                         up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                         latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                         temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=tokenizer(folder), text_encoder=t5_text(), vae=autoencoder,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=5,
                      guidance_scale=6.0, max_sequence_length=TOKENS, output_type="latent")


def ltx(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """LTX-Video: T5 encoder (2 layers, d 32), LTXVideoTransformer3DModel (1 layer, 4 x 8 heads, 8 channels),
    AutoencoderKLLTXVideo (8 channels a level, 4x spatial and 4x temporal compression).

    32 px (LTX needs a multiple of 32), 9 frames -> 3 latent frames of 8 x 8, packed to 192 tokens (output_type
    "latent" returns them packed: (1, 192, 8)).
    guidance_scale 3: ONE transformer call per step on a batch of 2 (uncond, cond concatenated).
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    _seeded(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=TEXT,
                                             num_layers=1, caption_channels=TEXT).eval()
    autoencoder = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8,) * 4,
                                        decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
                                        decoder_layers_per_block=(1,) * 5,
                                        spatio_temporal_scaling=(True, True, False, False),
                                        decoder_spatio_temporal_scaling=(True, True, False, False),
                                        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                        upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
                                        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=autoencoder, text_encoder=t5_text(),
                       tokenizer=tokenizer(folder), transformer=transformer)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_frames=9,
                      guidance_scale=3.0, max_sequence_length=TOKENS, output_type="latent")


def hunyuan_video(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """HunyuanVideo: Llama encoder (2 layers, d 16; its default chat template, cropped), CLIP text encoder (pooled),
    HunyuanVideoTransformer3DModel (1 double + 1 single block, 1 refiner layer, 2 x 10 heads), AutoencoderKLHunyuanVideo.

    16 px, 5 frames -> latent (1, 4, 2, 2, 2). Guidance is distilled (guidance_embeds, guidance_scale 6 goes into
    the transformer): ONE transformer call per step, batch 1 (no true CFG: true_cfg_scale stays 1).
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    _seeded(seed)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=TEXT,
                                                 rope_axes_dim=(2, 4, 4)).eval()
    autoencoder = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                                            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                            spatial_compression_ratio=8, temporal_compression_ratio=4,
                                            mid_block_add_attention=True).eval()
    llama = LlamaModel(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                   hidden_act="gelu")).eval()
    tok = tokenizer(folder)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=transformer, vae=autoencoder,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip_text(),
                                tokenizer_2=tok)
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, num_frames=5, guidance_scale=6.0,
                      max_sequence_length=TOKENS, output_type="latent")


def pag_sd(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Stable Diffusion with perturbed-attention guidance: the tiny SD of tiny_pipelines (CLIP 2 layers d 32,
    UNet2DConditionModel (16, 32)), DDIM, PAG on the mid block's self-attention (``pag_applied_layers=["mid"]``).

    guidance_scale 5 and pag_scale 3: ONE UNet call per step on a batch of 3 (uncond, cond, perturbed); the
    pipeline swaps in PAG attention processors for the call and restores the originals after it.
    """
    from diffusers import StableDiffusionPAGPipeline

    _seeded(seed)
    pipe = StableDiffusionPAGPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder), unet=sd_unet(),
                                      scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False, pag_applied_layers=["mid"])
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, guidance_scale=5.0, pag_scale=3.0, output_type="latent")


def pag_sdxl(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SDXL with perturbed-attention guidance: two CLIP encoders, the text_time UNet of tiny_pipelines.sdxl,
    Euler, PAG on the mid block (``pag_applied_layers=["mid"]``).

    guidance_scale 5 and pag_scale 3: ONE UNet call per step on a batch of 3 (uncond, cond, perturbed).
    """
    from diffusers import StableDiffusionXLPAGPipeline

    _seeded(seed)
    pipe = StableDiffusionXLPAGPipeline(**sdxl_parts(folder), add_watermarker=False, pag_applied_layers=["mid"])
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, guidance_scale=5.0, pag_scale=3.0, output_type="latent")


def _kandinsky_prior_parts(folder: str | Path) -> dict[str, Any]:
    """The Kandinsky 2.2 prior's components: PriorTransformer (1 layer, 2 x 12 heads, embedding 32), CLIP text and
    vision encoders with projection (1 layer, d 32, 32 px images), UnCLIP scheduler."""
    from diffusers import PriorTransformer, UnCLIPScheduler

    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=TEXT, num_layers=1).eval()
    with torch.no_grad():  # clip_std starts at 0, which would zero every output embedding
        prior.clip_std.fill_(1.0)
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    return dict(prior=prior, image_encoder=clip_vision(image_size=32, patch_size=8),
                text_encoder=clip_text(projection=True), tokenizer=tokenizer(folder), scheduler=scheduler,
                image_processor=clip_processor(32))


def _kandinsky_decoder_parts() -> dict[str, Any]:
    """The Kandinsky 2.2 decoder's components: an image-conditioned UNet2DConditionModel ((16, 32) channels,
    image_proj + image embeddings of width 32, learned variance), a (32, 64) VQModel MoVQ (2x; its spatial norm
    needs multiples of 32 channels), DDPM."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    unet = UNet2DConditionModel(in_channels=4, out_channels=8, addition_embed_type="image",
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32),
                                layers_per_block=1, encoder_hid_dim=TEXT, encoder_hid_dim_type="image_proj",
                                cross_attention_dim=TEXT, attention_head_dim=4, norm_num_groups=8,
                                resnet_time_scale_shift="scale_shift", class_embed_type=None).eval()
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4).eval()
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1, prediction_type="epsilon", variance_type="learned_range")
    return dict(unet=unet, scheduler=scheduler, movq=movq)


def kandinsky22_prior(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Kandinsky 2.2 prior: text -> CLIP image embedding (1, 32). Denoiser ``prior`` (PriorTransformer).

    guidance_scale 4: ONE prior call per step on a batch of 2 (uncond, cond). output_type "pt" (the prior
    refuses "latent"); the main output is ``image_embeds``. The negative embedding comes from the image encoder
    on a zero image.
    """
    from diffusers import KandinskyV22PriorPipeline

    _seeded(seed)
    pipe = KandinskyV22PriorPipeline(**_kandinsky_prior_parts(folder))
    return pipe, dict(prompt=PROMPT, guidance_scale=4.0, output_type="pt")


def kandinsky22_img2img(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Kandinsky 2.2 decoder, image-to-image: UNet conditioned on (seeded random) image embeddings (1, 32), MoVQ.

    16 px image, strength 0.6: of T steps only int(0.6 T) run, so it needs T >= 4 for 2 steps (``STEPS`` says 5:
    3 steps). guidance_scale 4: ONE UNet call per step on a batch of 2 (negative, positive embeddings). The UNet
    predicts mean and variance (8 channels); the pipeline keeps the first 4.
    """
    from diffusers import KandinskyV22Img2ImgPipeline

    _seeded(seed)
    pipe = KandinskyV22Img2ImgPipeline(**_kandinsky_decoder_parts())
    generator = torch.Generator().manual_seed(seed)
    embeds, negative = torch.randn(2, 1, TEXT, generator=generator)
    return pipe, dict(image=random_image(seed, SIZE), image_embeds=embeds, negative_image_embeds=negative,
                      height=SIZE, width=SIZE, strength=0.6, guidance_scale=4.0, output_type="latent")


def kandinsky22_combined(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Kandinsky 2.2 text-to-image, prior and decoder in one pipeline (the two above, text-to-image decoder).

    Two denoisers, one after the other: ``prior_prior`` (PriorTransformer, the prior sub-pipeline's ``prior``)
    for ``prior_num_inference_steps``, then ``unet`` for ``num_inference_steps``; ``sample`` sets both to T
    (``STEP_ARGS``; the kwargs say 3 prior steps, not the pipeline's 25, for calls that do not set it). Each
    calls its denoiser once per step on a batch of 2 (CFG). output_type "latent".
    """
    from diffusers import KandinskyV22CombinedPipeline

    _seeded(seed)
    prior = _kandinsky_prior_parts(folder)
    pipe = KandinskyV22CombinedPipeline(**_kandinsky_decoder_parts(), **{f"prior_{k}": v for k, v in prior.items()})
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, guidance_scale=4.0, prior_guidance_scale=4.0,
                      prior_num_inference_steps=3, output_type="latent")


def shap_e(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Shap-E text-to-3D: CLIP text encoder with projection (2 layers, d 32), PriorTransformer (1 layer, 2 x 16
    heads, 32 embeddings of 32), a tiny ShapERenderer (never run: output_type "latent"), Heun (exp betas, Karras).

    Denoiser ``prior``. Heun evaluates the model twice per step except the last: 2 T - 1 prior calls for T steps
    (5 at T = 3), each on a batch of 2 (guidance_scale 4). The latent is (1, 32, 32): 32 embeddings of 32.
    """
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer

    _seeded(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, embedding_dim=32, num_embeddings=32,
                             embedding_proj_dim=TEXT, time_embed_dim=128, num_layers=1, clip_embed_dim=64,
                             additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                             encoder_hid_proj_type=None, added_emb_type=None).eval()
    renderer = ShapERenderer(param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)), d_latent=32, d_hidden=8, n_output=12,
                             background=(0.1, 0.1, 0.1)).eval()
    scheduler = HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                      use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    pipe = ShapEPipeline(prior=prior, text_encoder=clip_text(projection=True), tokenizer=tokenizer(folder),
                         scheduler=scheduler, shap_e_renderer=renderer)
    return pipe, dict(prompt=PROMPT, guidance_scale=4.0, frame_size=16, output_type="latent")


def t2i_adapter(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD with a T2I-Adapter: the tiny SD, a full T2IAdapter (channels (16, 32), pixel-unshuffle 2 to match the
    2x VAE) on a seeded random 16 px control image, DDIM.

    The adapter runs once per call (before the loop); its features enter the UNet as
    ``down_intrablock_additional_residuals`` at every step. guidance_scale 5: ONE UNet call per step, batch 2.
    """
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    _seeded(seed)
    adapter = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter").eval()
    pipe = StableDiffusionAdapterPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder),
                                          unet=sd_unet(), adapter=adapter, scheduler=_ddim(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    return pipe, dict(prompt=PROMPT, image=random_image(seed, SIZE), height=SIZE, width=SIZE, guidance_scale=5.0,
                      output_type="latent")


def marigold_depth(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Marigold depth: UNet2DConditionModel with 8 input channels (image latent + depth latent), the tiny VAE and
    CLIP text encoder (empty prompt), DDIM.

    16 px image, processing_resolution 16, ensemble of 1: ONE UNet call per step, batch 1, no guidance. The pipeline
    refuses output_type "latent" ("pt" or "np" only): output_type "pt", the main output is ``prediction``
    (1, 1, 16, 16) in [0, 1].
    """
    from diffusers import MarigoldDepthPipeline

    _seeded(seed)
    scheduler = _ddim()
    scheduler.register_to_config(prediction_type="v_prediction", timestep_spacing="trailing")
    pipe = MarigoldDepthPipeline(unet=sd_unet(in_channels=8), vae=vae(), scheduler=scheduler, text_encoder=clip_text(),
                                 tokenizer=tokenizer(folder), prediction_type="depth", scale_invariant=True,
                                 shift_invariant=True, default_denoising_steps=1, default_processing_resolution=SIZE)
    return pipe, dict(image=random_image(seed, SIZE), processing_resolution=SIZE, ensemble_size=1, output_type="pt")


def stable_audio(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Stable Audio Open: T5 encoder (2 layers, d 32), StableAudioProjectionModel, StableAudioDiTModel (2 layers,
    2 heads of 4), AutoencoderOobleck (hop 2, 4 Hz: 2 s of stereo audio = 4 latent frames of 3 channels),
    EDM DPM-Solver (order 3, v-prediction).

    guidance_scale 6: ONE transformer call per step on a batch of 2. output_type "latent": (1, 3, 4).
    """
    from diffusers import AutoencoderOobleck, EDMDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    _seeded(seed)
    transformer = StableAudioDiTModel(sample_size=4, in_channels=3, num_layers=2, attention_head_dim=4,
                                      num_attention_heads=2, num_key_value_attention_heads=2, out_channels=3,
                                      cross_attention_dim=4, time_proj_dim=8, global_states_input_dim=8,
                                      cross_attention_input_dim=4).eval()
    scheduler = EDMDPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction", sigma_data=1.0,
                                               sigma_schedule="exponential")
    autoencoder = AutoencoderOobleck(encoder_hidden_size=6, downsampling_ratios=[1, 2], decoder_channels=3,
                                     decoder_input_channels=3, audio_channels=2, channel_multiples=[2, 4],
                                     sampling_rate=4).eval()
    projection = StableAudioProjectionModel(text_encoder_dim=TEXT, conditioning_dim=4, min_value=0, max_value=32).eval()
    pipe = StableAudioPipeline(vae=autoencoder, text_encoder=t5_text(), projection_model=projection,
                               tokenizer=tokenizer(folder), transformer=transformer, scheduler=scheduler)
    return pipe, dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0, output_type="latent")


def deepfloyd_if(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """DeepFloyd IF stage I: T5 encoder (2 layers, d 32), pixel-space UNet2DConditionModel ((32, 64), text
    addition embedding, learned variance: 6 output channels), DDPM with dynamic thresholding.

    16 px RGB directly (no VAE). guidance_scale 7: ONE UNet call per step, batch 2. output_type "pt" (the
    pipeline has no latent output; safety checker and watermarker are None): (1, 3, 16, 16).
    """
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    _seeded(seed)
    unet = UNet2DConditionModel(sample_size=SIZE, layers_per_block=1, block_out_channels=[32, 64],
                                down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3,
                                out_channels=6, cross_attention_dim=TEXT, encoder_hid_dim=TEXT, attention_head_dim=8,
                                addition_embed_type="text", addition_embed_type_num_heads=2,
                                cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
                                act_fn="gelu").eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                              prediction_type="epsilon", variance_type="learned_range")
    pipe = IFPipeline(tokenizer=tokenizer(folder), text_encoder=t5_text(), unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, guidance_scale=7.0, clean_caption=False, output_type="pt")


def sd_inpaint_pndm(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """SD inpainting with PNDM (its historical default scheduler, PLMS only: skip_prk_steps): the tiny SD with a
    9-channel UNet (latent + mask + masked-image latent), a seeded random 16 px image, a mask of its right half.

    PNDM runs T + 1 timesteps for T steps (the first is repeated to start the linear multistep), so the UNet
    is called T + 1 times (4 at T = 3), each on a batch of 2 (guidance_scale 5). strength 1 (the default).
    """
    import numpy as np
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline
    from PIL import Image

    _seeded(seed)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae(), text_encoder=clip_text(), tokenizer=tokenizer(folder),
                                          unet=sd_unet(in_channels=9), scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    return pipe, dict(prompt=PROMPT, image=random_image(seed, SIZE), mask_image=Image.fromarray(mask), height=SIZE,
                      width=SIZE, guidance_scale=5.0, output_type="latent")


def hunyuanimage21(folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """HunyuanImage 2.1: a tiny Qwen2.5-VL (text 2 layers d 32, vocab 1000) and a ByT5-style T5 (2 layers, d 32)
    for glyph text, HunyuanImageTransformer2DModel (1 double + 1 single block, 4 x 8 heads),
    AutoencoderKLHunyuanImage (32 channels a level, 8x: 16 px -> 2 x 2 latents), flow matching, two
    AdaptiveProjectedMixGuidance guiders (plain and OCR).

    Quirks: the transformer's ByT5 projection has a hard-coded hidden size of 2048 (4.3 M of its 4.5 M
    parameters); the prompt lengths (plain pipeline attributes, 1000 and 128 tokens) are cut to 16. Guidance goes
    through the guider objects: the transformer is called twice per step (cond, uncond, separate batch-1 calls).
    """
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

    _seeded(seed)
    transformer = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=4,
                                                 attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False,
                                                 text_embed_dim=32, text_embed_2_dim=32, rope_axes_dim=(4, 4)).eval()
    autoencoder = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4,
                                            block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                            scaling_factor=0.476986, spatial_compression_ratio=8, sample_size=128).eval()
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=1000, bos_token_id=512, eos_token_id=513,
                         rope_scaling=dict(mrope_section=[2, 2, 4], rope_type="default", type="default"),
                         rope_theta=1000000.0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32),
        hidden_size=32, vocab_size=1000, bos_token_id=512, eos_token_id=513, vision_start_token_id=997,
        vision_end_token_id=998, vision_token_id=999, image_token_id=996, video_token_id=995)
    byt5 = T5EncoderModel(T5Config(d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   vocab_size=384, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                                   is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)).eval()
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=autoencoder,
                                text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                                tokenizer=tokenizer(folder), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
                                transformer=transformer,
                                guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
                                ocr_guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3))
    pipe.tokenizer_max_length = pipe.tokenizer_2_max_length = TOKENS  # plain attributes; 1000 and 128 tokens otherwise
    return pipe, dict(prompt=PROMPT, height=SIZE, width=SIZE, output_type="latent")


# --- registry, sample ---------------------------------------------------------------------------

NEW_FAMILIES: dict[str, Builder] = {
    "wan_t2v": wan_t2v, "wan_i2v": wan_i2v, "wan22": wan22, "chroma": chroma, "skyreels": skyreels,
    "qwen_true_cfg": qwen_true_cfg, "cogvideox": cogvideox, "ltx": ltx, "hunyuan_video": hunyuan_video,
    "pag_sd": pag_sd, "pag_sdxl": pag_sdxl, "kandinsky22_prior": kandinsky22_prior,
    "kandinsky22_img2img": kandinsky22_img2img, "kandinsky22_combined": kandinsky22_combined, "shap_e": shap_e,
    "t2i_adapter": t2i_adapter, "marigold_depth": marigold_depth, "stable_audio": stable_audio,
    "deepfloyd_if": deepfloyd_if, "sd_inpaint_pndm": sd_inpaint_pndm, "hunyuanimage21": hunyuanimage21,
}

DENOISERS: dict[str, tuple[str, ...]] = {
    "wan_t2v": ("transformer",), "wan_i2v": ("transformer",), "wan22": ("transformer", "transformer_2"),
    "chroma": ("transformer",), "skyreels": ("transformer",), "qwen_true_cfg": ("transformer",),
    "cogvideox": ("transformer",), "ltx": ("transformer",), "hunyuan_video": ("transformer",),
    "pag_sd": ("unet",), "pag_sdxl": ("unet",), "kandinsky22_prior": ("prior",), "kandinsky22_img2img": ("unet",),
    "kandinsky22_combined": ("prior_prior", "unet"), "shap_e": ("prior",), "t2i_adapter": ("unet",),
    "marigold_depth": ("unet",), "stable_audio": ("transformer",), "deepfloyd_if": ("unet",),
    "sd_inpaint_pndm": ("unet",), "hunyuanimage21": ("transformer",),
}

CALLS_PER_STEP: dict[str, int] = {
    "wan_t2v": 2, "wan_i2v": 2, "wan22": 2, "chroma": 2, "skyreels": 2, "qwen_true_cfg": 2, "cogvideox": 1, "ltx": 1,
    "hunyuan_video": 1, "pag_sd": 1, "pag_sdxl": 1, "kandinsky22_prior": 1, "kandinsky22_img2img": 1,
    "kandinsky22_combined": 1, "shap_e": 1, "t2i_adapter": 1, "marigold_depth": 1, "stable_audio": 1,
    "deepfloyd_if": 1, "sd_inpaint_pndm": 1, "hunyuanimage21": 2,
}

STEPS: dict[str, int] = {"kandinsky22_img2img": 5}  # strength 0.6: 5 steps asked, int(0.6 * 5) = 3 run

# the call arguments that take the step count T, wherever the pipeline has them (the combined Kandinsky's prior)
STEP_ARGS = ("num_inference_steps", "prior_num_inference_steps")


def expected_calls(family: str, steps: int) -> int:
    """How many denoiser calls (all denoisers together) one pipeline call at ``steps`` steps makes."""
    runs = {"kandinsky22_img2img": int(steps * 0.6),  # strength 0.6
            "shap_e": 2 * steps - 1,  # Heun: two evaluations a step but the last
            "sd_inpaint_pndm": steps + 1,  # PNDM (PLMS): the first timestep twice
            "kandinsky22_combined": 2 * steps,  # T prior steps, then T decoder steps
            }.get(family, steps)
    return CALLS_PER_STEP[family] * runs


def build(family: str, folder: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``(pipeline, call kwargs)`` of one family; progress bars off."""
    pipe, kwargs = NEW_FAMILIES[family](folder, seed)
    pipe.set_progress_bar_config(disable=True)
    for sub in ("prior_pipe", "decoder_pipe"):  # a combined pipeline's stages have progress bars of their own
        if hasattr(pipe, sub):
            getattr(pipe, sub).set_progress_bar_config(disable=True)
    return pipe, kwargs


def sample(pipe: Any, kwargs: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """One call at ``steps`` steps from a seeded generator; its main output (the output's first field) as a tensor.

    Every argument of ``STEP_ARGS`` the pipeline takes is set to ``steps`` (overriding ``kwargs``). The output
    type is the builder's (``kwargs["output_type"]``): latents where the pipeline has them, else "pt" (a NumPy
    array or a list of arrays is turned into one tensor).
    """
    import inspect

    import numpy as np

    takes = inspect.signature(pipe.__call__).parameters
    call = {**kwargs, **{name: steps for name in STEP_ARGS if name in takes}}
    value = pipe(**call, generator=torch.Generator().manual_seed(seed))[0]
    if isinstance(value, (list, tuple)):
        value = np.stack([np.asarray(v) for v in value])
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
