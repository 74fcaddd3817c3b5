"""Split: segments run in order equal the unsplit graph, and each holds only its own weights."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_captured

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import PlacementError, place, segment_inputs, segment_of
from asyncdiff_partition.fx.capture import MODULE_KEY, capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import SplitError, run_segments, split_graph

MODELS = ["tiny-unet2d-condition", "tiny-dit"]


@functools.cache
def _setup(name):
    """(captured, op graph, positions of the stale ops) of a tiny zoo model."""
    captured = tiny_captured(name)
    graph = build_op_graph(captured)
    fresh = graph.fresh
    stale = [i for i, n in enumerate(graph.order) if graph.node(n)["kind"] == "op" and not fresh[i]]
    return captured, graph, stale


@functools.cache
def _split(name, boundaries):
    captured, graph, _ = _setup(name)
    return split_graph(captured, place(graph, list(boundaries)))


def _boundary_sets(graph, stale):
    """N = 2, 3, 4, with cuts right after the first stale op, before the output, and inside."""
    n = len(graph)
    first, last = stale[0] + 1, n - 1  # the output node is at n - 1
    q = [stale[len(stale) * k // 4] for k in (1, 2, 3)]
    return [
        (0, first, n),
        (0, last, n),
        (0, q[1], n),
        (0, first, q[1], n),
        (0, q[0], q[2], n),
        (0, q[0], q[1], q[2], n),
        (0, first, q[1], last, n),
    ]


def _feed(captured):
    return {spec.name: t for spec, t in zip(captured.inputs, captured.example)}


def _resident(module):
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def _get(module, target):
    return functools.reduce(getattr, target.split("."), module)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", MODELS)
def test_segments_in_order_reproduce_the_unsplit_graph_exactly(name):
    captured, graph, stale = _setup(name)
    # a second input set too: the segments must not have baked in the example values
    generator = torch.Generator().manual_seed(1)
    other = [torch.randn(t.shape, generator=generator) if t.is_floating_point() else t for t in captured.example]
    with torch.no_grad():
        expected = [captured.graph_module(*captured.example), captured.graph_module(*other)]
        for boundaries in _boundary_sets(graph, stale):
            segments = _split(name, boundaries)
            assert len(segments) == len(boundaries) - 1
            assert [s.outputs[-1:] for s in segments][-1] == [OUTPUT]
            for inputs, want in zip((captured.example, other), expected):
                feed = {spec.name: t for spec, t in zip(captured.inputs, inputs)}
                torch.testing.assert_close(run_segments(segments, feed), want, atol=0, rtol=0, msg=str(boundaries))


@pytest.mark.parametrize("name", MODELS)
def test_each_segment_holds_exactly_the_weights_its_nodes_use(name):
    captured, graph, stale = _setup(name)
    gm = captured.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    every = _resident(gm)
    for boundaries in _boundary_sets(graph, stale):
        segments = _split(name, boundaries)
        owner = segment_of(graph, boundaries)
        fresh = graph.fresh
        union: set[int] = set()
        for seg in segments:
            # computed by the segment, worked out from the original graph: its stale ops by
            # position plus the fresh ops it recomputes
            own = [n for i, n in enumerate(graph.order) if owner[i] == seg.index and not fresh[i]]
            targets = {a.target for n in own + seg.replicated for a in nodes[n].all_input_nodes if a.op == "get_attr"}
            needed = {id(_get(gm, t)): t for t in targets}
            resident = _resident(seg.module)
            assert set(resident) == set(needed), f"segment {seg.index} of {boundaries}"
            assert _nbytes(resident.values()) == _nbytes(every[i] for i in needed)
            assert all(_get(seg.module, t) is _get(gm, t) for t in targets)  # shared, not copied
            union |= set(resident)
        assert union == set(every)


def test_fresh_time_embedding_weights_live_in_every_segment_that_recomputes_them():
    captured, graph, stale = _setup("tiny-unet2d-condition")
    weight = captured.graph_module.get_parameter("time_embedding.linear_1.weight")
    boundaries = (0, stale[len(stale) // 4], stale[len(stale) // 2], stale[3 * len(stale) // 4], len(graph))
    segments = _split("tiny-unet2d-condition", boundaries)
    original = {n.name: n.meta for n in captured.graph_module.graph.nodes}
    for seg in segments:  # every segment holds resnets, and every resnet adds the time embedding
        modules = {seg_node.meta[MODULE_KEY] for seg_node in seg.module.graph.nodes if seg_node.name in seg.replicated}
        assert "time_embedding.linear_1" in modules
        assert any(p is weight for p in seg.module.parameters())
        # module paths survive the split
        for seg_node in seg.module.graph.nodes:
            if seg_node.op not in ("placeholder", "output"):
                assert seg_node.meta[MODULE_KEY] == original[seg_node.name][MODULE_KEY]


@pytest.mark.parametrize("name", MODELS)
def test_receives_and_sends_agree_with_segment_inputs_and_fresh_values_are_never_sent(name):
    captured, graph, stale = _setup(name)
    for boundaries in _boundary_sets(graph, stale):
        segments = _split(name, boundaries)
        owner = segment_of(graph, boundaries)
        expected = segment_inputs(graph, boundaries)
        for seg in segments:
            assert set(seg.receives) == set(expected[seg.index])
            assert not any(graph.node(r)["fresh"] for r in seg.receives)
            assert all(graph.node(r)["fresh"] and graph.node(r)["kind"] == "op" for r in seg.replicated)
            assert seg.inputs == [s.name for s in captured.inputs if s.name in seg.inputs]
            # sent once by its producer: exactly the values some later segment receives
            sends = [o for o in seg.outputs if o != OUTPUT]
            later = [r for other in segments[seg.index + 1:] for r in other.receives]
            wanted = {r for r in later if owner[graph.index[r]] == seg.index}
            assert sorted(sends, key=graph.index.get) == sends and set(sends) == wanted
            assert (OUTPUT in seg.outputs) == (seg is segments[-1])
        if boundaries[-2] == len(graph) - 1:  # the last segment only hands on the model output
            assert len(segments[-1].receives) == 1 and not segments[-1].replicated


class _Toy(torch.nn.Module):
    """x ─ a ─ b ─ c ─ out, a skip a → out, and a fresh embedding of t used by b and c."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(1, 8)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, t):
        e = self.emb(t)
        h = self.a(x)
        g = self.b(h + e)
        return self.c(g + e) + h


