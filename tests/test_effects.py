"""In-place writes: a split keeps each write with the nodes that read its tensor afterwards, or refuses.

The pattern is LTX-Video's rope grid: a tensor is written through a view (``grid[:, 0].mul_(s)``),
nothing reads the write's own output, and later nodes read the written tensor under its first name.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from asyncdiff_partition.core.graph import GraphError, OpGraph
from asyncdiff_partition.core.placement import PlacementError, SideEffectError, place
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import SplitError, run_segments, split_graph, verify_segments


class _ScaledGrid(torch.nn.Module):
    """A fresh grid written in place (like LTX's rope), and a stale tensor written in place."""

    def __init__(self):
        super().__init__()
        self.proj_in, self.mix, self.block, self.proj_out = (
            torch.nn.Linear(4, 8), torch.nn.Linear(3, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))

    def forward(self, sample, cond):
        grid = (cond * 2.0).clone()
        grid[:, 0].mul_(3.0)  # fresh write through a view; its result is never read
        h = self.proj_in(sample)
        g = h.clone()
        g[:, :2].add_(self.mix(grid)[:, 2:4])  # stale write (depends on the latent) through a view
        h = self.block(torch.relu(g)) + self.mix(grid)  # both read the written tensors by their first names
        return self.proj_out(h)


@functools.cache
def _captured(method):
    torch.manual_seed(0)
    model = _ScaledGrid().eval()
    captured = capture_model(model, (torch.randn(2, 4), torch.randn(2, 3)), methods=[method])
    return model, captured, build_op_graph(captured)


def _feed(captured, tensors=None):
    return {spec.name: t.clone() for spec, t in zip(captured.inputs, tensors or captured.example)}


@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_split_of_an_in_place_model_is_exact_or_refused(method):
    model, captured, graph = _captured(method)
    observed = {w for name in graph.order for w in graph.observes(name)}
    assert len(graph.writes) == 2 and observed == set(graph.writes)  # both writes found, and who reads after them
    other = [torch.randn_like(t) for t in captured.example]
    with torch.no_grad():
        wanted = [model(*captured.example), model(*other)]
    n, outcomes = len(graph), {"exact": 0, "refused": 0}
    for cuts in itertools.chain(itertools.combinations(range(1, n), 1), itertools.combinations(range(1, n), 2)):
        try:
            segments = split_graph(captured, place(graph, [0, *cuts, n]))
        except SideEffectError as error:
            assert "writes in place" in str(error) and "move boundar" in str(error)
            outcomes["refused"] += 1
            continue
        except PlacementError as error:
            assert "holds no stale op" in str(error)
            continue
        with torch.no_grad():
            for inputs, want in zip((captured.example, other), wanted):
                torch.testing.assert_close(run_segments(segments, _feed(captured, inputs)), want, rtol=0, atol=0,
                                           msg=f"cuts {cuts}")
        verify_segments(captured, segments)
        outcomes["exact"] += 1
    # the fresh write goes wherever its readers go; the stale one is refused only when the
    # segment reading its tensor afterwards would get a copy taken before the write
    assert outcomes["exact"] > 20 and outcomes["refused"] > 0, outcomes


def test_a_cut_between_a_fresh_write_and_its_readers_replicates_the_write():
    _, captured, graph = _captured("export")
    fresh_write = next(w for w in graph.writes if graph.node(w)["fresh"])
    reader = max((n for n in graph.order if fresh_write in graph.observes(n)), key=graph.index.__getitem__)
    stale = [i for i, n in enumerate(graph.order) if graph.node(n)["kind"] == "op" and not graph.fresh[i]]
    cut = next(i for i in stale if i > graph.index[reader]) + 1
    placement = place(graph, [0, cut, len(graph)])
    later = placement.segments[1]
    assert fresh_write in later.replicated or fresh_write in placement.segments[0].replicated
    verify_segments(captured, split_graph(captured, placement))


def test_the_refusal_names_the_write_its_reader_their_modules_and_the_boundary():
    _, captured, graph = _captured("export")
    stale_write = next(w for w in graph.writes if not graph.node(w)["fresh"])
    (base,) = graph.writes[stale_write]
    # cut right after the view the write goes through: the write then lands on a received view,
    # while the reader gets the whole tensor on its own
    view = next(p for p in graph.nx.predecessors(stale_write) if base in graph.storage.get(p, ()) and p != base)
    cut = graph.index[view] + 1
    with pytest.raises(SideEffectError) as info:
        place(graph, [0, cut, len(graph)])
    text = str(info.value)
    assert f"node {stale_write!r}" in text and f"tensor of node {base!r}" in text
    assert "(module: the model itself)" in text and f"move boundary [{cut}]" in text
    assert isinstance(info.value, PlacementError) and isinstance(info.value, ValueError)


def test_a_segment_that_writes_a_received_tensor_writes_its_own_copy():
    _, captured, graph = _captured("export")
    stale_write = next(w for w in graph.writes if not graph.node(w)["fresh"])
    (base,) = graph.writes[stale_write]
    placement = place(graph, [0, graph.index[base] + 1, len(graph)])
    assert placement.segments[1].cloned == (base,) and base in placement.segments[1].receives
    segments = split_graph(captured, placement)
    feed = _feed(captured)
    with torch.no_grad():
        sent = segments[0].module(*[feed[n] for n in segments[0].inputs])
        before = [t.clone() for t in sent]
        values = dict(zip(segments[0].outputs, sent))
        segments[1].module(*[feed[n] for n in segments[1].inputs], *[values[n] for n in segments[1].receives])
    assert all(torch.equal(a, b) for a, b in zip(sent, before))  # the sender's tensors are untouched



class _InputsAndBuffer(torch.nn.Module):
    """Writes into both model inputs and into a buffer (each write stores the same value at every call)."""

    def __init__(self):
        super().__init__()
        self.proj_in, self.mix, self.proj_out = torch.nn.Linear(4, 4), torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(3))

    def forward(self, sample, cond):
        cond.clamp_(-1.0, 1.0)  # fresh write into an input
        sample.clamp_(-3.0, 3.0)  # stale write into the latent
        h = self.proj_in(sample)
        self.cache.copy_(cond.mean(0))  # fresh write into a buffer, read right after
        h = h + self.mix(cond + self.cache)
        return self.proj_out(h) + sample


