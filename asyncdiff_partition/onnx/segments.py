"""ONNX segments: one extracted ONNX model per segment, run by onnxruntime behind split.Segment.

Example::

    model = load_onnx("unet.onnx")
    segments = split_onnx(model, plan.boundaries)            # list[split.Segment]
    eps = run_segments(segments, {"sample": x, "timestep": t, "encoder_hidden_states": c})
    denoiser = ReferenceSchedule(segments, warmup=1)          # the same schedule as for torch

Each segment is cut out of the imported model with ``onnx.utils.Extractor``: its inputs are the
model inputs it reads and the stale values it receives, its outputs the values later segments
read (and the model output in the last one), following Note [value kinds] exactly as
:func:`~asyncdiff_partition.fx.split.split_graph` does for a torch graph: stale ops are placed by
position, fresh ops are pulled into every segment that needs them. ``Segment.module`` is an
:class:`OnnxSegmentModule`: called with torch tensors, it runs its own ``InferenceSession`` and
returns torch tensors, so :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` and
:class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` (given an :class:`OnnxCapture`) run it as
they run a torch segment. A value of an ONNX node with several used outputs is a tuple.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.utils
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.plan import Plan, PlanError
from asyncdiff_partition.core.profile import fingerprint
from asyncdiff_partition.fx.capture import InputSpec
from asyncdiff_partition.fx.split import Segment, SplitError, _check_boundaries
from asyncdiff_partition.onnx.model import OnnxModel
from asyncdiff_partition.onnx.profiler import make_session

__all__ = ["OnnxCapture", "OnnxSegmentModule", "check_onnx_plan", "measure_onnx_plan", "split_onnx",
           "time_onnx_segments"]


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
            raise TypeError(f"this ONNX segment takes {len(self.args)} arguments, got {len(values)}")
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


def split_onnx(model: OnnxModel, boundaries: Sequence[int], *, device: str = "cpu", threads: int = 1,
               optimization: str = "all") -> list[Segment]:
    """Cut an imported ONNX model at ``boundaries`` into one ONNX model per segment.

    Args:
        model: from :func:`~asyncdiff_partition.onnx.model.load_onnx`.
        boundaries: ``N + 1`` strictly increasing positions in ``model.graph.order`` from 0 to n
            (a plan's ``boundaries``).
        device, threads, optimization: how each segment's session runs (see ``make_session``).

    Returns:
        The ``N`` segments in order, each a :class:`~asyncdiff_partition.fx.split.Segment` whose
        module is an :class:`OnnxSegmentModule`.

    Raises:
        SplitError: bad boundaries, or a segment that holds no stale op.
    """
    graph = model.graph
    order = graph.order
    bounds = _check_boundaries(boundaries, len(order))
    fresh, n_seg = graph.fresh, len(bounds) - 1
    kind = [graph.node(i)["kind"] for i in range(len(order))]
    preds = lambda name: graph.nx.predecessors(name)  # noqa: E731
    owner: dict[str, int] = {}
    used: list[set[str]] = [set() for _ in range(n_seg)]  # inputs, constants, fresh ops per segment
    received: list[set[str]] = [set() for _ in range(n_seg)]
    sent: list[set[str]] = [set() for _ in range(n_seg)]
    k = 0
    for i, name in enumerate(order):
        while i >= bounds[k + 1]:
            k += 1
        if kind[i] == "input" or fresh[i]:
            continue
        owner[name] = k
        stack = list(preds(name))
        while stack:
            value = stack.pop()
            if value in owner:
                if owner[value] != k:
                    received[k].add(value)
                    sent[owner[value]].add(value)
            elif value not in used[k]:
                used[k].add(value)
                stack.extend(preds(value))
    holding = {owner[n] for n in owner if graph.nx.nodes[n]["kind"] == "op"}
    empty = [k for k in range(n_seg) if k not in holding]
    if empty:
        k = empty[0]
        raise SplitError(f"segment {k} = positions [{bounds[k]}, {bounds[k + 1]}) of boundaries {bounds} holds no "
                         f"stale op of the ONNX model; move a boundary or use fewer segments")

    extractor = onnx.utils.Extractor(model.proto)
    position = graph.index
    segments = []
    for k in range(n_seg):
        inputs = [n for n in order if n in used[k] and graph.nx.nodes[n]["kind"] == "input"]
        receives = sorted(received[k], key=position.__getitem__)
        sends = sorted(sent[k], key=position.__getitem__)
        args = [[n] for n in inputs] + [model.value_tensors(n) for n in receives]
        outs = [model.value_tensors(n) for n in sends] + ([[model.output]] if k == n_seg - 1 else [])
        proto = extractor.extract_model([t for names in args for t in names], [t for names in outs for t in names])
        proto, outs = _no_passthrough(proto, outs)
        module = OnnxSegmentModule(
            proto.SerializeToString(), args, outs, device=device, threads=threads, optimization=optimization,
            dtypes={t: model.values[t][1] for names in args for t in names},
        )
        segments.append(Segment(
            index=k, module=module, inputs=inputs, receives=receives,  # type: ignore[arg-type]
            outputs=sends + ([OUTPUT] if k == n_seg - 1 else []),
            replicated=[n for n in order if n in used[k] and graph.nx.nodes[n]["kind"] == "op"],
        ))
    return segments


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


# --- the runtime's view: an ONNX model in the place of a CapturedModel --------------------------


class OnnxCapture:
    """An imported ONNX model dressed as a capture for the runtime and the sampling loop.

    :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` takes it in place of a
    ``CapturedModel``: it has ``inputs`` / ``latent`` (:class:`~asyncdiff_partition.fx.capture.InputSpec`)
    and :meth:`split_for_plan`, which hands the runtime ready-made segments instead of letting it
    split an fx graph. ``pipeline.denoise`` takes it too.
    """

    method = "onnx"

    def __init__(self, model: OnnxModel, *, device: str = "cpu", threads: int = 1, optimization: str = "all"):
        self.model = model
        self.device, self.threads, self.optimization = device, threads, optimization
        self.inputs = [InputSpec(s["name"], s["path"], tuple(s["shape"]), s["dtype"], bool(s["latent"]))
                       for s in model.inputs]

    @property
    def latent(self) -> InputSpec:
        return next(spec for spec in self.inputs if spec.is_latent)

    def split_for_plan(self, plan: Plan, world_size: int, stride: int) -> tuple[Any, list[Segment], dict[str, Any]]:
        """The runtime's hook: (op graph, segments, layout of every value a rank may receive).

        Raises:
            PlanError: see :func:`check_onnx_plan`.
        """
        check_onnx_plan(self.model, plan, world_size, stride)
        segments = split_onnx(self.model, plan.boundaries, device=self.device, threads=self.threads,
                              optimization=self.optimization)
        names = {n for s in segments for n in s.receives} | {OUTPUT}
        return self.model.graph, segments, {n: self.layout(n) for n in names}

    def layout(self, name: str) -> Any:
        """How the runtime allocates a received value (``runtime._Layout``) from ONNX shapes."""
        from asyncdiff_partition.runtime.denoiser import _Layout, _Slot

        tensors = [self.model.output] if name == OUTPUT else self.model.value_tensors(name)
        metas = [torch.empty(self.model.values[t][0], dtype=getattr(torch, self.model.values[t][1]), device="meta")
                 for t in tensors]
        leaves, spec = pytree.tree_flatten(metas[0] if len(metas) == 1 else tuple(metas))
        return _Layout(spec, tuple(_Slot(tuple(x.shape), x.dtype) for x in leaves))


def check_onnx_plan(model: OnnxModel, plan: Plan, world_size: int, stride: int | None = None) -> None:
    """Refuse a plan made for another model or shapes, or for another number of ranks.

    Raises:
        PlanError: world size is not N + stride - 1, or the plan's fingerprint is not this model's.
    """
    stride = plan.stride if stride is None else stride
    needed = plan.n_devices + stride - 1
    if world_size != needed:
        raise PlanError(
            f"the plan splits {plan.model} into N={plan.n_devices} segments; with stride {stride} that needs "
            f"{needed} ranks, but this run has {world_size}; start {needed} processes (--nproc {needed})"
        )
    mine = fingerprint(model.graph, model.inputs)
    if mine != plan.fingerprint:
        shapes = ", ".join(f"{s['name']} {tuple(s['shape'])} {s['dtype']}" for s in model.inputs)
        raise PlanError(
            f"plan was made for model fingerprint {plan.fingerprint} ({plan.model}) but {model.path} is {mine} "
            f"(inputs {shapes}); re-run 'asyncdiff-partition profile' and 'plan' for this model and shapes"
        )


def time_onnx_segments(model: OnnxModel, boundaries: Sequence[int], *, warmup: int = 1, repeats: int = 5,
                       threads: int = 1, optimization: str = "all", seed: int = 0) -> list[float]:
    """Median ms of each segment run alone on its real inputs (``plan --measure``)."""
    from asyncdiff_partition.fx.profiler import time_each_segment
    from asyncdiff_partition.onnx.profiler import example_feed

    segments = split_onnx(model, boundaries, threads=threads, optimization=optimization)
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
    check_onnx_plan(model, plan, plan.world_size)
    return time_onnx_segments(model, plan.boundaries, repeats=repeats, threads=profile.threads,
                              optimization=profile.versions.get("onnxruntime_optimization", "all"))
