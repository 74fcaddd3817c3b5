"""ONNX segments: one extracted ONNX model per segment, run by onnxruntime behind split.Segment.

Example::

    model = load_onnx("unet.onnx")
    segments = split_onnx(model, place(model.graph, plan.boundaries))    # list[split.Segment]
    eps = run_segments(segments, {"sample": x, "timestep": t, "encoder_hidden_states": c})
    denoiser = ReferenceSchedule(segments, warmup=1)          # the same schedule as for torch
    ready = ready_onnx_segments(model, plan, world_size=2)    # what the ranks of a run get

Each segment is cut out of the imported model with ``onnx.utils.Extractor``: its inputs are the
model inputs it reads and the stale values it receives, its outputs the values later segments
read (and the model output in the last one), as the placement
(:func:`~asyncdiff_partition.core.placement.place`) says, the same one the torch splitter reads.
``Segment.module`` is an :class:`OnnxSegmentModule`: called with torch tensors, it runs its own
``InferenceSession`` and returns torch tensors, so
:class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` and
:class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` (given a ready segment) run it as they
run a torch segment. A value of an ONNX node with several used outputs is a tuple.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.utils
import torch
from torch import Tensor

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.errors import UnsupportedError
from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import Placement, PlacementError, place
from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.core.profile import fingerprint
from asyncdiff_partition.core.validation import check_plan_graph
from asyncdiff_partition.fx.capture import InputSpec
from asyncdiff_partition.fx.layout import ReadySegment, ValueLayout
from asyncdiff_partition.fx.split import Segment
from asyncdiff_partition.onnx.model import OnnxModel
from asyncdiff_partition.onnx.profiler import make_session

__all__ = ["OnnxCapture", "OnnxSegmentModule", "check_onnx_plan", "measure_onnx_plan", "ready_onnx_segments",
           "split_onnx", "time_onnx_segments", "value_layout"]


class OnnxSegmentModule:
    """One segment's ONNX model behind a torch-style call: ``module(*tensors) -> tuple``.

    Arguments come in the order of ``Segment.inputs`` then ``Segment.receives``; an argument
    made of several ONNX tensors is a tuple of them. The session is created at the first call
    (so the module pickles as its model bytes) with the options of
    :func:`~asyncdiff_partition.onnx.profiler.make_session`.
    """

    def __init__(self, model: bytes, args: Sequence[Sequence[str]], outputs: Sequence[Sequence[str]], *,
                 dtypes: Mapping[str, str], device: str = "cpu", threads: int = 1, optimization: str = "all"):
        self.model = model
        self.args = [list(names) for names in args]
        self.outputs = [list(names) for names in outputs]
        self.dtypes = dict(dtypes)  # ONNX input tensor -> numpy dtype name
        self.device, self.threads, self.optimization = device, threads, optimization
        self._session: Any = None
        self._inputs: set[str] = set()

    def __call__(self, *values: Any) -> tuple[Any, ...]:
        if len(values) != len(self.args):
            raise UnsupportedError(f"this ONNX segment takes {len(self.args)} arguments, got {len(values)}")
        session, feed = self.session(), {}
        for names, value in zip(self.args, values):
            parts = value if len(names) > 1 else (value,)
            for name, part in zip(names, parts):
                if name not in self._inputs:
                    continue  # an input the model does not read (an exporter dropped it)
                array = part.detach().cpu().contiguous().numpy() if isinstance(part, Tensor) else np.asarray(part)
                feed[name] = array.astype(self.dtypes[name], copy=False)
        flat = iter(session.run([n for names in self.outputs for n in names], feed))
        out = []
        for names in self.outputs:
            tensors = tuple(torch.from_numpy(next(flat)) for _ in names)
            out.append(tensors[0] if len(names) == 1 else tensors)
        return tuple(out)

    def session(self) -> Any:
        if self._session is None:
            self._session = make_session(self.model, device=self.device, threads=self.threads,
                                         optimization=self.optimization)
            self._inputs = {value.name for value in self._session.get_inputs()}
        return self._session

    def to(self, device: Any) -> OnnxSegmentModule:
        """The runtime's ``segment.module.to(device)``: the session starts here, not in step 0.

        The session's provider was chosen at construction; onnxruntime places the tensors.
        """
        self.session()
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}


def split_onnx(model: OnnxModel, placement: Placement, *, device: str = "cpu", threads: int = 1,
               optimization: str = "all") -> list[Segment]:
    """Cut an imported ONNX model into one ONNX model per segment of ``placement``.

    Args:
        model: from :func:`~asyncdiff_partition.onnx.model.load_onnx`.
        placement: :func:`~asyncdiff_partition.core.placement.place` of ``model.graph``.
        device, threads, optimization: how each segment's session runs (see ``make_session``).

    Returns:
        The ``N`` segments in order, each a :class:`~asyncdiff_partition.fx.split.Segment` whose
        module is an :class:`OnnxSegmentModule`.

    Raises:
        PlacementError: the placement was made for another op graph.
    """
    if placement.n_nodes != len(model.graph):
        raise PlacementError(f"the placement was made for an op graph of {placement.n_nodes} nodes, but "
                             f"{model.path} has {len(model.graph)}; place this model's op graph")
    counters.count("splits")
    extractor = onnx.utils.Extractor(model.proto)
    segments = []
    for part in placement.segments:
        inputs, receives, sends = list(part.inputs), list(part.receives), list(part.sends)
        args = [[n] for n in inputs] + [model.value_tensors(n) for n in receives]
        outs = [model.value_tensors(n) for n in sends] + ([[model.output]] if part.yields_output else [])
        proto = extractor.extract_model([t for names in args for t in names], [t for names in outs for t in names])
        proto, outs = _no_passthrough(proto, outs)
        module = OnnxSegmentModule(
            proto.SerializeToString(), args, outs, device=device, threads=threads, optimization=optimization,
            dtypes={t: model.values[t][1] for names in args for t in names},
        )
        segments.append(Segment(
            index=part.index, module=module, inputs=inputs, receives=receives,  # type: ignore[arg-type]
            outputs=list(part.outputs), replicated=list(part.replicated),
        ))
    return segments


def ready_onnx_segments(model: OnnxModel, plan: Plan, *, world_size: int | None = None, stride: int | None = None,
                        device: str = "cpu", threads: int = 1, optimization: str = "all",
                        plan_path: str | None = None) -> list[ReadySegment]:
    """The ONNX backend's compile step: check ``plan`` against ``model``, place, split, add layouts.

    Raises:
        PlanError: see :func:`check_onnx_plan`.
    """
    check_onnx_plan(model, plan, world_size, stride)
    placement = place(model.graph, plan.boundaries)
    if plan_path is not None:  # a plan file is well-formed on load; here it must also fit this graph
        check_plan_graph(plan, model.graph, plan_path, placement=placement)
    segments = split_onnx(model, placement, device=device, threads=threads, optimization=optimization)
    return [ReadySegment(index=s.index, module=s.module, inputs=s.inputs, receives=s.receives, outputs=s.outputs,
                         layouts={v: value_layout(model, v) for v in (*s.receives, OUTPUT)},
                         fingerprint=plan.fingerprint, placement=placement, replicated=s.replicated)
            for s in segments]


def value_layout(model: OnnxModel, name: str) -> ValueLayout:
    """How a rank allocates a received value (or ε, ``OUTPUT``) from the model's static shapes."""
    tensors = [model.output] if name == OUTPUT else model.value_tensors(name)
    metas = [torch.empty(model.values[t][0], dtype=getattr(torch, model.values[t][1]), device="meta") for t in tensors]
    return ValueLayout.of(metas[0] if len(metas) == 1 else tuple(metas))


