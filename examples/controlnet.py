"""A ControlNet pipeline on N processes with one call: the UNet is split, the ControlNet replicated.

    python examples/controlnet.py PIPELINE_DIR "a red cube" edges.png                # 2 ranks started for you
    python examples/controlnet.py PIPELINE_DIR "a red cube" edges.png --reference    # one process

PIPELINE_DIR is a local StableDiffusion(XL)ControlNetPipeline folder (``save_pretrained``). The
dry run finds the UNet as the denoiser (the ControlNet is called every step too, but its output
is not what ``scheduler.step`` takes); the UNet's call, with the ControlNet's list of residuals,
is what gets captured and split. The ControlNet itself runs whole where the pipeline's loop runs
(this process; under torchrun every rank): its residuals of the current step are inputs of the
UNet's segments.
"""

from __future__ import annotations

import argparse
import os

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from asyncdiff_partition import parallelize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("prompt")
    parser.add_argument("image", help="the conditioning image (edges, depth, pose, ...)")
    parser.add_argument("--size", type=int, default=None, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 2)))
    parser.add_argument("--reference", action="store_true", help="single-process reference schedule")
    parser.add_argument("--out", default="controlnet.png")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    call = {"prompt": args.prompt, "image": Image.open(args.image).convert("RGB"), "num_inference_steps": args.steps}
    if args.size:
        call.update(height=args.size, width=args.size)
    parallelize(pipe, devices=args.devices, reference=args.reference, steps=args.steps, **call)
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    if int(os.environ.get("RANK", 0)) == 0:
        image.save(args.out)
        print(f"{type(pipe).__name__}: unet split at {pipe.unet.plan.boundaries}; wrote {args.out}")


if __name__ == "__main__":
    main()
