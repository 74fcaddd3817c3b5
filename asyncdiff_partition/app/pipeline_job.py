"""The ``run --model PIPELINE_DIR --prompt TEXT`` command: a saved diffusers pipeline, parallelized on its ranks.

Example::

    result = run_pipeline(PipelineRun(model="sd-tiny", prompt="a red cube", devices=2, steps=8))
    result["images"], result["plan"]          # PNGs written by rank 0, the plan the ranks used

The folder's own pipeline class is loaded (``DiffusionPipeline.from_pretrained(dir,
local_files_only=True)``) with every component in the dtype it was saved in. Everything the ranks
would trip on is found here first (:func:`prepare_pipeline_run`): options the pipeline does not
take, a dry run of the real call (missing inputs, sizes, dtypes the device cannot run), the
capture, a plan of another model or shape, the world size. Then every rank (spawned by
:func:`~asyncdiff_partition.runtime.launch.launch`, or one rank of an outside ``torchrun``) loads the
pipeline, calls :func:`~asyncdiff_partition.pipelines.parallelize.parallelize` with the plan made
here and samples; rank 0 writes the pipeline's own output (images; video frames as PNGs and an
animated GIF).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.loading import load_pipeline

__all__ = ["PipelineJobError", "PipelineRun", "call_arguments", "prepare_pipeline_run", "profile_pipeline",
           "run_pipeline", "write_output"]



class PipelineJobError(AsyncDiffError, ValueError):
    """A pipeline folder or a ``--prompt`` run option that cannot work (found before any rank starts)."""


@dataclass(frozen=True)
class PipelineRun:
    """What ``asyncdiff-partition run --model DIR --prompt TEXT`` was asked for; pickled to every rank.

    ``devices`` defaults to the plan's (2 without a plan); ``steps``, ``guidance`` and ``size``
    to the pipeline's own defaults.
    """

    model: str
    prompt: str | None = None
    image: str | None = None
    devices: int | None = None
    plan: str | None = None
    size: int | None = None
    steps: int | None = None
    guidance: float | None = None
    warmup: int = 1
    stride: int = 1
    seed: int = 0
    out_dir: str = "run"
    reference: bool = False
    threads: int | None = None
    timeout_s: float = 300.0
    progress: bool = False


def call_arguments(pipe: Any, config: PipelineRun) -> dict[str, Any]:
    """The pipeline call the options ask for (``prompt``, ``image``, ``height``/``width``, ``guidance_scale``).

    Raises:
        PipelineJobError: an option the pipeline's ``__call__`` does not take.
    """
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    call: dict[str, Any] = {}

    def give(option: str, value: Any, *keys: str) -> None:
        if value is None:
            return
        missing = [k for k in keys if k not in params]
        if missing:
            raise PipelineJobError(f"{name} takes no {'/'.join(missing)}, so {option} cannot be used; drop {option} "
                                   f"(its call takes: {', '.join(p for p in params if p not in ('self', 'kwargs'))})")
        call.update(dict.fromkeys(keys, value))

    give("--prompt", config.prompt, "prompt")
    give("--image", config.image, "image")
    if config.image is not None:
        call["image"] = _open_image(config.image)
    give("--size", config.size, "height", "width")
    give("--guidance", config.guidance, "guidance_scale")
    return call


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise PipelineJobError(f"--image {path!r} does not exist; pass an image file (PNG, JPEG)")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise PipelineJobError(f"--image {path!r} is not an image PIL can read ({error}); pass a PNG or JPEG") from None


def prepare_pipeline_run(config: PipelineRun) -> tuple[PipelineRun, dict[str, Any]]:
    """Check the whole run in this process and fix its plan; returns the config the ranks get and facts.

    Loads the pipeline, dry-runs its real call, captures the denoiser, then takes ``config.plan``
    (checked against this capture) or makes one (profiled here, cached like ``parallelize``'s)
    and saves it to ``out_dir/plan.json``. The returned config names that plan and its devices.

    Raises:
        PipelineJobError, RecordingError, CaptureError, PlanError: what a rank would hit.
    """
    from asyncdiff_partition.core.plan import Plan
    from asyncdiff_partition.fx.capture import capture_model
    from asyncdiff_partition.pipelines.parallelize import choose_plan
    from asyncdiff_partition.pipelines.recording import record_denoiser_calls

    if config.stride not in (1, 2):
        raise PipelineJobError(f"stride must be 1 or 2, got {config.stride}")
    pipe = load_pipeline(config.model)
    call = call_arguments(pipe, config)
    recording = record_denoiser_calls(pipe, kwargs=call).denoisers[0]
    captured = capture_model(recording.module, (), recording.calls[0].call)
    devices = config.devices
    if config.plan is not None and devices is None:
        devices = Plan.load(config.plan).n_devices
    devices = devices or 2
    plan = choose_plan(captured, recording.module, devices, stride=config.stride, warmup=config.warmup, plan=config.plan,
                       cache_dir=None, steps=config.steps or 50)
    path = config.plan or str(plan.save(Path(config.out_dir) / "plan.json"))
    dtype = next(recording.module.parameters()).dtype
    facts = {"pipeline": type(pipe).__name__, "denoiser": recording.name, "dtype": str(dtype).removeprefix("torch."),
             "latent_shape": list(captured.latent.shape), "boundaries": plan.boundaries, "plan": path}
    return replace(config, devices=devices, plan=path), facts


def run_pipeline(config: PipelineRun) -> dict[str, Any]:
    """``asyncdiff-partition run --model DIR --prompt TEXT``: check here, sample on the ranks, write the output.

    Returns the written files (``images``, and ``frames`` / ``video`` for video pipelines), the
    plan path and the facts of :func:`prepare_pipeline_run`, and the sampling wall time.
    """
    from asyncdiff_partition.runtime.launch import is_launched_externally, launch

    launched = is_launched_externally()
    if launched and not config.reference:
        if config.plan is None:
            raise PipelineJobError("under an outside launcher every rank needs the same plan: make one first "
                                   "('asyncdiff-partition profile --model DIR --prompt TEXT' then 'plan') and pass --plan")
        result = pipeline_worker(config)
        return {**result, "plan": config.plan}
    ready, facts = prepare_pipeline_run(config)
    if config.reference:
        result = pipeline_worker(ready)
    else:
        world = (ready.devices or 2) + ready.stride - 1
        result = launch(pipeline_worker, (ready,), nproc=world, timeout_s=ready.timeout_s)[0]
    return {**result, **facts}


def pipeline_worker(config: PipelineRun) -> dict[str, Any]:
    """One rank (or the reference process): load, parallelize with the given plan, sample; rank 0 writes."""
    from asyncdiff_partition.pipelines.parallelize import parallelize

    torch.set_num_threads(config.threads or 1)
    pipe = load_pipeline(config.model)
    call = call_arguments(pipe, config)
    parallelize(pipe, devices=config.devices or 2, stride=config.stride, warmup=config.warmup, plan=config.plan,
                reference=config.reference, steps=config.steps or 50, timeout_s=config.timeout_s, **call)
    rank = 0
    if not config.reference:
        from asyncdiff_partition.runtime import comm

        rank = comm.rank()
    pipe.set_progress_bar_config(disable=not (config.progress and rank == 0))
    if config.steps is not None:
        call["num_inference_steps"] = config.steps
    begin = time.perf_counter()
    with torch.no_grad():
        output = pipe(**call, generator=torch.Generator().manual_seed(config.seed))
    wall_s = time.perf_counter() - begin
    written = write_output(output, config.out_dir) if rank == 0 else {}
    return {"rank": rank, "wall_s": wall_s, **written}


def write_output(output: Any, out_dir: str | Path) -> dict[str, list[str]]:
    """A pipeline's output as files: ``image-K.png``; video frames as ``video-K/frame-F.png`` and ``video-K.gif``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {"images": [], "frames": [], "videos": []}
    for k, image in enumerate(getattr(output, "images", None) or []):
        written["images"].append(_save(image, out / f"image-{k}.png"))
    frames = getattr(output, "frames", None)
    for k, video in enumerate(frames if frames is not None else []):
        folder = out / f"video-{k}"
        folder.mkdir(exist_ok=True)
        pictures = [_picture(frame) for frame in video]
        written["frames"] += [_save(p, folder / f"frame-{f:03d}.png") for f, p in enumerate(pictures)]
        gif = out / f"video-{k}.gif"
        tmp = gif.with_suffix(".tmp.gif")
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=125, loop=0)
        tmp.replace(gif)
        written["videos"].append(str(gif))
    return written


