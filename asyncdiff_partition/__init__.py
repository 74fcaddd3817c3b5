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
    run        (runtime.py)    the asynchronous schedule on N ranks

Example::

    from asyncdiff_partition import capture_model, build_op_graph
    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    graph = build_op_graph(captured)
    graph.cheapest_cuts(3)
"""

from .api import capture_spec, inspect_model, load_denoiser
from .capture import CapturedModel, CaptureError, InputSpec, capture_model
from .fx_adapter import build_op_graph
from .graph import Crossing, CutTable, GraphError, OpGraph
from .files import FileFormatError
from .partition import Partition, PartitionError, PartitionProblem, balance_segments, evaluate_boundaries
from .plan import Plan, PlanError, SegmentPlan, format_plan, ideal_speedup, make_plan
from .profile import Profile, ProfileError, profile_model
from .split import Segment, SplitError, run_segments, split_graph
from .summary import ModelSummary, format_summary, summarize
from .zoo import DEFAULT_MODEL, ModelInputs, UnknownModelError, build_model, example_inputs, list_models, load_model

__all__ = [
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
]
