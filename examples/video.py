"""A video pipeline (Stable Video Diffusion, AnimateDiff, ...) on N processes with one call.

    python examples/video.py PIPELINE_DIR --prompt "a red cube"                # text-to-video, 2 ranks
    python examples/video.py PIPELINE_DIR --image first.png                    # image-to-video
    python examples/video.py PIPELINE_DIR --prompt "a red cube" --reference    # one process

PIPELINE_DIR is a local diffusers video pipeline folder (``save_pretrained``). Rank 0 writes
every frame as a PNG and the clip as an animated GIF under --out.
"""

from __future__ import annotations

import argparse
import inspect
import os

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from asyncdiff_partition import parallelize
from asyncdiff_partition.app.pipeline_job import write_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("--prompt", default=None, help="text-to-video pipelines")
    parser.add_argument("--image", default=None, help="image-to-video pipelines: the first frame")
    parser.add_argument("--frames", type=int, default=None, help="number of frames (default: the pipeline's)")
    parser.add_argument("--size", type=int, default=None, help="frame height and width in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 2)))
    parser.add_argument("--reference", action="store_true", help="single-process reference schedule")
    parser.add_argument("--out", default="video")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    takes = inspect.signature(pipe.__call__).parameters
    call: dict = {"num_inference_steps": args.steps}
    if args.prompt is not None:
        call["prompt"] = args.prompt
    if args.image is not None:
        call["image"] = Image.open(args.image).convert("RGB")
    if args.frames:
        call["num_frames"] = args.frames
    if args.size:
        call.update(height=args.size, width=args.size)
    if "decode_chunk_size" in takes:  # SVD decodes frames in chunks; keep memory flat
        call["decode_chunk_size"] = 2
    parallelize(pipe, devices=args.devices, reference=args.reference, steps=args.steps, **call)
    output = pipe(**call, generator=torch.Generator().manual_seed(0))
    if int(os.environ.get("RANK", 0)) == 0:
        written = write_output(output, args.out)
        print(f"{type(pipe).__name__}: {len(written['frames'])} frames; wrote {', '.join(written['videos'])}")


if __name__ == "__main__":
    main()