def _picture(frame: Any) -> Any:
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame
    import numpy as np

    array = np.asarray(frame.detach().float().cpu().permute(1, 2, 0) if isinstance(frame, torch.Tensor) else frame)
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))


def _save(picture: Any, path: Path) -> str:
    """Write atomically (temp file + rename)."""
    tmp = path.with_suffix(".tmp.png")
    _picture(picture).save(tmp, format="PNG")
    tmp.replace(path)
    return str(path)


def profile_pipeline(config: PipelineRun, *, device: str = "cpu", warmup: int = 1, repeats: int = 5,
                     command: str = "") -> Any:
    """``profile --model DIR --prompt TEXT``: the denoiser's recorded call, captured and profiled.

    The profile's fingerprint is the one ``run --model DIR --prompt TEXT --plan FILE`` checks
    (same size and guidance give the same shapes).
    """
    from asyncdiff_partition.fx.capture import capture_model
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.pipelines.recording import record_denoiser_calls

    pipe = load_pipeline(config.model, device=device)
    recording = record_denoiser_calls(pipe, kwargs=call_arguments(pipe, config)).denoisers[0]
    captured = capture_model(recording.module, (), recording.calls[0].call)
    return profile_model(captured, model_name=str(config.model), device=device, warmup=warmup, repeats=repeats,
                         command=command)