@pytest.mark.parametrize("method", ["fx", "export"])
def test_writes_into_inputs_and_buffers_are_exact_or_refused_and_never_reach_the_caller(method):
    torch.manual_seed(0)
    captured = capture_model(_InputsAndBuffer().eval(), (torch.randn(2, 4) * 4, torch.randn(2, 3) * 2),
                             methods=[method])
    graph = build_op_graph(captured)
    assert {graph.node(b)["kind"] for bases in graph.writes.values() for b in bases} == {"input", "constant"}
    n, outcomes = len(graph), {"exact": 0, "refused": 0}
    for cuts in itertools.chain(itertools.combinations(range(1, n), 1), itertools.combinations(range(1, n), 2)):
        try:
            segments = split_graph(captured, place(graph, [0, *cuts, n]))
        except SideEffectError as error:
            outcomes["refused"] += 1
            # fx reads the latent under its placeholder after sample.clamp_(): a later segment
            # would read its own, unclamped latent (export reads clamp_'s result instead)
            assert method == "fx" and "writes in place into the tensor of node 'sample'" in str(error)
            continue
        except PlacementError:
            continue
        feed = {spec.name: t * 3 for spec, t in zip(captured.inputs, captured.example)}
        kept = {name: t.clone() for name, t in feed.items()}
        with torch.no_grad():
            expected = captured.graph_module(*[t.clone() for t in feed.values()])
            torch.testing.assert_close(run_segments(segments, feed), expected, rtol=0, atol=0, msg=f"cuts {cuts}")
        assert all(torch.equal(feed[name], kept[name]) for name in feed)  # segments write their own copies
        verify_segments(captured, segments)
        outcomes["exact"] += 1
    assert outcomes["exact"] > (0 if method == "fx" else 30) and (outcomes["refused"] > 0) == (method == "fx"), outcomes
    verify_segments(captured, split_graph(captured, place(graph, [0, n])))

def test_a_written_weight_must_stay_in_one_segment_with_everything_that_uses_it():
    # x ─ a ─ u ─ b ─ out, w a weight: a reads it, u writes into it (with a's value), b reads it again
    def node(name, kind="op", latent=False):
        return {"name": name, "kind": kind, "op": kind, "target": name, "module": f"m.{name}", "out_bytes": 4,
                "param_bytes": 0, "latent": latent}

    nodes = [node("x", "input", True), node("w", "constant"), node("a"), node("u"), node("b"), node("out", "output")]
    edges = [("x", "a"), ("w", "a"), ("w", "u"), ("a", "u"), ("w", "b"), ("b", "out")]
    graph = OpGraph.from_nodes(nodes, edges, storage={"w": ["w"]}, writes={"u": ["w"]})
    with pytest.raises(GraphError, match="created after it"):
        OpGraph.from_nodes(nodes, edges, storage={"b": ["b"]}, writes={"u": ["b"]})
    with pytest.raises(GraphError, match="unknown nodes"):
        OpGraph.from_nodes(nodes, edges, writes={"u": ["v"]})
    assert graph.observes("b") == ("u",) and not graph.fresh[graph.index["b"]]  # b depends on the stale write
    assert place(graph, [0, 5, 6]).segments[0].placed == ("a", "u", "b") and not place(graph, [0, 5, 6]).segments[0].cloned
    # a reads w in segment 0, u writes it in segment 1: the next call's a would miss the write
    with pytest.raises(SideEffectError, match=r"node 'u' \(module 'm\.u'\) writes in place into the tensor of node "
                                              r"'w' .* also used by segments \[1\].*move boundary \[3\]"):
        place(graph, [0, 3, 6])
    # b in another segment than u: b reads its own w, without the write
    with pytest.raises(SideEffectError, match=r"node 'b' \(module 'm\.b'\) reads it afterwards, but in segment 1 .*"
                                              r"move boundary \[4\] out of positions 4\.\.4 \(1 more such write"):
        place(graph, [0, 4, 6])


