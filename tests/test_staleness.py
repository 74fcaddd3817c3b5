"""Staleness calibration (fx/staleness.py), its place in the profile file, and fidelity-aware plans."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from asyncdiff_partition.core.files import FileFormatError
from asyncdiff_partition.core.plan import Plan, PlanError, make_plan
from asyncdiff_partition.core.profile import SCHEMA_VERSION, Profile
from asyncdiff_partition.evaluation.evaluate import FidelityBench
from asyncdiff_partition.fx.staleness import META_KEY, injection_boundaries, spread_to_boundaries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    bench = FidelityBench("tiny-unet2d", steps=4, images=1, seed=0, guidance=1.0, profile_repeats=1)
    bench.calibrate()
    return bench


def test_calibration_numbers(bench):
    graph, staleness = bench.graph, bench.profile.staleness
    per_node, cut_error = staleness["per_node"], staleness["cut_error"]
    assert len(per_node) == len(graph) and len(cut_error) == len(graph) + 1
    stale = [i for i in range(len(graph)) if graph.node(i)["kind"] == "op" and not graph.node(i)["fresh"]]
    assert all(per_node[i] == 0.0 for i in range(len(graph)) if i not in stale)  # never sent, never stale
    assert all(v >= 0 and math.isfinite(v) for v in per_node) and max(per_node) > 0
    assert cut_error[0] == cut_error[-1] == 0.0 and max(cut_error) > 0
    assert staleness["steps"] == 4 and staleness["warmup"] == 1 and "relative L2" in staleness["metric"]
    nodes = {node.name: node for node in bench.captured.graph_module.graph.nodes}
    recorded = nodes[graph.order[stale[-1]]].meta[META_KEY]["relative"]
    assert len(recorded) == 3  # steps 1..3 of 4 read stale values; step 0 is exact


def test_probe_samples_like_the_unsplit_model(bench):
    from asyncdiff_partition.fx.staleness import StalenessProbe

    probe = StalenessProbe(bench.captured, bench.graph)
    np.testing.assert_array_equal(bench.sampler.run(probe), bench.reference)


def test_boundaries_between_injection_nodes_sample_alike(bench):
    # Note [cut error]: every boundary samples like the next injection boundary at or after it.
    graph, n = bench.graph, len(bench.graph)
    points = injection_boundaries(graph)
    fresh = graph.fresh
    gaps = [(a, b) for a, b in zip(points, points[1:]) if b - a > 2 and not all(fresh[i] for i in range(a))]
    a, b = gaps[len(gaps) // 2]
    inside = bench.judge([0, a + 1, n], 1, 1)
    assert inside == bench.judge([0, b, n], 1, 1)
    assert bench.profile.staleness["cut_error"][a + 1] == bench.profile.staleness["cut_error"][b]
    spread = spread_to_boundaries(graph, {p: float(p) for p in points})
    assert spread[a + 1] == spread[b] == b and spread[0] == spread[n] == 0.0
    with pytest.raises(ValueError, match="missing at injection boundaries"):
        spread_to_boundaries(graph, {})


def test_staleness_survives_the_profile_round_trip(bench, tmp_path):
    path = bench.profile.save(tmp_path / "p.json")
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION == 2
    loaded = Profile.load(path)
    assert loaded == bench.profile
    assert loaded.cut_staleness() == bench.profile.staleness["cut_error"]
    assert make_plan(loaded, 2, latency_slack=0.05).to_dict() == make_plan(bench.profile, 2, latency_slack=0.05).to_dict()


def test_schema_1_profiles_still_load_as_latency_only():
    profile = Profile.load(ROOT / "profiles" / "sd15-unet.cpu-1t.json")
    assert profile.staleness is None and profile.cut_staleness() is None
    plan = make_plan(profile, 2)
    assert plan.objective == {"kind": "latency", "latency_slack": 0.0} and plan.staleness is None
    with pytest.raises(PlanError, match="needs a profile calibrated for staleness"):
        make_plan(profile, 2, latency_slack=0.03)


def test_broken_staleness_field_is_refused(bench, tmp_path):
    data = bench.profile.to_dict()
    data["staleness"] = {**data["staleness"], "cut_error": [0.0, 1.0]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="one cut_error per boundary"):
        Profile.load(path)
    path.write_text(json.dumps({**data, "schema_version": 3}))
    with pytest.raises(FileFormatError, match="reads 1 or 2"):
        Profile.load(path)


def test_fidelity_aware_plan(bench, tmp_path):
    profile = bench.profile
    fast, slack = make_plan(profile, 2), make_plan(profile, 2, latency_slack=0.25)
    assert slack.objective == {"kind": "staleness", "latency_slack": 0.25}
    assert fast.objective["kind"] == "latency"
    cost = profile.cut_staleness()
    assert slack.staleness == [cost[b] for b in slack.boundaries[1:-1]]
    assert slack.predicted["staleness"] <= fast.predicted["staleness"]
    assert slack.predicted["async_step_ms"] <= fast.predicted["async_step_ms"] * 1.25 * (1 + 1e-9)
    assert Plan.load(slack.save(tmp_path / "plan.json")) == slack
    with pytest.raises(PlanError, match="give one or the other"):
        make_plan(profile, 2, latency_slack=0.1, boundaries=["up_blocks.0"])


def test_calibration_moves_to_a_capture_with_one_node_more():
    from asyncdiff_partition.core.graph import OpGraph
    from asyncdiff_partition.fx.staleness import transfer_staleness

    def graph(names):
        nodes = [{"name": n, "kind": "input" if n == "x" else "output" if n == "out" else "op", "op": "", "target": "",
                  "module": "", "out_bytes": 4, "param_bytes": 0, "latent": n == "x"} for n in names]
        return OpGraph.from_nodes(nodes, list(zip(names, names[1:])))

    source, target = graph(["x", "a", "b", "c", "out"]), graph(["x", "a", "extra", "b", "c", "out"])
    moved = transfer_staleness({"per_node": [0, 1, 2, 3, 0], "cut_error": [0, 5, 6, 7, 8, 0], "steps": 4},
                               source, target)
    assert moved["per_node"] == [0, 1, 0.0, 2, 3, 0] and moved["steps"] == 4
    # Boundary b sits before target node b; "extra" takes the value of the boundary before "b".
    assert moved["cut_error"] == [0.0, 5, 6, 6, 7, 8, 0.0]
    with pytest.raises(ValueError, match="another model"):
        transfer_staleness({"per_node": [0] * 5}, source, graph(["x", "p", "q", "r", "s", "out"]))
