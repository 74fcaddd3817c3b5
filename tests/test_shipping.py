"""Shipping a capture to ranks: pickles round-trip, and a segment's file holds only its weights."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny_captured, tiny_profile

from asyncdiff_partition.core import counters
from asyncdiff_partition.core.plan import make_plan
from asyncdiff_partition.core.profile import fingerprint
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.fx.shipping import is_stand_in, ship_segments
from asyncdiff_partition.fx.split import run_segments


@pytest.mark.parametrize("name", ["tiny-unet2d-condition", "tiny-dit"])
def test_pickle_round_trip_keeps_graph_and_output(name):
    captured = tiny_captured(name)
    loaded = pickle.loads(pickle.dumps(captured))
    assert [n.name for n in loaded.graph_module.graph.nodes] == [n.name for n in captured.graph_module.graph.nodes]
    graph, graph2 = build_op_graph(captured), build_op_graph(loaded)
    specs = [spec.to_dict() for spec in captured.inputs]
    assert fingerprint(graph2, specs) == fingerprint(graph, specs)
    with torch.no_grad():
        torch.testing.assert_close(loaded.graph_module(*captured.example), captured.graph_module(*captured.example))


@pytest.mark.parametrize("name", ["tiny-unet2d-condition", "tiny-dit"])
def test_each_segment_file_holds_only_its_weights(name, tmp_path):
    captured = tiny_captured(name)
    plan = make_plan(tiny_profile(name), 3, steps=4)
    segments = ready_segments(captured, plan, world_size=3)
    shipped = ship_segments(segments, tmp_path, captured)
    sizes = [shipped.path(s.index).stat().st_size for s in segments]
    full = len(pickle.dumps(captured))
    assert all(size < 0.8 * full for size in sizes), (sizes, full)

    before = counters.counts()
    for segment in segments:
        again, loaded = shipped.load(segment.index)
        # The rank gets the finished segment: its module, layouts, fingerprint and placement.
        assert again.module is loaded.graph_module
        assert [n.name for n in again.module.graph.nodes] == [n.name for n in segment.module.graph.nodes]
        assert (again.inputs, again.receives, again.outputs) == (segment.inputs, segment.receives, segment.outputs)
        assert again.layouts == segment.layouts and again.fingerprint == plan.fingerprint
        assert again.placement.digest() == segment.placement.digest()
        # This segment's weights are real and equal the original's ...
        own = dict(again.module.named_parameters())
        assert own and not any(is_stand_in(t) for t in own.values())
        for key, t in segment.module.named_parameters():
            torch.testing.assert_close(own[key], t, rtol=0, atol=0)
        # ... every other weight of the model is a one-element stand-in of the right shape.
        others = [p for n, p in loaded.model.named_parameters()
                  if not any(p is q for q in own.values()) and p.numel() > 1]
        assert others and all(is_stand_in(p) for p in others)

    # Segments loaded from their own files, run in order, still give the unsplit output; loading
    # built no op graph, placed nothing and split nothing.
    pieces = [shipped.load(i)[0] for i in range(len(segments))]
    assert counters.since(before) == {"op_graphs": 0, "placements": 0, "splits": 0}
    inputs = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    with torch.no_grad():
        torch.testing.assert_close(run_segments(pieces, inputs), captured.graph_module(*captured.example))
