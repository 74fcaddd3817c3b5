"""Plans: balanced and hand splits of a real profile, the plan file and its errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_profile

from asyncdiff_partition.core.files import FileFormatError
from asyncdiff_partition.core.placement import segment_inputs
from asyncdiff_partition.core.plan import (
    ASYNCDIFF_SD21_BOUNDARIES,
    Plan,
    PlanError,
    format_plan,
    ideal_speedup,
    make_plan,
    module_boundaries,
)


@pytest.fixture(scope="module")
def profile():
    return tiny_profile()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_balanced_plan_is_contiguous_and_consistent(profile, n):
    plan = make_plan(profile, n)
    graph = profile.op_graph()
    assert plan.boundaries[0] == 0 and plan.boundaries[-1] == len(graph) and len(plan.segments) == n
    assert [(s.start, s.end) for s in plan.segments] == list(zip(plan.boundaries, plan.boundaries[1:]))
    received = segment_inputs(graph, plan.boundaries)
    for segment in plan.segments:
        assert {r["value"]: r["bytes"] for r in segment.receives} == received[segment.index]
        assert all(r["from_segment"] < segment.index for r in segment.receives)
    # every parameter is held by some segment; replicated fresh weights may be held twice
    assert sum(s.param_bytes for s in plan.segments) >= graph.param_bytes
    p = plan.predicted
    assert p["async_step_ms"] == pytest.approx(max(s.time_ms for s in plan.segments))
    assert p["speedup"] <= p["ideal_speedup"] * (1 + 1e-9)
    assert p["ideal_speedup"] == pytest.approx(ideal_speedup(50, 1, n))
    assert plan.bytes_per_step == sum(sum(r.values()) for r in received)
    assert plan.broadcast_bytes_per_step >= plan.bytes_per_step or n == 1


def test_balanced_beats_or_ties_asyncdiffs_hand_split(profile):
    for n, modules in ASYNCDIFF_SD21_BOUNDARIES.items():
        ours = make_plan(profile, n)
        hand = make_plan(profile, n, boundaries=modules)
        assert hand.method == "manual" and ours.method == "balanced"
        assert ours.predicted["async_step_ms"] <= hand.predicted["async_step_ms"] * (1 + 1e-9)
        assert hand.segments[1].first_module.startswith(modules[0])


def test_hand_split_starts_segments_at_the_named_modules(profile):
    graph = profile.op_graph()
    (b,) = module_boundaries(graph, ["up_blocks.1.attentions.2"])
    assert graph.node(b)["module"].startswith("up_blocks.1.attentions.2")
    assert not any(graph.node(i)["module"].startswith("up_blocks.1.attentions.2") and not graph.node(i)["fresh"]
                   for i in range(b))
    with pytest.raises(PlanError, match="no node of module 'up_blocks.9'"):
        module_boundaries(graph, ["up_blocks.9"])
    with pytest.raises(PlanError, match="not in execution order"):
        module_boundaries(graph, ["up_blocks.2", "down_blocks.1"])
    with pytest.raises(PlanError, match="make 2 segments, but --devices is 3"):
        make_plan(profile, 3, boundaries=["mid_block"])


def test_speeds_and_bandwidth_change_the_plan(profile):
    even = make_plan(profile, 2)
    skewed = make_plan(profile, 2, speeds=[1.0, 0.5])
    assert skewed.segments[1].compute_ms < even.segments[1].compute_ms  # the slow device gets less
    slow_link = make_plan(profile, 2, bandwidth_gbps=1e-4)
    assert slow_link.segments[1].transfer_ms > 0
    assert slow_link.segments[1].bytes_in <= even.segments[1].bytes_in


def test_stride_two_adds_a_rank_and_halves_the_step(profile):
    s1, s2 = make_plan(profile, 2), make_plan(profile, 2, stride=2)
    assert (s1.world_size, s2.world_size) == (2, 3)
    assert s2.predicted["async_step_ms"] == pytest.approx(s1.predicted["async_step_ms"] / 2)
    assert s2.predicted["ideal_speedup"] == pytest.approx(ideal_speedup(50, 1, 2, 2))


def test_plan_file_round_trips_exactly(profile, tmp_path):
    plan = make_plan(profile, 3, bandwidth_gbps=5.0, speeds=[1, 1, 0.5], profile_path="p.json")
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path, fingerprint=profile.fingerprint) == plan
    assert json.loads(path.read_text())["kind"] == "plan"


def test_plan_errors_name_the_problem_and_the_fix(profile, tmp_path):
    path = make_plan(profile, 2).save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match=r"made for model fingerprint .* re-run 'asyncdiff-partition profile'"):
        Plan.load(path, fingerprint="0123456789abcdef")
    path.write_text(path.read_text()[:200])
    with pytest.raises(FileFormatError, match="corrupt or truncated.*asyncdiff-partition plan"):
        Plan.load(path)
    path.write_text('{"kind": "plan", "schema_version": 7}')
    with pytest.raises(FileFormatError, match="schema_version 7"):
        Plan.load(path)
    with pytest.raises(PlanError, match="(?i)non-fresh|segments|nodes"):
        make_plan(profile, 100_000)
    with pytest.raises(PlanError, match="stride must be 1 or 2"):
        make_plan(profile, 2, stride=3)


def test_format_plan_shows_a_row_per_segment(profile):
    text = format_plan(make_plan(profile, 3))
    assert "predicted ms" in text and "bytes in" in text
    assert len([l for l in text.splitlines() if l[:1].isdigit()]) == 3
    assert "ideal 2.88x" in text


def test_the_one_world_size_and_fingerprint_rules(profile):
    plan = make_plan(profile, 2)
    plan.check_world_size(2)
    plan.check_world_size(3, stride=2)
    with pytest.raises(PlanError, match=r"with stride 1 that needs N \+ stride - 1 = 2 ranks, but this run has 3"):
        plan.check_world_size(3)
    with pytest.raises(PlanError, match="stride must be 1 or 2"):
        plan.check_world_size(2, stride=0)
    plan.check_fingerprint(profile.fingerprint)
    specs = [dict(s, shape=[4, *s["shape"][1:]]) for s in profile.inputs]
    with pytest.raises(PlanError, match=r"but this model is f{16}: the input shapes differ from the profiled ones \("):
        plan.check_fingerprint("f" * 16, specs=specs)
    with pytest.raises(PlanError, match=r"it is another model: its graph has 7 nodes"):
        plan.check_fingerprint("f" * 16, specs=list(profile.inputs), n_nodes=7)


def test_segment_rows_read_the_placement(profile):
    from asyncdiff_partition.core.placement import place

    plan = make_plan(profile, 3)
    placement = place(profile.op_graph(), plan.boundaries)
    for row, part in zip(plan.segments, placement.segments):
        assert [r["value"] for r in row.receives] == list(part.receives)
        assert all(r["from_segment"] == placement.owner[r["value"]] for r in row.receives)