def test_verify_segments_catches_the_dropped_write_and_a_corrupted_segment():
    _, captured, graph = _captured("export")
    n = len(graph)
    # the split as it was before writes were tracked: an op graph of data edges only drops the
    # fresh write (nothing reads its output), even unsplit
    blind = OpGraph.from_dict(graph.to_dict())
    assert not blind.writes
    with pytest.raises(SplitError, match=r"differ from the captured graph: the output \(shape \[2, 4\]\) differs by up"):
        verify_segments(captured, split_graph(captured, place(blind, [0, n])))
    segments = split_graph(captured, place(graph, [0, graph.index["add_"] + 1, n]))
    verify_segments(captured, segments)
    sent = segments[0].outputs[0]
    module = segments[0].module
    node = next(m for m in module.graph.nodes if m.name == sent)
    with module.graph.inserting_after(node):
        bad = module.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.5))
    node.replace_all_uses_with(bad, delete_user_cb=lambda user: user is not bad)
    module.recompile()
    with pytest.raises(SplitError) as info:
        verify_segments(captured, segments)
    text = str(info.value)
    assert "differs by up to" in text and f"the first value sent between segments that differs is {sent!r}" in text


@functools.cache
def _ltx():
    """A tiny diffusers LTXVideoTransformer3DModel captured as LTXPipeline calls it."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=1, caption_channels=12).eval()
    frames, height, width = 2, 4, 4
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    kwargs = {"hidden_states": torch.randn(2, frames * height * width, 8), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.full((2,), 500.0), "encoder_attention_mask": mask, "num_frames": frames,
              "height": height, "width": width,
              # LTXPipeline: (vae temporal compression / frame rate, spatial compression, spatial compression)
              "rope_interpolation_scale": (8 / 25, 32, 32), "attention_kwargs": None}
    captured = capture_model(model, (), kwargs)
    return captured, build_op_graph(captured)


def test_ltx_video_split_keeps_the_rope_grid_writes():
    captured, graph = _ltx()
    writes = [w for w in graph.writes if graph.node(w)["target"].endswith("copy_.default")]
    assert len(writes) == 3 and {graph.node(w)["module"] for w in writes} == {"rope"}
    (grid,) = {b for w in writes for b in graph.writes[w]}  # one tensor, written three times
    assert graph.node(grid)["module"] == "rope" and not graph.node(grid)["target"].endswith("copy_.default")
    readers = [n for n in graph.order if set(graph.observes(n)) & set(writes) and n not in writes]
    assert readers and all(graph.fresh[graph.index[w]] for w in writes)
    n = len(graph)
    stale = [i for i, name in enumerate(graph.order) if graph.node(name)["kind"] == "op" and not graph.fresh[i]]
    with torch.no_grad():
        expected = captured.graph_module(*captured.example)
    for boundaries in ([0, stale[0] + 1, n], [0, stale[len(stale) // 2], n], [0, n - 1, n],
                       [0, stale[len(stale) // 3], stale[2 * len(stale) // 3], n]):
        placement = place(graph, boundaries)
        # every segment that rotates queries or keys recomputes the grid with all three writes
        for part in placement.segments:
            if set(readers) & set(part.replicated):
                assert set(writes) <= set(part.replicated), (boundaries, part.index)
        segments = split_graph(captured, placement)
        with torch.no_grad():
            torch.testing.assert_close(run_segments(segments, _feed(captured)), expected, rtol=0, atol=0,
                                       msg=str(boundaries))
        verify_segments(captured, segments)
    # the old split (data edges only) dropped the writes: the check refuses it
    blind = OpGraph.from_dict(graph.to_dict())
    with pytest.raises(SplitError, match="differ from the captured graph"):
        verify_segments(captured, split_graph(captured, place(blind, [0, stale[len(stale) // 2], n])))
