"""Any diffusers text-to-image pipeline on N processes with one call: ``parallelize``.

    python examples/text_to_image.py PIPELINE_DIR "a red cube"               # 2 ranks started for you
    python examples/text_to_image.py PIPELINE_DIR "a red cube" --reference   # one process, the oracle
    torchrun --nproc_per_node 2 examples/text_to_image.py PIPELINE_DIR "a red cube"   # every rank runs it

PIPELINE_DIR is a local diffusers pipeline folder (``save_pretrained``): SD 1.5/2.1, SDXL, SD3,
Flux, PixArt, Wan, ... Nothing is downloaded. In a plain process the pipeline runs here and its
denoiser on the started ranks; under torchrun every rank runs this script and rank 0 saves the image.
"""

from __future__ import annotations

import argparse
import os

import torch
from diffusers import DiffusionPipeline

from asyncdiff_partition import parallelize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("prompt")
    parser.add_argument("--size", type=int, default=None, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 2)))
    parser.add_argument("--reference", action="store_true", help="single-process reference schedule")
    parser.add_argument("--out", default="image.png")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    call = {"prompt": args.prompt, "num_inference_steps": args.steps}
    if args.size:
        call.update(height=args.size, width=args.size)
    parallelize(pipe, devices=args.devices, reference=args.reference, steps=args.steps, **call)
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    if int(os.environ.get("RANK", 0)) == 0:
        image.save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