def _no_passthrough(proto: onnx.ModelProto, outs: list[list[str]]) -> tuple[onnx.ModelProto, list[list[str]]]:
    """An output that is also an input (the model output received whole) goes through an Identity."""
    inputs = {v.name for v in proto.graph.input}
    renamed: dict[str, str] = {}
    for value in proto.graph.output:
        if value.name in inputs:
            new = f"{value.name}__passthrough"
            proto.graph.node.append(onnx.helper.make_node("Identity", [value.name], [new]))
            renamed[value.name] = new
            value.name = new
    return proto, [[renamed.get(n, n) for n in names] for names in outs]


# --- the sampling loop's view: an ONNX model's inputs in the place of a CapturedModel -------------


@dataclass(frozen=True)
class OnnxCapture:
    """An ONNX model's input specs, as the sampling loop and the runtime read a capture's.

    ``pipelines.wrap.denoise`` and :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser`
    need only ``inputs`` / ``latent`` (:class:`~asyncdiff_partition.fx.capture.InputSpec`); it
    holds no model, so it ships to the ranks beside their segments for free.
    """

    inputs: tuple[InputSpec, ...]
    timestep: str = "timestep"  # the timestep input's name
    method: str = "onnx"

    @classmethod
    def of(cls, model: OnnxModel) -> OnnxCapture:
        return cls(tuple(InputSpec(s["name"], s["path"], tuple(s["shape"]), s["dtype"], bool(s["latent"]))
                         for s in model.inputs), model.timestep or "timestep")

    @property
    def latent(self) -> InputSpec:
        return next(spec for spec in self.inputs if spec.is_latent)


def check_onnx_plan(model: OnnxModel, plan: Plan, world_size: int | None = None, stride: int | None = None) -> None:
    """Refuse a plan made for another model or shapes, or for another number of ranks.

    Raises:
        PlanError: world size is not N + stride - 1, or the plan's fingerprint is not this model's.
    """
    if world_size is not None:
        plan.check_world_size(world_size, stride)
    plan.check_fingerprint(fingerprint(model.graph, model.inputs), specs=model.inputs, n_nodes=len(model.graph),
                           where=str(model.path))


def time_onnx_segments(model: OnnxModel, boundaries: Sequence[int], *, warmup: int = 1, repeats: int = 5,
                       threads: int = 1, optimization: str = "all", seed: int = 0) -> list[float]:
    """Median ms of each segment run alone on its real inputs (``plan --measure``)."""
    from asyncdiff_partition.fx.profiler import time_each_segment
    from asyncdiff_partition.onnx.profiler import example_feed

    segments = split_onnx(model, place(model.graph, boundaries), threads=threads, optimization=optimization)
    feed = {k: torch.from_numpy(v) for k, v in example_feed(model, seed).items()}
    return time_each_segment(segments, feed, warmup=warmup, repeats=repeats)


def measure_onnx_plan(profile: Any, plan: Plan, *, model_spec: str | None = None, repeats: int = 3) -> list[float]:
    """``plan --measure`` for an ONNX profile: each segment alone, at the profiled shapes and threads.

    Raises:
        PlanError: the model read now is not the profiled one.
    """
    from asyncdiff_partition.onnx.model import load_onnx

    model = load_onnx(model_spec or profile.model, input_shapes={s["name"]: s["shape"] for s in profile.inputs},
                      latent=next(s["name"] for s in profile.inputs if s["latent"]))
    check_onnx_plan(model, plan)
    return time_onnx_segments(model, plan.boundaries, repeats=repeats, threads=profile.threads,
                              optimization=profile.versions.get("onnxruntime_optimization", "all"))
