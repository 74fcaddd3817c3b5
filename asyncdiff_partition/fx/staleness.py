"""Staleness calibration: how much every value that can cross a cut changes from one sampling step to the next.

Example::

    captured = capture_model(model, inputs.args, inputs.kwargs)
    graph = build_op_graph(captured)
    profile.staleness = calibrate_staleness(captured, graph, sample, steps=20, samples=8)
    profile.save("digits.profile.json")      # schema 2; make_plan(..., latency_slack=0.03) uses it

``sample(denoiser)`` runs one sequential sampling loop (e.g. :func:`~asyncdiff_partition.pipelines.wrap.denoise`)
with the given step denoiser; :class:`StalenessProbe` is that denoiser: it evaluates the unsplit
captured graph through :class:`StalenessRecorder` and returns ε unchanged, so the loop samples
exactly as the sequential model does.

Note [staleness proxy]
~~~~~~~~~~~~~~~~~~~~~~
In the asynchronous schedule (DESIGN.md) a value crossing a cut is read one step late: at step
s the consumer sees v(s - 1) instead of v(s). The proxy of what that costs is the relative
change r_v(s) = ||v(s) - v(s - 1)|| / ||v(s)|| (L2 over the whole batch), recorded for every
*stale* op value (Note [value kinds] in core/graph.py; inputs and fresh values never arrive late)
and averaged over the steps that read stale values in the schedule (s >= max(W, 1), each step
counted once; stride 2 reads values two steps old at every such step, which scales every
value's cost alike and leaves the ranking of cuts unchanged). The per-node means are what the
profile stores; :meth:`~asyncdiff_partition.core.profile.Profile.cut_staleness` sums them over
the values crossing each boundary. How well the proxy ranks cuts against the real error is
measured in ``benchmarks/fidelity/`` (rank correlation over a sweep of single cuts).

Note [cut error]
~~~~~~~~~~~~~~~~
The proxy above ranks cuts poorly (benchmarks/fidelity/README.md): what a stale cut costs is
decided downstream, by where the current step's *fresh* inputs (the latent at ``conv_in``, the
time embedding added in every resnet, the text at every cross-attention) meet stale features,
and by how the errors of the steps add up along the trajectory (a teacher-forced one-step ε
error ranked cuts no better). But between two consecutive *injection* nodes (stale ops with
a fresh or input predecessor) every boundary gives exactly the same samples: the ops between
them compute the previous step's values again from the previous step's values. So a model
has only a few distinct single cuts (one per injection node, ~40 in an SD-layout UNet), and
``cut_error`` measures each of them directly: the relative L2 between the samples of the
asynchronous schedule at N = 2 cut right before that injection node and the sequential
samples, on a small calibration batch (evaluation/evaluate.py, ``FidelityBench.calibrate``).
:func:`injection_boundaries` lists the boundaries to measure; :func:`spread_to_boundaries`
gives every boundary its run's value. A split's cost is the sum over its cuts (an
approximation for N > 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.graph import OpGraph
from asyncdiff_partition.fx.capture import CapturedModel

__all__ = ["META_KEY", "StalenessProbe", "StalenessRecorder", "calibrate_staleness", "injection_boundaries",
           "spread_to_boundaries", "transfer_staleness"]

META_KEY = "asyncdiff_staleness"  # node.meta[META_KEY] = {"relative": [r_v(s)], "cut_error": [e_r(s)]}
METRIC = ("per_node: relative L2 change of the value between consecutive sampling steps, mean over steps "
          "s >= max(W, 1); cut_error: relative L2 of the samples of a single cut (N=2) against the sequential ones")


class StalenessRecorder(torch.fx.Interpreter):
    """Runs the graph and appends, for every watched node, r_v(s) of Note [staleness proxy] to its meta.

    Args:
        gm: the captured graph module.
        watched: names of the nodes whose values can cross a cut (stale ops).
    """

    def __init__(self, gm: torch.fx.GraphModule, watched: set[str]):
        super().__init__(gm)
        self.watched = watched
        self.previous: dict[str, list[Tensor]] = {}
        self.record = True
        for node in gm.graph.nodes:
            if node.name in watched:
                node.meta[META_KEY] = {"relative": []}

    def new_run(self) -> None:
        """Forget the previous step (a new sampling run starts); the recorded changes stay."""
        self.previous.clear()

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if node.name in self.watched:
            current = [t.detach().clone() for t in _tensors(result)]
            before = self.previous.get(node.name)
            if self.record and before is not None and [t.shape for t in before] == [t.shape for t in current]:
                node.meta[META_KEY]["relative"].append(_relative(before, current))
            self.previous[node.name] = current
        return result


class StalenessProbe:
    """A step denoiser (reset + call) that samples with the unsplit graph while recording staleness.

    Steps before ``warmup`` (at least the first) are run but not recorded: no stale value is
    read there (Note [staleness proxy]).
    """

    def __init__(self, captured: CapturedModel, graph: OpGraph, *, warmup: int = 1):
        watched = {name for i, name in enumerate(graph.order)
                   if graph.node(i)["kind"] == "op" and not graph.node(i)["fresh"]}
        self.recorder = StalenessRecorder(captured.graph_module, watched)
        self.names = [spec.name for spec in captured.inputs]
        self.warmup, self.step, self.recorded = max(warmup, 1), 0, 0

    def reset(self, timesteps: Sequence[Any]) -> None:
        self.recorder.new_run()
        self.step = 0

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.recorder.record = self.step >= self.warmup
        self.recorded += self.recorder.record
        self.step += 1
        with torch.no_grad():
            return self.recorder.run(*[inputs[name] for name in self.names])

    def per_node(self, graph: OpGraph) -> list[float]:
        """Mean recorded change r_v of every node in graph order (0.0 for nodes never recorded)."""
        module = self.recorder.module
        assert isinstance(module, torch.fx.GraphModule)
        nodes = {node.name: node for node in module.graph.nodes}
        return [_mean(nodes[name].meta.get(META_KEY, {}).get("relative", [])) if name in nodes else 0.0
                for name in graph.order]


def injection_boundaries(graph: OpGraph) -> list[int]:
    """The boundaries of Note [cut error]: right before every injection node, and before the last node.

    Every boundary b in 1..n-1 samples like the first of these at or after it.
    """
    kinds = [graph.node(i)["kind"] for i in range(len(graph))]
    fresh = graph.fresh
    source = [kinds[i] == "input" or (kinds[i] == "op" and fresh[i]) for i in range(len(graph))]
    found = {i for i in range(1, len(graph)) if kinds[i] == "op" and not fresh[i]
             and any(source[p] for p in graph.preds(i))}
    return sorted(found | {len(graph) - 1})


def spread_to_boundaries(graph: OpGraph, measured: Mapping[int, float]) -> list[float]:
    """Per boundary 0..n, the value measured at the first injection boundary at or after it (0 at 0 and n).

    Raises:
        ValueError: ``measured`` lacks one of :func:`injection_boundaries`.
    """
    points = injection_boundaries(graph)
    missing = [b for b in points if b not in measured]
    if missing:
        raise ConfigError(f"cut errors missing at injection boundaries {missing[:5]}; measure every one of "
                         f"injection_boundaries(graph)")
    out, j = [0.0] * (len(graph) + 1), 0
    for b in range(1, len(graph)):
        while points[j] < b:
            j += 1
        out[b] = float(measured[points[j]])
    return out


def transfer_staleness(staleness: Mapping[str, Any], source: OpGraph, target: OpGraph) -> dict[str, Any]:
    """A calibration made on ``source`` (e.g. a small batch) for ``target``, the same model captured at other shapes.

    Captures of one model can differ by a node or two between batch sizes (a ``contiguous``
    more); values are matched by node name, and a boundary takes the value of the boundary
    before the first matched node at or after it.

    Raises:
        ValueError: more than 5 % (and more than 2) of the target's nodes are not in the source (another model).
    """
    index = {name: i for i, name in enumerate(source.order)}
    shared = sum(name in index for name in target.order)
    if len(target) - shared > max(2, 0.05 * len(target)):
        raise ConfigError(f"the calibration graph shares only {shared} of this graph's {len(target)} nodes: it was made "
                         f"for another model; calibrate this one")
    out = dict(staleness)
    out["per_node"] = [staleness["per_node"][index[name]] if name in index else 0.0 for name in target.order]
    if staleness.get("cut_error") is not None:
        cut, after = [0.0] * (len(target) + 1), 0.0
        for b in range(len(target) - 1, 0, -1):
            name = target.order[b]
            after = staleness["cut_error"][index[name]] if name in index else after
            cut[b] = after
        out["cut_error"] = cut
    return out


def calibrate_staleness(
    captured: CapturedModel,
    graph: OpGraph,
    sample: Callable[[StalenessProbe], Any],
    *,
    warmup: int = 1,
    runs: int = 1,
    **meta: Any,
) -> dict[str, Any]:
    """Run ``runs`` sequential sampling loops through a :class:`StalenessProbe`; the profile's ``staleness`` field.

    Args:
        captured: the captured model the profile was made from (same shapes).
        graph: its op graph (the profile's node order).
        sample: runs one sampling loop with the denoiser it is given (it calls ``reset``).
        warmup: W of the schedule the cuts are for; steps before it are not counted.
        runs: sampling loops to average over (each with ``sample``'s own seeds).
        meta: recorded beside the numbers (``steps``, ``samples``, ``guidance``, ``command``).

    Returns:
        ``{"per_node": [...], "metric": ..., "warmup": W, "runs": runs, **meta}``; the caller
        may add ``cut_error`` (Note [cut error]).

    Raises:
        ValueError: ``runs`` < 1, or a loop of fewer than two steps (nothing to compare).
    """
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    probe = StalenessProbe(captured, graph, warmup=warmup)
    for _ in range(runs):
        sample(probe)
    if probe.recorded < 1:
        raise ConfigError(f"staleness needs a sampling loop of more than max(W, 1) = {max(warmup, 1)} steps, got "
                         f"{probe.step}; raise --steps")
    return {"per_node": probe.per_node(graph), "metric": METRIC, "warmup": warmup, "runs": runs, **meta}


def _relative(values: list[Tensor], reference: list[Tensor]) -> float:
    """||values - reference|| / ||reference|| over all the tensors together (0.0 for a zero reference)."""
    change = math.sqrt(sum(float((a.double() - b.double()).square().sum()) for a, b in zip(values, reference)))
    size = math.sqrt(sum(float(b.double().square().sum()) for b in reference))
    return change / size if size > 0 else 0.0


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _tensors(value: Any) -> list[Tensor]:
    """The floating-point tensors in a node's value (a tensor, or a tuple/list of them)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []
