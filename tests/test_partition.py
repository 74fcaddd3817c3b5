"""Tests for asyncdiff_partition.core.partition: brute force, hand-made cases, errors, scale."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff_partition.core.partition import (
    Partition,
    PartitionError,
    PartitionProblem,
    balance_segments,
    evaluate_boundaries,
)

# Costs are multiples of 1/4, speeds and bandwidths powers of two: every time below is exact
# in floating point, so "optimal" and "tie" mean exactly that in the brute force.
SPEEDS = [0.5, 1.0, 2.0, 4.0]
BANDWIDTHS = [None, math.inf, 1.0, 4.0, 16.0]
LATENCIES = [0.0, 0.5, 2.0]


@dataclass
class Case:
    problem: PartitionProblem
    n_segments: int
    speeds: list[float] | None
    bandwidth: float | None
    latency: float
    caps: list[int | None] | None

    def link(self) -> dict[str, object]:
        return {"speeds": self.speeds, "bandwidth": self.bandwidth, "link_latency_ms": self.latency}


# ---------------------------------------------------------------- reference cost model
def ref_cost(problem: PartitionProblem, bounds, speeds=None, bandwidth=None, latency=0.0):
    """Note [cost model] written out plainly: per segment (nodes, replicated, compute,
    transfer, time, bytes). Replicated = fresh nodes reached backwards from the segment's
    non-fresh nodes through fresh nodes only."""
    n_seg = len(bounds) - 1
    speeds = speeds or [1.0] * n_seg
    params = problem.param_bytes or [0] * problem.n_nodes
    out = []
    for k in range(n_seg):
        seg = [i for i in range(bounds[k], bounds[k + 1]) if not problem.fresh[i]]
        rep: set[int] = set()
        stack = [p for u in seg for p in problem.preds[u] if problem.fresh[p]]
        while stack:
            f = stack.pop()
            if f not in rep:
                rep.add(f)
                stack.extend(problem.preds[f])
        compute = sum(problem.costs[i] for i in seg) + sum(problem.costs[f] for f in rep)
        if k == 0:
            transfer = 0.0
        elif bandwidth is None or math.isinf(bandwidth):
            transfer = latency
        else:
            transfer = latency + problem.stale_bytes[bounds[k]] / bandwidth
        nbytes = sum(params[i] for i in seg) + sum(params[f] for f in rep)
        out.append((tuple(seg), tuple(sorted(rep)), compute, transfer, compute / speeds[k] + transfer, nbytes))
    return out


def all_splits(problem: PartitionProblem, n_seg: int):
    """Every boundary tuple whose segments each hold a non-fresh node."""
    n = problem.n_nodes
    for inner in itertools.combinations(range(1, n), n_seg - 1):
        b = (0, *inner, n)
        if all(any(not problem.fresh[i] for i in range(b[k], b[k + 1])) for k in range(n_seg)):
            yield b


def brute_force(case: Case):
    """(optimum, expected boundaries) or None when no split meets the caps."""
    p, n_seg = case.problem, case.n_segments
    feasible = []
    for b in all_splits(p, n_seg):
        segs = ref_cost(p, b, case.speeds, case.bandwidth, case.latency)
        if case.caps and any(c is not None and s[5] > c for s, c in zip(segs, case.caps)):
            continue
        feasible.append((max(s[4] for s in segs), b))
    if not feasible:
        return None
    opt = min(t for t, _ in feasible)
    nonfresh = [i for i in range(p.n_nodes) if not p.fresh[i]]

    def cuts(b):
        return tuple(sum(1 for i in nonfresh if i < x) for x in b)

    best = min(cuts(b) for t, b in feasible if t <= opt * (1 + 1e-9))
    # Documented tie-break: smallest cuts; within a run of fresh nodes, fewest stale bytes.
    expected = [0]
    for e in best[1:-1]:
        run = range(nonfresh[e - 1] + 1, nonfresh[e] + 1)
        expected.append(min(run, key=lambda x: (p.stale_bytes[x], x)))
    expected.append(p.n_nodes)
    return opt, tuple(expected)


# ---------------------------------------------------------------- instance generators
@st.composite
def problems(draw, max_nodes: int = 9, fresh_p: float = 0.35) -> PartitionProblem:
    n = draw(st.integers(1, max_nodes))
    fresh = [draw(st.floats(0, 1)) < fresh_p for _ in range(n)]
    if all(fresh):
        fresh[draw(st.integers(0, n - 1))] = False
    preds = []
    for i in range(n):
        allowed = [j for j in range(i) if fresh[j] or not fresh[i]]
        preds.append(
            draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True)) if allowed else []
        )
    costs = [draw(st.integers(0, 40)) / 4 for _ in range(n)]
    stale = [draw(st.integers(0, 12)) for _ in range(n + 1)]  # small: many ties
    params = draw(st.none() | st.lists(st.integers(0, 10), min_size=n, max_size=n))
    return PartitionProblem(costs=costs, fresh=fresh, preds=preds, stale_bytes=stale, param_bytes=params)


@st.composite
def cases(draw, max_nodes: int = 9, max_segments: int = 4) -> Case:
    p = draw(problems(max_nodes))
    n_seg = draw(st.integers(1, min(max_segments, p.n_nonfresh)))
    speeds = draw(st.none() | st.lists(st.sampled_from(SPEEDS), min_size=n_seg, max_size=n_seg))
    caps = draw(
        st.none()
        | st.lists(st.none() | st.integers(0, 40), min_size=n_seg, max_size=n_seg)
    )
    return Case(
        p, n_seg, speeds, draw(st.sampled_from(BANDWIDTHS)), draw(st.sampled_from(LATENCIES)), caps
    )


def unet_like(n: int, seed: int = 0) -> PartitionProblem:
    """A chain of n nodes with ~1% fresh ones: a 5-node time-embedding chain whose output
    feeds a fresh projection before every ~100th node, plus random skip connections, and
    stale bytes that jump around from one boundary to the next."""
    rng = random.Random(seed)
    costs, fresh, preds, params = [], [], [], []
    last = None
    for i in range(n):
        if i < 5:
            costs.append(rng.uniform(0.01, 0.1))
            fresh.append(True)
            preds.append([i - 1] if i else [])
        elif i % 100 == 50:
            costs.append(rng.uniform(0.01, 0.1))
            fresh.append(True)
            preds.append([4])
        else:
            ps = [x for x in (last, i - 1 if fresh[i - 1] else None) if x is not None]
            if last is not None and rng.random() < 0.05:
                ps.append(rng.randrange(5, last + 1))
            costs.append(rng.uniform(0.05, 2.0))
            fresh.append(False)
            preds.append(sorted(set(ps)))
            last = i
        params.append(rng.randrange(0, 10**6))
    stale = [0] + [rng.randrange(10**5, 10**8) for _ in range(n - 1)] + [0]
    return PartitionProblem(costs=costs, fresh=fresh, preds=preds, stale_bytes=stale, param_bytes=params)


# ---------------------------------------------------------------- optimality
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_optimal_against_brute_force(case: Case) -> None:
    expected = brute_force(case)
    if expected is None:
        with pytest.raises(PartitionError, match="memory caps cannot be met"):
            balance_segments(case.problem, case.n_segments, memory_caps=case.caps, **case.link())
        return
    opt, boundaries = expected
    part = balance_segments(case.problem, case.n_segments, memory_caps=case.caps, **case.link())
    assert part.bottleneck == pytest.approx(opt, rel=1e-12, abs=1e-12)
    assert part.boundaries == boundaries
    ref = ref_cost(case.problem, part.boundaries, case.speeds, case.bandwidth, case.latency)
    assert part.times == pytest.approx([s[4] for s in ref], rel=1e-12, abs=1e-12)
    if case.caps:
        assert all(c is None or b <= c for b, c in zip(part.param_bytes, case.caps))


@settings(max_examples=60, deadline=None)
@given(cases(max_nodes=7))
def test_evaluate_matches_reference_on_every_split(case: Case) -> None:
    p = case.problem
    for b in all_splits(p, case.n_segments):
        got = evaluate_boundaries(p, b, **case.link())
        ref = ref_cost(p, b, case.speeds, case.bandwidth, case.latency)
        assert got.boundaries == b
        assert got.segment_nodes == tuple(s[0] for s in ref)
        assert got.replicated == tuple(s[1] for s in ref)
        assert got.compute == pytest.approx([s[2] for s in ref])
        assert got.transfer == pytest.approx([s[3] for s in ref])
        assert got.times == pytest.approx([s[4] for s in ref])
        assert got.param_bytes == tuple(s[5] for s in ref)


def dp_optimum(case: Case) -> float:
    """O(N n^2) dynamic programme over node-space boundaries, for mid-sized problems."""
    p, n_seg, n = case.problem, case.n_segments, case.problem.n_nodes
    seg = {
        (a, e): ref_cost(p, (a, e))[0]
        for a in range(n)
        for e in range(a + 1, n + 1)
        if any(not p.fresh[i] for i in range(a, e))
    }
    speeds = case.speeds or [1.0] * n_seg
    best = {0: 0.0}
    for k in range(n_seg):
        nxt: dict[int, float] = {}
        for a, before in best.items():
            pay = 0.0 if k == 0 else ref_cost(p, (0, a, n), None, case.bandwidth, case.latency)[1][3]
            for e in range(a + 1, n + 1):
                if (a, e) not in seg or (e == n) != (k == n_seg - 1):
                    continue
                t = max(before, seg[(a, e)][2] / speeds[k] + pay)
                nxt[e] = min(nxt.get(e, math.inf), t)
        best = nxt
    return best[n]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_optimal_against_dp_on_larger_graphs(data: st.DataObject) -> None:
    """Up to 40 nodes with many fresh nodes: several multi-user fresh groups at once."""
    p = data.draw(problems(max_nodes=40, fresh_p=0.3))
    n_seg = data.draw(st.integers(1, min(6, p.n_nonfresh)))
    speeds = data.draw(st.lists(st.sampled_from(SPEEDS), min_size=n_seg, max_size=n_seg))
    case = Case(p, n_seg, speeds, data.draw(st.sampled_from(BANDWIDTHS)), 0.5, None)
    part = balance_segments(p, n_seg, **case.link())
    assert part.bottleneck == pytest.approx(dp_optimum(case), rel=1e-12)


def test_greedy_trap_non_monotone_stale_bytes() -> None:
    # Under the optimum (4) a greedy probe makes segment 0 three nodes long and lands on the
    # boundary with 100 stale bytes; the optimal split stops one node earlier.
    p = PartitionProblem(
        costs=[1.0] * 4, fresh=[False] * 4, preds=[[], [0], [1], [2]], stale_bytes=[0, 0, 0, 100, 0]
    )
    part = balance_segments(p, 2, speeds=[1.0, 0.5], bandwidth=1.0)
    assert part.boundaries == (0, 2, 4)
    assert part.times == (2.0, 4.0)
    assert part.bottleneck == 4.0
    assert part.imbalance == pytest.approx(4.0 / 3.0)


def test_boundary_goes_to_cheapest_position_in_a_fresh_run() -> None:
    # Nodes 1-3 are fresh, between non-fresh nodes 0 and 4: boundary 1..4 gives the same
    # segments; position 3 has the fewest stale bytes; on equal bytes the earliest wins.
    p = PartitionProblem(
        costs=[1.0, 0.0, 0.0, 0.0, 1.0],
        fresh=[False, True, True, True, False],
        preds=[[], [], [], [], [0]],
        stale_bytes=[0, 9, 5, 3, 5, 0],
    )
    part = balance_segments(p, 2, bandwidth=1.0)
    assert part.boundaries == (0, 3, 5)
    assert part.transfer == (0.0, 3.0)
    tied = PartitionProblem(
        costs=p.costs, fresh=p.fresh, preds=p.preds, stale_bytes=[0, 9, 3, 3, 3, 0]
    )
    assert balance_segments(tied, 2, bandwidth=1.0).boundaries == (0, 2, 5)  # earliest of 2..4


def test_ties_pick_the_smallest_cuts() -> None:
    p = PartitionProblem(
        costs=[1.0, 0.0, 0.0, 1.0], fresh=[False] * 4, preds=[[], [0], [1], [2]], stale_bytes=[0] * 5
    )
    assert balance_segments(p, 2).boundaries == (0, 1, 4)  # (0,2,4), (0,3,4) tie at 1.0


# ---------------------------------------------------------------- fresh replication
def replication_problem() -> PartitionProblem:
    #   0 temb (fresh) -> 1 proj (fresh) -> 3
    #   0 temb (fresh) ------------------------------> 5
    #   2 -> 3 -> 4 -> 5 (non-fresh);  6 (fresh, unused)
    return PartitionProblem(
        costs=[5.0, 1.0, 10.0, 10.0, 10.0, 10.0, 7.0],
        fresh=[True, True, False, False, False, False, True],
        preds=[[], [0], [], [2, 1], [3], [4, 0], [0]],
        stale_bytes=[0, 0, 0, 0, 64, 0, 0, 0],
        param_bytes=[100, 10, 1, 1, 1, 1, 1000],
    )


def test_fresh_nodes_charged_to_every_segment_that_needs_them() -> None:
    p = replication_problem()
    part = evaluate_boundaries(p, [0, 4, 7], bandwidth=8.0, link_latency_ms=1.0)
    assert part.segment_nodes == ((2, 3), (4, 5))
    assert part.replicated == ((0, 1), (0,))  # 1 only feeds segment 0; 6 feeds nothing
    assert part.compute == (26.0, 25.0)
    assert part.transfer == (0.0, 9.0)
    assert part.times == (26.0, 34.0)
    assert part.param_bytes == (112, 102)
    assert part.bottleneck == 34.0


def test_balance_reports_what_evaluate_reports() -> None:
    p = replication_problem()
    for n_seg in (1, 2, 3, 4):
        kw = {"speeds": [1.0 + k for k in range(n_seg)], "bandwidth": 8.0, "link_latency_ms": 1.0}
        part = balance_segments(p, n_seg, **kw)  # type: ignore[arg-type]
        assert part == evaluate_boundaries(p, part.boundaries, **kw)  # type: ignore[arg-type]
        assert len(part.boundaries) == n_seg + 1


def test_memory_caps_change_the_split() -> None:
    p = replication_problem()
    free = balance_segments(p, 2)
    capped = balance_segments(p, 2, memory_caps=[102, None])
    assert free.boundaries == (0, 4, 7)  # times (26, 25)
    assert capped.param_bytes[0] <= 102
    assert capped.boundaries == (0, 3, 7)
    assert capped.bottleneck == 36.0  # (10, 36)


def test_inputs_are_frozen_and_results_deterministic() -> None:
    costs = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    kw = dict(fresh=[False] * 8, preds=[[]] + [[i] for i in range(7)], stale_bytes=list(range(9)))
    a = PartitionProblem(costs=costs, **kw)  # type: ignore[arg-type]
    costs[0] = 100.0
    b = PartitionProblem(costs=[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], **kw)  # type: ignore[arg-type]
    assert a == b
    assert balance_segments(a, 3, bandwidth=2.0) == balance_segments(b, 3, bandwidth=2.0)


# ---------------------------------------------------------------- errors
def chain(n: int, **overrides) -> PartitionProblem:
    kw = {"costs": [1.0] * n, "fresh": [False] * n, "preds": [[i - 1] if i else [] for i in range(n)],
          "stale_bytes": [0] * (n + 1)}
    kw.update(overrides)
    return PartitionProblem(**kw)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"fresh": [False] * 3}, r"fresh must have length 4 .* got 3"),
        ({"preds": [[]] * 5}, r"preds must have length 4"),
        ({"stale_bytes": [0] * 4}, r"stale_bytes must have length 5 \(one entry per boundary"),
        ({"param_bytes": [1] * 3}, r"param_bytes must have length 4"),
        ({"costs": [1.0, -0.5, 1.0, 1.0]}, r"costs\[1\] must be a finite number >= 0, got -0.5"),
        ({"costs": [1.0, math.nan, 1.0, 1.0]}, r"costs\[1\] must be a finite number >= 0, got nan"),
        ({"costs": [1.0, 1.0, math.inf, 1.0]}, r"costs\[2\] must be a finite number"),
        ({"stale_bytes": [0, 0, -1, 0, 0]}, r"stale_bytes\[2\] must be an integer >= 0"),
        ({"param_bytes": [0, 1.5, 0, 0]}, r"param_bytes\[1\] must be an integer >= 0"),
        ({"preds": [[], [0], [3], [2]]}, r"preds\[2\] contains 3, .* topological order"),
        ({"fresh": [False, True, False, False]}, r"fresh node 1 has non-fresh predecessor 0"),
        ({"fresh": [False, "yes", False, False]}, r"fresh\[1\] must be a bool"),
    ],
)
def test_bad_problem(overrides: dict, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        chain(4, **overrides)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"n_segments": 0}, r"n_segments must be an int >= 1, got 0"),
        ({"n_segments": 4}, r"n_segments=4 but the problem has only 3 non-fresh nodes.*<= 3"),
        ({"speeds": [1.0]}, r"speeds must have one entry per segment \(2\), got 1"),
        ({"speeds": [1.0, 0.0]}, r"speeds\[1\] must be a finite number > 0, got 0.0"),
        ({"bandwidth": 0.0}, r"bandwidth must be > 0 bytes per ms"),
        ({"link_latency_ms": -1.0}, r"link_latency_ms must be a finite number >= 0"),
        ({"memory_caps": [10]}, r"memory_caps must have one entry per segment \(2\)"),
        ({"memory_caps": [10, -1]}, r"memory_caps\[1\] must be None or an int >= 0"),
        ({"memory_caps": [5, 5]}, r"memory caps cannot be met: .* memory_caps=\[5, 5\] .*raise the caps"),
    ],
)
def test_bad_request(args: dict, match: str) -> None:
    p = PartitionProblem(
        costs=[1.0] * 4, fresh=[True, False, False, False], preds=[[], [0], [1], [2]],
        stale_bytes=[0] * 5, param_bytes=[2, 4, 4, 4],
    )
    args = {"n_segments": 2, **args}
    with pytest.raises(PartitionError, match=match):
        balance_segments(p, **args)


@pytest.mark.parametrize(
    ("boundaries", "match"),
    [
        ([1, 2, 4], r"must run from 0 to n=4"),
        ([0, 2, 3], r"must run from 0 to n=4"),
        ([0], r"at least two entries"),
        ([0, 3, 2, 4], r"strictly increasing, got \[0, 3, 2, 4\]"),
        ([0, 2, 2, 4], r"strictly increasing"),
        ([0, 1, 4], r"segment 0 = nodes \[0, 1\) .* holds no non-fresh node"),
        ([0, 2.0, 4], r"boundaries\[1\] must be an int"),
    ],
)
def test_bad_boundaries(boundaries: list, match: str) -> None:
    p = PartitionProblem(
        costs=[1.0] * 4, fresh=[True, False, False, False], preds=[[], [0], [1], [2]],
        stale_bytes=[0] * 5,
    )
    with pytest.raises(PartitionError, match=match):
        evaluate_boundaries(p, boundaries)


def test_bad_speeds_in_evaluate() -> None:
    with pytest.raises(PartitionError, match=r"speeds must have one entry per segment \(2\)"):
        evaluate_boundaries(chain(4), [0, 2, 4], speeds=[1.0, 1.0, 1.0])


# ---------------------------------------------------------------- scale
def test_twenty_thousand_nodes_eight_segments() -> None:
    """Completes (no wall-clock assertion; see the module's Note [exact search])."""
    p = unet_like(20_000)
    speeds = [1.0, 1.5, 1.0, 0.5, 1.0, 2.0, 1.0, 1.0]
    kw = {"speeds": speeds, "bandwidth": 1e6, "link_latency_ms": 0.1}
    part = balance_segments(p, 8, **kw)  # type: ignore[arg-type]
    assert isinstance(part, Partition)
    assert len(part.boundaries) == 9 and all(len(s) > 0 for s in part.segment_nodes)
    assert part == evaluate_boundaries(p, part.boundaries, **kw)  # type: ignore[arg-type]
    # Every segment needs the time embedding: node 0..4 are replicated into all of them.
    assert all(set(range(5)) <= set(r) for r in part.replicated)
    # No worse than splitting at equal shares of the total cost.
    share = np.cumsum(p.costs) / sum(p.costs)
    naive = [0, *(int(np.searchsorted(share, k / 8)) + 1 for k in range(1, 8)), p.n_nodes]
    naive_part = evaluate_boundaries(p, naive, **kw)  # type: ignore[arg-type]
    assert part.bottleneck <= naive_part.bottleneck
    assert part.imbalance < naive_part.imbalance


# ---------------------------------------------------------------- staleness objective
def with_staleness(problem: PartitionProblem, values) -> PartitionProblem:
    return PartitionProblem(costs=problem.costs, fresh=problem.fresh, preds=problem.preds,
                            stale_bytes=problem.stale_bytes, param_bytes=problem.param_bytes, staleness=values)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([0.0, 0.05, 0.25, 1.0]), st.data())
def test_least_stale_against_brute_force(case: Case, slack: float, data) -> None:
    """Within the slack: never over the bound, never more stale than slack 0, and the least stale."""
    n = case.problem.n_nodes
    values = data.draw(st.lists(st.integers(0, 8), min_size=n + 1, max_size=n + 1))
    p = with_staleness(case.problem, [v / 4 for v in values])
    if brute_force(case) is None:
        return
    fast = balance_segments(p, case.n_segments, memory_caps=case.caps, **case.link())
    part = balance_segments(p, case.n_segments, memory_caps=case.caps, latency_slack=slack, **case.link())
    bound = fast.bottleneck * (1 + slack)
    assert part.bottleneck <= bound * (1 + 1e-9) + 1e-12
    assert part.staleness <= fast.staleness + 1e-12
    if case.caps:
        assert all(c is None or b <= c for b, c in zip(part.param_bytes, case.caps))
    # Brute force in cut space: every cut at the position Note [cost model] gives it.
    nonfresh = [i for i in range(n) if not p.fresh[i]]
    best = None
    for cuts in itertools.combinations(range(1, len(nonfresh)), case.n_segments - 1):
        bounds = [0] + [min(range(nonfresh[e - 1] + 1, nonfresh[e] + 1), key=lambda x: (p.stale_bytes[x], x))
                        for e in cuts] + [n]
        segs = ref_cost(p, bounds, case.speeds, case.bandwidth, case.latency)
        if max(s[4] for s in segs) > bound * (1 + 1e-9) + 1e-12:
            continue
        if case.caps and any(c is not None and s[5] > c for s, c in zip(segs, case.caps)):
            continue
        cost = sum(p.staleness[b] for b in bounds[1:-1])
        if best is None or cost < best[0]:
            best = (cost, tuple(bounds))
    assert best is not None
    if slack == 0.0:  # today's plan, whatever its staleness
        assert part.boundaries == fast.boundaries
    else:
        assert part.staleness == pytest.approx(best[0], abs=1e-12)
        assert part.boundaries == best[1]  # the smallest cuts among the least stale


@settings(max_examples=100, deadline=None)
@given(cases())
def test_slack_zero_is_todays_plan(case: Case) -> None:
    if brute_force(case) is None:
        return
    staleness = [float(b % 3) for b in range(case.problem.n_nodes + 1)]
    today = balance_segments(case.problem, case.n_segments, memory_caps=case.caps, **case.link())
    for problem in (case.problem, with_staleness(case.problem, staleness)):
        part = balance_segments(problem, case.n_segments, memory_caps=case.caps, latency_slack=0.0, **case.link())
        assert (part.boundaries, part.times) == (today.boundaries, today.times)
    # Slack without a staleness table has nothing to trade for: today's plan too.
    assert balance_segments(case.problem, case.n_segments, memory_caps=case.caps, latency_slack=0.5,
                            **case.link()).boundaries == today.boundaries


def test_slack_moves_the_cut_to_the_least_stale_boundary() -> None:
    # Four equal nodes; the balanced cut (2) is very stale, the cut at 3 is not.
    problem = PartitionProblem(costs=[1.0] * 4, fresh=[False] * 4, preds=[[], [0], [1], [2]],
                               stale_bytes=[0, 1, 1, 1, 0], staleness=[0.0, 0.5, 9.0, 0.1, 0.0])
    assert balance_segments(problem, 2).boundaries == (0, 2, 4)
    assert balance_segments(problem, 2, latency_slack=0.49).boundaries == (0, 2, 4)  # 3 ms > 2 * 1.49
    moved = balance_segments(problem, 2, latency_slack=0.5)
    assert moved.boundaries == (0, 3, 4) and moved.bottleneck == 3.0 and moved.staleness == 0.1


def test_least_stale_scales() -> None:
    base = unet_like(3000, seed=3)
    rng = random.Random(1)
    problem = with_staleness(base, [rng.random() for _ in range(base.n_nodes + 1)])
    fast = balance_segments(problem, 4)
    part = balance_segments(problem, 4, latency_slack=0.03)
    assert part.bottleneck <= fast.bottleneck * 1.03 * (1 + 1e-9)
    assert part.staleness <= fast.staleness


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_slack": -0.1}, "latency_slack must be a finite number >= 0"),
    ({"latency_slack": math.inf}, "latency_slack must be a finite number >= 0"),
])
def test_bad_slack(kwargs, message) -> None:
    problem = PartitionProblem(costs=[1.0, 1.0], fresh=[False, False], preds=[[], [0]], stale_bytes=[0, 1, 0])
    with pytest.raises(PartitionError, match=message):
        balance_segments(problem, 2, **kwargs)


def test_bad_staleness_table() -> None:
    with pytest.raises(PartitionError, match=r"staleness must have length 3"):
        PartitionProblem(costs=[1.0, 1.0], fresh=[False, False], preds=[[], [0]], stale_bytes=[0, 1, 0],
                         staleness=[0.0, 1.0])
    with pytest.raises(PartitionError, match=r"staleness\[1\] must be a finite number >= 0, got nan"):
        PartitionProblem(costs=[1.0, 1.0], fresh=[False, False], preds=[[], [0]], stale_bytes=[0, 1, 0],
                         staleness=[0.0, math.nan, 0.0])