def test_call_module_graph_replicates_fresh_submodule_and_sends_the_skip_once():
    torch.manual_seed(0)
    model = _Toy().eval()
    x, t = torch.randn(2, 8), torch.randn(2, 1)
    captured = capture_model(model, (x, t), methods=["fx"])
    graph = build_op_graph(captured)
    # x, t, emb, a, add, b, add_1, c, add_2, output:  [a] | [add, b] | [add_1, c, add_2]
    boundaries = [0, graph.index["add"], graph.index["add_1"], len(graph)]
    segments = split_graph(captured, place(graph, boundaries))
    with torch.no_grad():
        torch.testing.assert_close(run_segments(segments, {"x": x, "t": t}), model(x, t), atol=0, rtol=0)
    assert [s.inputs for s in segments] == [["x"], ["t"], ["t"]]
    assert [s.receives for s in segments] == [[], ["a"], ["a", "b"]]
    assert [s.outputs for s in segments] == [["a"], ["b"], [OUTPUT]]
    assert [s.replicated for s in segments] == [[], ["emb"], ["emb"]]
    assert [sorted(dict(s.module.named_children())) for s in segments] == [["a"], ["b", "emb"], ["c", "emb"]]
    assert segments[1].module.emb is model.emb and segments[2].module.emb is model.emb


def test_bad_boundaries_raise_placement_error_and_a_foreign_placement_a_split_error():
    captured, graph, stale = _setup("tiny-dit")
    n = len(graph)
    cases = {
        "strictly increasing": [0, stale[5], stale[5], n],
        "run from 0 to n": [0, stale[5], n + 1],
        "run from 0 to n=": [1, n],
        "integers": [0, 10.0, n],
    }
    for message, boundaries in cases.items():
        with pytest.raises(PlacementError, match=message):
            place(graph, boundaries)
    # segment 0 before the first stale op: only constants, inputs (the latent too) and fresh ops
    with pytest.raises(PlacementError, match="segment 0 .* holds no stale op"):
        place(graph, [0, stale[0], n])
    # a middle segment of one fresh op
    fresh = graph.fresh
    fresh_op = next(i for i in range(stale[0], n) if fresh[i] and graph.node(i)["kind"] == "op")
    with pytest.raises(PlacementError, match="segment 1 .* holds no stale op"):
        place(graph, [0, fresh_op, fresh_op + 1, n])
    other = build_op_graph(tiny_captured("tiny-unet2d-condition"))
    with pytest.raises(SplitError, match="does not match"):
        split_graph(captured, place(other, [0, len(other)]))
    assert isinstance(SplitError("x"), ValueError) and isinstance(PlacementError("x"), ValueError)
