"""Placement: node -> segment computed once, checked against brute force and the partitioner's view."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff_partition.core.graph import OUTPUT, OpGraph
from asyncdiff_partition.core.partition import PartitionProblem, evaluate_boundaries
from asyncdiff_partition.core.placement import PlacementError, check_boundaries, place, segment_inputs, segment_of


def _node(name, kind="op", out_bytes=10, latent=False):
    return {"name": name, "kind": kind, "op": kind, "target": name, "module": "", "out_bytes": out_bytes,
            "param_bytes": 0, "latent": latent}


@pytest.fixture
def toy():
    """x (latent), t, w; emb = f(t, w) fresh; a = f(x); b = f(a, emb); c = f(a, b, emb); output = c."""
    nodes = [_node("x", "input", latent=True), _node("t", "input"), _node("w", "constant"), _node("emb"),
             _node("a", out_bytes=4), _node("b", out_bytes=8), _node("c"), _node(OUTPUT, "output")]
    edges = [("t", "emb"), ("w", "emb"), ("x", "a"), ("a", "b"), ("emb", "b"), ("a", "c"), ("b", "c"),
             ("emb", "c"), ("c", OUTPUT)]
    return OpGraph.from_nodes(nodes, edges)


def test_toy_placement(toy):
    p = place(toy, [0, 5, 6, 8])  # [x t w emb a] | [b] | [c output]
    s0, s1, s2 = p.segments
    assert (s0.placed, s1.placed, s2.placed) == (("a",), ("b",), ("c", OUTPUT))
    assert (s0.inputs, s1.inputs, s2.inputs) == (("x",), ("t",), ("t",))
    assert (s0.replicated, s1.replicated, s2.replicated) == ((), ("emb",), ("emb",))
    assert s1.constants == s2.constants == ("w",) and s0.constants == ()
    assert (s0.receives, s1.receives, s2.receives) == ((), ("a",), ("a", "b"))
    assert (s0.sends, s1.sends, s2.sends) == (("a",), ("b",), ())
    assert s2.outputs == (OUTPUT,) and not s0.yields_output
    assert p.owner["b"] == 1 and p.consumers("a") == (1, 2) and p.positions == {"a": 4, "b": 5}
    assert segment_inputs(toy, [0, 5, 6, 8]) == [{}, {"a": 4}, {"a": 4, "b": 8}]
    assert p.digest() == place(toy, [0, 5, 6, 8]).digest() != place(toy, [0, 6, 8]).digest()


def test_the_one_boundary_rule(toy):
    n = len(toy)
    for boundaries, message in [([0, 5, 5, n], "strictly increasing"), ([0, 5, n + 1], "run from 0 to n=8"),
                                ([1, n], "run from 0 to n=8"), ([0, 5.0, n], "integers"), ([0, True, n], "integers"),
                                ([n], "at least two")]:
        with pytest.raises(PlacementError, match=message):
            place(toy, boundaries)
    assert check_boundaries([0, 3, n], n) == [0, 3, n]
    with pytest.raises(PlacementError, match=r"segment 0 = positions \[0, 4\) .* holds no stale op"):
        place(toy, [0, 4, n])  # inputs, a constant and a fresh op only
    assert isinstance(PlacementError("x"), ValueError)


@st.composite
def graphs(draw):
    """Random op graphs: 1-3 inputs (the first the latent), some constants, ops, one output."""
    n_inputs = draw(st.integers(1, 3))
    n_consts = draw(st.integers(0, 2))
    n_ops = draw(st.integers(2, 14))
    nodes = [_node(f"in{i}", "input", latent=i == 0) for i in range(n_inputs)]
    nodes += [_node(f"k{i}", "constant") for i in range(n_consts)]
    edges = []
    for j in range(n_ops):
        earlier = [n["name"] for n in nodes]
        preds = draw(st.lists(st.sampled_from(earlier), min_size=1, max_size=3, unique=True))
        if j == 0:
            preds = sorted(set(preds) | {"in0"})  # something depends on the latent
        name = f"op{j}"
        nodes.append(_node(name, out_bytes=draw(st.integers(1, 100))))
        edges += [(p, name) for p in preds]
    ops = [n["name"] for n in nodes if n["kind"] == "op"]
    edges.append((draw(st.sampled_from(ops)), OUTPUT))
    nodes.append(_node(OUTPUT, "output"))
    graph = OpGraph.from_nodes(nodes, edges)
    stale = [i for i in range(len(graph)) if graph.node(i)["kind"] != "input" and not graph.node(i)["fresh"]]
    cuts = draw(st.lists(st.sampled_from(range(1, len(graph))), max_size=3, unique=True))
    return graph, [0, *sorted(cuts), len(graph)], stale


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_placement_agrees_with_brute_force_and_with_the_partitioner(case):
    graph, boundaries, stale = case
    n_seg = len(boundaries) - 1
    segment_at = segment_of(graph, boundaries)
    owned = {graph.order[i]: segment_at[i] for i in stale}
    if set(owned.values()) != set(range(n_seg)):
        with pytest.raises(PlacementError, match="holds no stale op"):
            place(graph, boundaries)
        return
    p = place(graph, boundaries)
    assert p.owner == owned
    g = graph.nx
    for k, s in enumerate(p.segments):
        mine = {v for v, seg in owned.items() if seg == k}
        # brute force: what k reads is every node with a path into k's own nodes through
        # nodes nobody owns (inputs, constants, fresh ops), and every owned predecessor
        free = g.subgraph([v for v in g if v not in owned] + list(mine))
        reach = {v for v in g if v not in owned and any(nx.has_path(free, v, m) for m in mine)}
        assert set(s.inputs) == {v for v in reach if g.nodes[v]["kind"] == "input"}
        assert set(s.constants) == {v for v in reach if g.nodes[v]["kind"] == "constant"}
        assert set(s.replicated) == {v for v in reach if g.nodes[v]["kind"] == "op"}
        # what the old edge walk of OpGraph.segment_inputs found
        receives = {u for u, v in g.edges if u in owned and v in mine and owned[u] != k}
        assert set(s.receives) == receives and list(s.receives) == sorted(receives, key=graph.index.get)
        sends = {u for u, v in g.edges if owned.get(u) == k and v in owned and owned[v] != k}
        assert set(s.sends) == sends
        assert s.yields_output == (k == n_seg - 1)
        assert set(s.placed) == mine
    # the partitioner charges each segment exactly the fresh ops the placement replicates
    kinds = [graph.node(i)["kind"] for i in range(len(graph))]
    problem = PartitionProblem(costs=[1.0] * len(graph), fresh=[f or k == "input" for f, k in zip(graph.fresh, kinds)],
                               preds=[graph.preds(i) for i in range(len(graph))],
                               stale_bytes=graph.cut_table().stale_bytes)
    partition = evaluate_boundaries(problem, boundaries)
    for k, s in enumerate(p.segments):
        charged = {graph.order[i] for i in partition.replicated[k] if kinds[i] == "op"}
        assert charged == set(s.replicated)
