"""Op graph: fresh flags, cut analysis, and cut bytes that equal what a real split passes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_captured
from torch.fx.passes.split_module import split_module

from asyncdiff_partition.core.graph import GraphError, OpGraph
from asyncdiff_partition.core.placement import PlacementError, segment_inputs, segment_of
from asyncdiff_partition.fx.opgraph import build_op_graph, value_bytes


def _node(name, kind="op", out_bytes=10, param_bytes=0, latent=False, module=""):
    return {"name": name, "kind": kind, "op": kind, "target": name, "module": module,
            "out_bytes": out_bytes, "param_bytes": param_bytes, "latent": latent}


@pytest.fixture
def small():
    #  x(latent) ─ a ─ b ─ c ─ out        t(input) ─ emb ─┐ (fresh, consumed by b and c)
    #               └──────────┘ (skip a → c)   w(constant) ┘ consumed by emb
    nodes = [
        _node("x", "input", 100, latent=True), _node("t", "input", 4), _node("w", "constant", 40),
        _node("emb", out_bytes=8), _node("a", out_bytes=100), _node("b", out_bytes=50),
        _node("c", out_bytes=100), _node("out", "output", 100),
    ]
    edges = [("t", "emb"), ("w", "emb"), ("x", "a"), ("a", "b"), ("emb", "b"), ("b", "c"),
             ("a", "c"), ("emb", "c"), ("c", "out")]
    return OpGraph.from_nodes(nodes, edges)


def test_fresh_flags_follow_the_definition(small):
    fresh = dict(zip(small.order, small.fresh))
    assert fresh == {"x": False, "t": True, "w": True, "emb": True, "a": False, "b": False,
                     "c": False, "out": False}


def test_cut_table_matches_brute_force_crossings(small):
    table = small.cut_table()
    for b in range(len(small) + 1):
        crossing = small.crossing(b)
        assert table.stale_bytes[b] == crossing.stale_bytes
        assert table.stale_count[b] == len(crossing.stale)
        assert table.fresh_bytes[b] == crossing.fresh_bytes
    # before b: a and the skip a→c both cross; inputs and constants never do
    assert small.crossing(small.index["b"]).stale == ("a",)
    assert small.crossing(small.index["c"]).stale == ("a", "b")
    assert small.crossing(small.index["c"]).fresh == ("emb",)


def test_segment_inputs_count_only_what_each_segment_consumes(small):
    i = small.index
    received = segment_inputs(small, [0, i["b"], i["c"], len(small)])
    assert received == [{}, {"a": 100}, {"a": 100, "b": 50}]


def test_round_trip_through_dict(small):
    again = OpGraph.from_dict(small.to_dict())
    assert again.to_json() == small.to_json()
    assert again.fresh == small.fresh


def test_invalid_graphs_are_rejected():
    with pytest.raises(GraphError, match="against the topological order"):
        OpGraph.from_nodes([_node("a"), _node("b")], [("b", "a")])
    with pytest.raises(GraphError, match="kind 'weird'"):
        OpGraph.from_nodes([_node("a", "weird")], [])
    with pytest.raises(GraphError, match="duplicate"):
        OpGraph.from_nodes([_node("a"), _node("a")], [])
    with pytest.raises(GraphError, match="lacks fields"):
        OpGraph.from_nodes([{"name": "a"}], [])
    with pytest.raises(PlacementError, match="strictly increasing"):
        segment_of(OpGraph.from_nodes([_node("a"), _node("b")], []), [0, 0, 2])


def test_unet_graph_has_fresh_time_embedding_and_all_parameters(unet_captured):
    graph = build_op_graph(unet_captured)
    model_params = value_bytes(list(unet_captured.graph_module.parameters()) + list(unet_captured.graph_module.buffers()))
    assert graph.param_bytes == model_params
    fresh_modules = {graph.node(n)["module"] for n, f in zip(graph.order, graph.fresh) if f and graph.node(n)["kind"] == "op"}
    assert "time_embedding.linear_1" in fresh_modules
    # cross-attention key/value projections of the text are fresh too: recomputed, never sent
    assert any(m.endswith("attn2.to_k") for m in fresh_modules)
    assert not any(m.startswith("conv_in") for m in fresh_modules)


def _measured_crossing_bytes(gm: torch.fx.GraphModule, inputs, boundary: int) -> int:
    """Split the graph in two at ``boundary`` and sum what submod_0 really hands to submod_1."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    split = split_module(gm, None, lambda node: int(position[node] >= boundary), keep_original_order=True)
    env: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            env[node.name] = result = super().run_node(node)
            return result

    with torch.no_grad():
        Recorder(split).run(*inputs)
    producers = {n.name for n in split.graph.nodes if n.op == "call_module" and n.target == "submod_0"}
    producers |= {n.name for n in split.graph.nodes
                  if n.op == "call_function" and n.args and getattr(n.args[0], "name", None) in producers}
    consumer = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == "submod_1")
    return sum(value_bytes(env[a.name]) for a in consumer.all_input_nodes if a.name in producers)


@pytest.mark.parametrize("name", ["tiny-unet2d-condition", "tiny-dit"])
def test_predicted_cut_bytes_equal_bytes_passed_between_split_modules(name):
    captured = tiny_captured(name)
    graph = build_op_graph(captured)
    table = graph.cut_table()
    ops = [i for i, n in enumerate(graph.order) if graph.node(n)["kind"] == "op"]
    cheapest = graph.cheapest_cuts(2)[0].boundary
    for boundary in sorted({cheapest, *(ops[len(ops) * k // 4] for k in (1, 2, 3))}):
        predicted = table.stale_bytes[boundary] + table.fresh_bytes[boundary]
        measured = _measured_crossing_bytes(captured.graph_module, captured.example, boundary)
        assert predicted == measured, f"boundary {boundary}"
        assert predicted > 0
