"""An SD 2.1-architecture pipeline with seeded random weights, saved as a folder (safetensors): the benchmarks' model.

    python benchmarks/pipelines/sd21.py --out /tmp/sd21        # about 5 GB, 1-2 min on 2 cores

The UNet is the zoo's ``sd21-unet`` (SD 2.1 base: 865 M parameters, attention heads 5/10/20/20,
linear projections, cross attention 1024), the text encoder OpenCLIP ViT-H/14's text tower as
diffusers configures it (CLIPTextModel: 1024 wide, 23 layers, 16 heads), the VAE SD's
AutoencoderKL, the scheduler DDIM with SD 2.1 base's settings. The tokenizer is a byte-level CLIP
tokenizer made here (nothing is downloaded). Random weights: timings and memory are the real
architecture's; images are noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the local tokenizer of the tests' tiny pipelines


def build(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from tiny_pipelines import tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from asyncdiff_partition.pipelines.zoo import build_model

    torch.manual_seed(seed)
    unet = build_model("sd21-unet").eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=512, bos_token_id=512, eos_token_id=513,
                                        pad_token_id=513)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=768, scaling_factor=0.18215).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer(Path("/tmp/asyncdiff-sd21-tokenizer")),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (save_pretrained)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (Path(args.out) / "model_index.json").is_file():
        print(f"{args.out} exists")
        return
    begin = time.perf_counter()
    pipe = build(args.seed)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out} in {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
