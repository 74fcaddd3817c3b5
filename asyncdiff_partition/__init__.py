"""asyncdiff-partition: run any diffusion model's denoiser across several devices at once.

AsyncDiff (arXiv 2406.06911) cuts the noise-prediction network into N consecutive segments,
one per device, and lets each segment use its upstream segment's output from the previous
denoising step, so all segments compute at the same time. This package makes that general,
one module per stage:

    capture    (capture.py)    any model -> one flat, verified torch.fx graph
    graph      (graph.py)      framework-agnostic op graph, fresh values, cut analysis
    profile    (profile.py)    per-node cost on the target device
    partition  (partition.py)  exact min-max split into N contiguous segments
    plan       (plan.py)       the saved result
    split      (split.py)      one fx.GraphModule per segment
    schedule   (schedule.py)   the asynchronous schedule, and its single-process reference
    run        (runtime.py)    the schedule on N ranks (comm.py talks to torch.distributed,
                               launch.py starts the ranks, shipping.py sends each its weights)
    pipeline   (pipeline.py)   diffusers pipelines and custom loops driving it (offline
                               pipelines: offline_pipelines.py; the run command: runner.py)
    onnx       (onnx_*.py)     .onnx models through the same graph, plan and runtime
    evaluate   (evaluate.py)   fidelity of asynchronous vs sequential samples (metrics.py)

Example::

    from asyncdiff_partition import capture_model, build_op_graph
    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    graph = build_op_graph(captured)
    graph.cheapest_cuts(3)
"""

from .api import capture_spec, inspect_model, load_denoiser
from .capture import CapturedModel, CaptureError, InputSpec, capture_model
from .class_pipeline import ClassGuidedPipeline
from .digits import load_digits_model
from .fx_adapter import build_op_graph
from .graph import Crossing, CutTable, GraphError, OpGraph
from .evaluate import EvalResult, evaluate
from .files import FileFormatError
from .metrics import frechet_distance, psnr, ssim
from .partition import Partition, PartitionError, PartitionProblem, balance_segments, evaluate_boundaries
from .plan import Plan, PlanError, SegmentPlan, format_plan, ideal_speedup, make_plan
from .profile import Profile, ProfileError, profile_model
from .offline_pipelines import build_pipeline
from .pipeline import ScheduledDenoiser, denoise, unwrap_pipeline, wrap_pipeline
from .runner import run_plan
from .report import summarise, write_report, write_trace
from .launch import LaunchError, is_launched_externally, launch
from .runtime import AsyncDenoiser, check_plan
from .schedule import ReferenceSchedule, ScheduleError, StepDenoiser, make_schedule
from .split import Segment, SplitError, run_segments, split_graph
from .summary import ModelSummary, format_summary, summarize
from .zoo import DEFAULT_MODEL, ModelInputs, UnknownModelError, build_model, example_inputs, list_models, load_model

__all__ = [
    "AsyncDenoiser",
    "LaunchError",
    "ReferenceSchedule",
    "ScheduleError",
    "ScheduledDenoiser",
    "StepDenoiser",
    "build_pipeline",
    "check_plan",
    "denoise",
    "is_launched_externally",
    "launch",
    "make_schedule",
    "run_plan",
    "summarise",
    "unwrap_pipeline",
    "wrap_pipeline",
    "write_report",
    "write_trace",
    "DEFAULT_MODEL",
    "FileFormatError",
    "Partition",
    "PartitionError",
    "PartitionProblem",
    "Plan",
    "PlanError",
    "Profile",
    "ProfileError",
    "Segment",
    "SegmentPlan",
    "SplitError",
    "balance_segments",
    "evaluate_boundaries",
    "format_plan",
    "ideal_speedup",
    "make_plan",
    "profile_model",
    "run_segments",
    "split_graph",
    "CaptureError",
    "CapturedModel",
    "Crossing",
    "CutTable",
    "GraphError",
    "InputSpec",
    "ModelInputs",
    "ModelSummary",
    "OpGraph",
    "UnknownModelError",
    "build_model",
    "build_op_graph",
    "capture_model",
    "capture_spec",
    "example_inputs",
    "format_summary",
    "inspect_model",
    "list_models",
    "load_denoiser",
    "load_model",
    "summarize",
    "ClassGuidedPipeline",
    "load_digits_model",
    "EvalResult",
    "evaluate",
    "frechet_distance",
    "psnr",
    "ssim",
]
