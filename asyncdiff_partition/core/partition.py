"""Exact min-max partition of a topological order into contiguous segments."""

# AsyncDiff (Chen et al., 2024, arXiv 2406.06911) cuts the denoiser into N
# consecutive components that run at the same time, so a step costs as much as the slowest
# component. The paper splits by hand; this module chooses the cuts from measured costs. The
# search below is this project's own; it is exact under the cost model of Note [cost model].
#
# Note [cost model]
# ~~~~~~~~~~~~~~~~~
# Nodes 0..n-1 are in topological order; node i has a cost c_i >= 0 (ms), a fresh flag, a
# parameter size p_i >= 0 (bytes) and predecessors preds[i] (indices < i).
#
# * Non-fresh nodes are split into N contiguous, non-empty runs of the order. A boundary at
#   position b sends the non-fresh nodes with index < b to the left; boundaries are
#   0 = b_0 < b_1 < ... < b_N = n and segment k holds the non-fresh nodes in [b_k, b_k+1).
# * A fresh node (its ancestors are only model inputs other than the latent, and constants;
#   so its predecessors are all fresh) has no place in the order. Its *users* are the
#   non-fresh nodes it feeds directly or through other fresh nodes. It is replicated into
#   every segment holding one of its users, and its cost and parameter bytes are charged to
#   each of those segments. A fresh node without users is charged nowhere.
# * stale_bytes[b] (b = 0..n, from the caller) is the size of the stale activations that
#   cross boundary b. Segment k > 0 starting at b pays
#       transfer_k = link_latency_ms + stale_bytes[b] / bandwidth   (bytes per ms),
#   with stale_bytes[b] / bandwidth = 0 when bandwidth is None or inf; segment 0 pays none.
# * time_k = compute_k / speed_k + transfer_k, where compute_k sums the costs of the segment's
#   non-fresh nodes and of its replicated fresh nodes, and speeds default to 1.0.
# * param_bytes_k (the same two kinds of node) must not exceed memory_caps[k] (None: no cap).
# * Objective: minimise the bottleneck max_k time_k.
# * Ties: among optimal partitions (bottleneck within the search tolerance _REL_GAP of the
#   optimum) the one whose cuts -- the number of non-fresh nodes left of each boundary -- are
#   lexicographically smallest is returned: earlier segments are as short as possible. Where
#   fresh nodes lie between the two non-fresh nodes at a cut, the boundary goes to the
#   position in that run with the fewest stale bytes (the earliest one on equal bytes).
#
# Note [exact search]
# ~~~~~~~~~~~~~~~~~~~
# Work in "cut space": e in 0..m counts the non-fresh nodes left of a boundary (m of them in
# all). Moving a boundary within the run of fresh nodes at a cut changes only the stale
# bytes of the segment starting there, so every cut uses its cheapest position (above) and
# T(e) is that segment's transfer; segment k on non-fresh positions [a, e) costs
# C(a, e) / s_k + T(a) (T = 0 for k = 0). P[e] is the cost of the first e non-fresh nodes,
# with the fresh nodes that have a single user folded into that user (step 2).
#
# 1. Costs are >= 0 and a longer run can only need more fresh nodes, so C(a, e) and the
#    bytes M(a, e) grow with e. Under a bound L, the ends allowed after start a form an
#    interval (a, R_k(a)]. R_k(a) is not monotone in a, because T(a) is not: a greedy probe
#    that makes each segment as long as possible can stop at a cut with huge stale bytes
#    when a shorter segment would have led to a solution. The probe instead computes, for
#    k = N-1 down to 0, the *set* G_k of starts from which segments k..N-1 can finish:
#    a is in G_k iff the first element of G_k+1 after a is <= R_k(a). L is feasible iff
#    0 is in G_0, and following "first element of G_k+1 after the current cut" from 0 gives
#    the lexicographically smallest feasible cuts. This is exact for any T.
# 2. Fresh nodes with one user are folded into that user. The others are grouped by user
#    set; group g is charged to [a, e) iff its first user at or after a, nu_g(a), is < e.
#    Sorting nu_g(a) over g (once, independent of L) makes C(a, .) a staircase with G + 1
#    steps; R_k(a) is found with one numpy searchsorted per step for all a at once.
# 3. Feasibility is monotone in L: bisection. lo starts at a lower bound (total compute
#    over total speed, and others); hi at the first feasible lo * (1 + 2^-7 * 2^i). Every
#    feasible probe lowers hi to the bottleneck its partition actually has; stop when
#    hi - lo <= _REL_GAP * hi (at most ~30 steps), then take the smallest cuts feasible at
#    hi. Since costs and transfers are >= 0, starts a that cannot be reached within L
#    (P[a] > L * sum of the speeds before k) or cannot finish (P[m] - P[a] > L * sum of the
#    speeds from k) are skipped, so a probe near the optimum only looks at a window of
#    starts per segment: O(N (G + 1) w log m) for w starts, after O(n + G m log G) set-up.
# A probe accepts a segment when its time is <= L * (1 + _PROBE_SLACK) plus a few ulps of
# the total cost, so that the bound an evaluated partition reports is always found again.
#
# Note [staleness objective]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# A cut's fidelity cost is not its bytes: it is how fast the values crossing it change from
# one step to the next (they arrive one step late; DESIGN.md "The asynchronous schedule").
# staleness[b] >= 0 (b = 0..n, from the caller; fx/staleness.py measures it) is that cost at
# boundary b, and a partition's staleness is the sum over its inner boundaries. With
# latency_slack = x > 0 the solver first finds the optimal bottleneck L* exactly (above), then
# returns, among the splits whose every segment time is <= L* (1 + x) (and within the memory
# caps), one with the least staleness; ties go to the lexicographically smallest cuts. With
# x = 0 (the default) the result is exactly the latency-optimal split above. Inside a run of
# fresh nodes a boundary sits where Note [cost model] puts it (fewest stale bytes), and the
# staleness counted is that position's.
#   Exact search: segment k from cut a may end anywhere in (a, R_k(a)] (step 1 above, with
# the bound L* (1 + x)), so with D_N(m) = 0 and
#     D_k(a) = staleness at a (0 for k = 0) + min over e in (a, R_k(a)] of D_k+1(e)
# D_0(0) is the least staleness; one range-minimum table (sparse table, leftmost minimum) per
# segment makes it O(N m log m).

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = [
    "Partition",
    "PartitionError",
    "PartitionProblem",
    "balance_segments",
    "evaluate_boundaries",
]

IntArray = np.ndarray
FloatArray = np.ndarray

_REL_GAP = 1e-9  # bisection stops when hi - lo <= _REL_GAP * hi
_PROBE_SLACK = 1e-12  # see Note [exact search]


class PartitionError(AsyncDiffError, ValueError):
    """A partition problem, a request or a given split breaks a rule of the cost model."""


@dataclass(frozen=True)
class PartitionProblem:
    """Per-node numbers of one network, in topological order (see Note [cost model]).

    Sequences are copied into tuples, so a problem never changes after it is built.

    Example:
        >>> p = PartitionProblem(costs=[1.0, 2.0, 3.0], fresh=[False, False, False],
        ...                      preds=[[], [0], [1]], stale_bytes=[0, 8, 8, 0])

    Args:
        costs: time of each node in ms, finite and >= 0.
        fresh: whether each node is fresh (recomputed in every segment that needs it).
        preds: predecessors of each node; every index must be smaller than the node's own.
            A fresh node may only have fresh predecessors.
        stale_bytes: length n + 1; bytes that cross boundary b, for b = 0..n.
        param_bytes: parameter bytes of each node (default all 0).
        staleness: length n + 1 or None; fidelity cost of cutting at boundary b, for
            b = 0..n (Note [staleness objective]). Used only with a latency slack.

    Raises:
        PartitionError: on a wrong length, a negative or non-finite number, a predecessor
            that is not earlier, or a fresh node with a non-fresh predecessor.
    """

    costs: Sequence[float]
    fresh: Sequence[bool]
    preds: Sequence[Sequence[int]]
    stale_bytes: Sequence[int]
    param_bytes: Sequence[int] | None = None
    staleness: Sequence[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.costs)
        for name, seq, want in (
            ("fresh", self.fresh, n),
            ("preds", self.preds, n),
            ("stale_bytes", self.stale_bytes, n + 1),
            ("param_bytes", self.param_bytes, n),
            ("staleness", self.staleness, n + 1),
        ):
            if seq is not None and len(seq) != want:
                extra = " (one entry per boundary 0..n)" if name in ("stale_bytes", "staleness") else ""
                raise PartitionError(
                    f"{name} must have length {want}{extra} for {n} costs, got {len(seq)}; "
                    f"give one entry per node in the same topological order"
                )
        costs = tuple(_finite_nonneg("costs", i, c) for i, c in enumerate(self.costs))
        fresh = tuple(_flag(i, f) for i, f in enumerate(self.fresh))
        preds: list[tuple[int, ...]] = []
        for i, ps in enumerate(self.preds):
            row = tuple(_index(i, p) for p in ps)
            if fresh[i]:
                bad = [p for p in row if not fresh[p]]
                if bad:
                    raise PartitionError(
                        f"fresh node {i} has non-fresh predecessor {bad[0]}; a fresh node may "
                        f"depend only on other fresh nodes (non-latent inputs, constants): "
                        f"mark node {i} non-fresh"
                    )
            preds.append(row)
        stale = tuple(_count("stale_bytes", b, v) for b, v in enumerate(self.stale_bytes))
        params = (
            None
            if self.param_bytes is None
            else tuple(_count("param_bytes", i, v) for i, v in enumerate(self.param_bytes))
        )
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "fresh", fresh)
        object.__setattr__(self, "preds", tuple(preds))
        object.__setattr__(self, "stale_bytes", stale)
        object.__setattr__(self, "param_bytes", params)
        if self.staleness is not None:
            object.__setattr__(self, "staleness", tuple(
                _finite_nonneg("staleness", b, v, "a relative change between steps") for b, v in enumerate(self.staleness)))

    @property
    def n_nodes(self) -> int:
        return len(self.costs)

    @property
    def n_nonfresh(self) -> int:
        return sum(1 for f in self.fresh if not f)


@dataclass(frozen=True)
class Partition:
    """A split of the non-fresh nodes into N segments, with its cost (Note [cost model]).

    Attributes:
        boundaries: N + 1 positions; boundaries[0] = 0, boundaries[-1] = n.
        segment_nodes: non-fresh node indices of each segment.
        replicated: fresh node indices recomputed in each segment.
        compute: compute_k in ms, before dividing by the device speed.
        transfer: transfer_k in ms (0 for segment 0).
        times: compute_k / speed_k + transfer_k.
        param_bytes: parameter bytes each segment holds.
        staleness: sum of the problem's staleness at the inner boundaries (0.0 without it).
    """

    boundaries: tuple[int, ...]
    segment_nodes: tuple[tuple[int, ...], ...]
    replicated: tuple[tuple[int, ...], ...]
    compute: tuple[float, ...]
    transfer: tuple[float, ...]
    times: tuple[float, ...]
    param_bytes: tuple[int, ...]
    staleness: float = 0.0

    @property
    def bottleneck(self) -> float:
        """The slowest segment's time: the per-step latency of the asynchronous run."""
        return max(self.times)

    @property
    def imbalance(self) -> float:
        """max / mean of the segment times: 1.0 for perfect balance (and for all-zero times)."""
        mean = math.fsum(self.times) / len(self.times)
        return 1.0 if mean == 0.0 else max(self.times) / mean


def balance_segments(
    problem: PartitionProblem,
    n_segments: int,
    *,
    speeds: Sequence[float] | None = None,
    bandwidth: float | None = None,
    link_latency_ms: float = 0.0,
    memory_caps: Sequence[int | None] | None = None,
    latency_slack: float = 0.0,
) -> Partition:
    """Split ``problem`` into ``n_segments`` segments with the smallest bottleneck time.

    Exact under Note [cost model]; the algorithm is in Note [exact search]. Ties are broken
    as that note says, so the result is deterministic. With ``latency_slack`` > 0 and the
    problem's ``staleness``, the least stale split within that slack of the optimal
    bottleneck is returned instead (Note [staleness objective]).

    Example:
        >>> p = PartitionProblem(costs=[1.0, 1.0, 1.0, 1.0], fresh=[False] * 4,
        ...                      preds=[[], [0], [1], [2]], stale_bytes=[0, 0, 0, 100, 0])
        >>> balance_segments(p, 2, speeds=[1.0, 0.5], bandwidth=1.0).boundaries
        (0, 2, 4)

    Args:
        problem: the per-node numbers.
        n_segments: N, one segment per device; 1 <= N <= number of non-fresh nodes.
        speeds: speed factor of each device (length N, > 0); default all 1.0.
        bandwidth: link bandwidth in bytes per ms; None or inf for free transfers.
        link_latency_ms: fixed cost of every transfer, >= 0.
        memory_caps: parameter byte cap of each device (length N; None entries: no cap).
        latency_slack: x >= 0; allow a bottleneck up to (1 + x) times the optimum to cut
            where the problem's staleness is least (0: the latency-optimal split).

    Returns:
        The optimal Partition, costed exactly as ``evaluate_boundaries`` costs it.

    Raises:
        PartitionError: on a bad argument, or when no split meets the memory caps.
    """
    n_seg = _n_segments(problem, n_segments)
    spd = _speeds(speeds, n_seg)
    _link(bandwidth, link_latency_ms)
    caps = _memory_caps(memory_caps, n_seg)
    if not isinstance(latency_slack, Real) or not 0 <= latency_slack < math.inf:
        raise PartitionError(f"latency_slack must be a finite number >= 0 (0.03 = 3 % over the optimal "
                             f"bottleneck), got {latency_slack!r}")
    st = _Structure(problem)
    transfer = st.transfer_by_cut(bandwidth, link_latency_ms)
    search = _Search(st, spd, transfer, caps)
    if any(c is not None for c in caps) and search.probe(math.inf) is None:
        raise PartitionError(
            f"memory caps cannot be met: no split of the {st.m} non-fresh nodes into {n_seg} "
            f"segments keeps every segment's parameter bytes within memory_caps={list(caps)} "
            f"(parameter bytes: {st.byte_total} in all with fresh nodes counted once, "
            f"{int(st.folded_bytes.max(initial=0))} for the largest node with its own fresh "
            f"inputs); raise the caps, use more segments, or set a cap to None"
        )
    cuts = search.solve()
    if latency_slack > 0 and problem.staleness is not None and n_seg > 1:
        at_cut = np.array([problem.staleness[int(b)] for b in st.best_boundary], np.float64)
        cuts = search.least_stale(search.bottleneck(cuts) * (1 + latency_slack), at_cut)
    return _evaluate(problem, st, st.boundaries_of(cuts), spd, bandwidth, link_latency_ms)


def evaluate_boundaries(
    problem: PartitionProblem,
    boundaries: Sequence[int],
    *,
    speeds: Sequence[float] | None = None,
    bandwidth: float | None = None,
    link_latency_ms: float = 0.0,
) -> Partition:
    """Cost a given split (e.g. a hand-made one) under Note [cost model].

    Example:
        >>> p = PartitionProblem(costs=[1.0, 2.0, 3.0], fresh=[False] * 3,
        ...                      preds=[[], [0], [1]], stale_bytes=[0, 8, 8, 0])
        >>> evaluate_boundaries(p, [0, 2, 3], bandwidth=4.0).times
        (3.0, 5.0)

    Args:
        problem: the per-node numbers.
        boundaries: N + 1 strictly increasing positions from 0 to n; every segment must
            hold at least one non-fresh node.
        speeds, bandwidth, link_latency_ms: as for ``balance_segments``.

    Returns:
        The Partition with its per-segment costs.

    Raises:
        PartitionError: when the boundaries or the other arguments break these rules.
    """
    b = [_boundary(i, x) for i, x in enumerate(boundaries)]
    n = problem.n_nodes
    if len(b) < 2 or b[0] != 0 or b[-1] != n:
        raise PartitionError(
            f"boundaries must run from 0 to n={n} with at least two entries, got {b}; "
            f"write them as [0, b_1, ..., {n}]"
        )
    for k in range(len(b) - 1):
        if b[k] >= b[k + 1]:
            raise PartitionError(
                f"boundaries must be strictly increasing, got {b} (position {k + 1}: "
                f"{b[k]} then {b[k + 1]})"
            )
        if all(problem.fresh[i] for i in range(b[k], b[k + 1])):
            raise PartitionError(
                f"segment {k} = nodes [{b[k]}, {b[k + 1]}) of boundaries {b} holds no "
                f"non-fresh node; fresh nodes are replicated, not placed, so move a boundary "
                f"or drop a segment"
            )
    spd = _speeds(speeds, len(b) - 1)
    _link(bandwidth, link_latency_ms)
    return _evaluate(problem, _Structure(problem), b, spd, bandwidth, link_latency_ms)


class _Structure:
    """What both the solver and the evaluator derive from a problem, in cut space."""

    def __init__(self, problem: PartitionProblem) -> None:
        n = problem.n_nodes
        fresh = problem.fresh
        self.nonfresh: IntArray = np.array([i for i in range(n) if not fresh[i]], np.int64)
        self.m = m = len(self.nonfresh)
        pos = np.full(n, -1, np.int64)
        pos[self.nonfresh] = np.arange(m)
        succ: list[list[int]] = [[] for _ in range(n)]
        for i, ps in enumerate(problem.preds):
            for p in set(ps):
                succ[p].append(i)
        # Users of fresh node f: non-fresh nodes it reaches through fresh nodes only.
        user_sets: dict[int, set[int]] = {}
        for f in reversed(range(n)):
            if fresh[f]:
                us: set[int] = set()
                for s in succ[f]:
                    if fresh[s]:
                        us |= user_sets[s]
                    else:
                        us.add(int(pos[s]))
                user_sets[f] = us
        self.users = {f: np.array(sorted(us), np.int64) for f, us in user_sets.items()}

        params = problem.param_bytes or (0,) * n
        cost_parts: list[list[float]] = [[problem.costs[i]] for i in self.nonfresh]
        byte_parts = [params[i] for i in self.nonfresh]
        groups: dict[tuple[int, ...], list[int]] = {}
        for f, us in user_sets.items():
            if len(us) == 1:
                (u,) = us
                cost_parts[u].append(problem.costs[f])
                byte_parts[u] += params[f]
            elif us:
                groups.setdefault(tuple(sorted(us)), []).append(f)
        folded = np.array([math.fsum(parts) for parts in cost_parts], np.float64)
        self.folded_bytes: IntArray = np.array(byte_parts, np.int64)
        self.cost_prefix: FloatArray = np.concatenate([[0.0], _accurate_cumsum(folded)])
        self.byte_prefix: IntArray = np.concatenate([[0], np.cumsum(self.folded_bytes)])
        keys = sorted(groups)
        g_cost = np.array([math.fsum(problem.costs[f] for f in groups[k]) for k in keys])
        g_bytes = np.array([sum(params[f] for f in groups[k]) for k in keys], np.int64)
        self.max_cost = float(folded.max(initial=0.0))
        self.cost_total = float(self.cost_prefix[-1]) + math.fsum(g_cost)
        self.byte_total = int(self.byte_prefix[-1]) + int(g_bytes.sum())
        # nu[g, a] = first user of group g at or after cut a (m when none); the staircase
        # of Note [exact search] step 2 sorts it over g for every a.
        starts = np.arange(m + 1)
        nu = np.empty((len(keys), m + 1), np.int64)
        for g, k in enumerate(keys):
            us_arr = np.array(k + (m,), np.int64)
            nu[g] = us_arr[np.searchsorted(us_arr[:-1], starts, "left")]
        order = np.argsort(nu, axis=0, kind="stable")
        self.nu_sorted: IntArray = np.take_along_axis(nu, order, axis=0)
        self.cost_steps: FloatArray = np.cumsum(g_cost[order], axis=0)
        self.byte_steps: IntArray = np.cumsum(g_bytes[order], axis=0)
        self.nu = nu
        self.g_cost = g_cost

        # Cheapest boundary position at each cut (Note [cost model], ties).
        stale = problem.stale_bytes
        best = np.empty(m + 1, np.int64)
        best[0], best[m] = 0, n
        if m > 1:
            best[1:m] = self.nonfresh[1:]
            lo = self.nonfresh[:-1] + 1
            for e in np.flatnonzero(lo < self.nonfresh[1:]) + 1:
                run = range(int(lo[e - 1]), int(self.nonfresh[e]) + 1)
                best[e] = min(run, key=lambda b: (stale[b], b))
        self.best_boundary: IntArray = best
        self.stale_at_cut = [stale[int(b)] for b in best]

    def transfer_by_cut(self, bandwidth: float | None, latency: float) -> FloatArray:
        if bandwidth is None or math.isinf(bandwidth):
            return np.full(self.m + 1, float(latency))
        # The same IEEE division as _transfer_ms, so the search and _evaluate agree.
        return latency + np.array(self.stale_at_cut, np.float64) / bandwidth

    def boundaries_of(self, cuts: Sequence[int]) -> list[int]:
        return [int(self.best_boundary[e]) for e in cuts]

    def max_end(
        self, a: IntArray, budget: FloatArray | IntArray, bytes_: bool = False
    ) -> IntArray:
        """Largest e in [a, m] with e == a or C(a, e) <= budget (M(a, e) if ``bytes_``)."""
        prefix = self.byte_prefix if bytes_ else self.cost_prefix
        steps = self.byte_steps if bytes_ else self.cost_steps
        best: IntArray = a.copy()
        alive = np.arange(len(a))  # indices into a that may still grow
        limit, lower = prefix[a] + budget, a
        for j in range(len(steps) + 1):
            at = a[alive]
            upper = self.nu_sorted[j, at] if j < len(steps) else np.full_like(at, self.m)
            room = limit if j == 0 else limit - steps[j - 1, at]
            end = np.minimum(np.searchsorted(prefix, room, "right") - 1, upper)
            best[alive[end > lower]] = end[end > lower]  # later steps only reach further
            # A start whose limit falls inside this step can go no further: the steps only
            # climb. Those that reached the step's top (and a real group) carry on.
            more = (end == upper) & (upper < self.m)
            alive, limit, lower = alive[more], limit[more], upper[more]
            if len(alive) == 0:
                break
        return best

    def segment_cost(self, a: int, e: int) -> float:
        return float(self.cost_prefix[e] - self.cost_prefix[a] + self.g_cost[self.nu[:, a] < e].sum())


class _Search:
    """The bisection and probe of Note [exact search]."""

    def __init__(
        self, st: _Structure, speeds: list[float], transfer: FloatArray, caps: list[int | None]
    ) -> None:
        self.st, self.speeds, self.transfer = st, speeds, transfer
        n_seg, m = len(speeds), st.m
        self.before = [math.fsum(speeds[:k]) for k in range(n_seg)]
        self.after = [math.fsum(speeds[k:]) for k in range(n_seg)]
        self.tol = 16 * np.finfo(np.float64).eps * st.cost_total
        everywhere = np.arange(m + 1)
        by_cap: dict[int, IntArray] = {}
        for cap in caps:
            if cap is not None and cap < st.byte_total and cap not in by_cap:
                by_cap[cap] = st.max_end(everywhere, np.full(m + 1, cap), bytes_=True)
        self.mem_end = [None if c is None else by_cap.get(c) for c in caps]

    def starts(self, k: int, bound: float) -> IntArray:
        """Starts of segment k worth probing under ``bound`` (a superset of the useful ones)."""
        st, n_seg = self.st, len(self.speeds)
        lo, hi = k, st.m - (n_seg - k)
        if k == 0:
            hi = 0
        elif not math.isinf(bound):
            slack = n_seg * self.tol
            reach = bound * self.before[k] * (1 + _REL_GAP) + slack
            finish = st.cost_prefix[-1] - bound * self.after[k] * (1 + _REL_GAP) - slack
            hi = min(hi, int(np.searchsorted(st.cost_prefix, reach, "right")) - 1)
            lo = max(lo, int(np.searchsorted(st.cost_prefix, finish, "left")))
        return np.arange(lo, hi + 1)

    def probe(self, bound: float) -> list[int] | None:
        """Lexicographically smallest cuts with every segment time <= bound, or None."""
        st, n_seg = self.st, len(self.speeds)
        relaxed = bound * (1 + _PROBE_SLACK)
        nexts: list[dict[int, int]] = []
        targets = np.array([st.m], np.int64)  # G_N
        for k in reversed(range(n_seg)):
            a = self.starts(k, bound)
            if len(a) == 0:
                return None
            if math.isinf(bound):
                end = np.full_like(a, st.m)
            else:
                pay = self.transfer[a] if k > 0 else np.zeros(len(a))
                end = st.max_end(a, self.speeds[k] * (relaxed - pay) + self.tol)
            mem = self.mem_end[k]
            if mem is not None:
                end = np.minimum(end, mem[a])
            idx = np.searchsorted(targets, a, "right")
            nxt = targets[np.minimum(idx, len(targets) - 1)]
            ok = (idx < len(targets)) & (nxt <= end)
            if not ok.any():
                return None
            targets = a[ok]
            nexts.append(dict(zip(targets.tolist(), nxt[ok].tolist())))
        cuts = [0]
        for step in reversed(nexts):
            cuts.append(step[cuts[-1]])
        return cuts

    def bottleneck(self, cuts: list[int]) -> float:
        return max(
            self.st.segment_cost(cuts[k], cuts[k + 1]) / self.speeds[k]
            + (float(self.transfer[cuts[k]]) if k > 0 else 0.0)
            for k in range(len(cuts) - 1)
        )

    def solve(self) -> list[int]:
        st, n_seg = self.st, len(self.speeds)
        lo = max(st.cost_total / self.after[0], st.max_cost / max(self.speeds))
        if n_seg > 1:
            lo = max(lo, float(self.transfer[1 : st.m].min()))
        lo *= 1 - _REL_GAP
        # An upper bound: grow the excess over the lower bound geometrically, then bisect.
        best, step = None, 2.0**-7
        while best is None:
            bound = lo * (1 + step) if lo > 0 and step < 2.0**40 else math.inf
            best = self.probe(bound)
            if best is None:
                if math.isinf(bound):  # balance_segments checked the caps before
                    raise AssertionError("no split at an infinite bound: a partition.py bug")
                lo, step = bound, step * 2
        hi = self.bottleneck(best)
        for _ in range(200):  # ~30 steps suffice; the cap only stops a bug from hanging
            if hi - lo <= _REL_GAP * hi:
                break
            mid = lo + (hi - lo) / 2
            cuts = self.probe(mid)
            if cuts is None:
                lo = mid
            else:
                best, hi = cuts, min(hi, self.bottleneck(cuts))
        final = self.probe(hi)  # smallest cuts among the ties of Note [cost model]
        return final if final is not None else best

    def least_stale(self, bound: float, at_cut: FloatArray) -> list[int]:
        """Cuts of least total ``at_cut`` with every segment time <= bound (Note [staleness objective])."""
        st, n_seg = self.st, len(self.speeds)
        relaxed = bound * (1 + _PROBE_SLACK)
        best = np.full(st.m + 1, math.inf)  # D_N
        best[st.m] = 0.0
        choices: list[dict[int, int]] = []
        for k in reversed(range(n_seg)):
            a = self.starts(k, bound)
            pay = self.transfer[a] if k > 0 else np.zeros(len(a))
            end = st.max_end(a, self.speeds[k] * (relaxed - pay) + self.tol)
            mem = self.mem_end[k]
            if mem is not None:
                end = np.minimum(end, mem[a])
            ok = end > a
            a, end = a[ok], end[ok]
            arg = _range_argmin(best, a + 1, end)
            value = best[arg] + (at_cut[a] if k > 0 else 0.0)
            best = np.full(st.m + 1, math.inf)
            best[a] = value
            choices.append(dict(zip(a.tolist(), arg.tolist())))
        if not math.isfinite(best[0]):
            raise AssertionError("the latency-optimal split is not within its own bound: a partition.py bug")
        cuts = [0]
        for step in reversed(choices):
            cuts.append(step[cuts[-1]])
        return cuts


def _range_argmin(values: FloatArray, lo: IntArray, hi: IntArray) -> IntArray:
    """Per i, the leftmost index of the least ``values`` in [lo[i], hi[i]] (a sparse table)."""
    table = [np.arange(len(values))]
    while 2 ** len(table) <= len(values):
        prev, half = table[-1], 2 ** (len(table) - 1)
        left, right = prev[:-half], prev[half:]
        table.append(np.where(values[right] < values[left], right, left))
    out = np.empty(len(lo), np.int64)
    if len(lo) == 0:
        return out
    level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    for j in np.unique(level):
        pick = level == j
        left = table[j][lo[pick]]
        right = table[j][hi[pick] - 2**j + 1]
        vl, vr = values[left], values[right]
        out[pick] = np.where(vr < vl, right, np.where(vl < vr, left, np.minimum(left, right)))
    return out


def _evaluate(
    problem: PartitionProblem,
    st: _Structure,
    boundaries: list[int],
    speeds: list[float],
    bandwidth: float | None,
    latency: float,
) -> Partition:
    params = problem.param_bytes or (0,) * problem.n_nodes
    cuts = np.searchsorted(st.nonfresh, boundaries, "left")
    nodes, reps, compute, transfer, times, nbytes = [], [], [], [], [], []
    for k in range(len(boundaries) - 1):
        a, e = int(cuts[k]), int(cuts[k + 1])
        seg = tuple(int(i) for i in st.nonfresh[a:e])
        rep = tuple(
            f for f, us in sorted(st.users.items())
            if len(us) and (j := int(np.searchsorted(us, a))) < len(us) and us[j] < e
        )
        c = math.fsum([problem.costs[i] for i in seg] + [problem.costs[f] for f in rep])
        t = 0.0 if k == 0 else _transfer_ms(problem.stale_bytes[boundaries[k]], bandwidth, latency)
        nodes.append(seg)
        reps.append(rep)
        compute.append(c)
        transfer.append(t)
        times.append(c / speeds[k] + t)
        nbytes.append(sum(params[i] for i in seg) + sum(params[f] for f in rep))
    return Partition(
        boundaries=tuple(boundaries),
        segment_nodes=tuple(nodes),
        replicated=tuple(reps),
        compute=tuple(compute),
        transfer=tuple(transfer),
        times=tuple(times),
        param_bytes=tuple(nbytes),
        staleness=0.0 if problem.staleness is None else math.fsum(problem.staleness[b] for b in boundaries[1:-1]),
    )


def _transfer_ms(stale_bytes: int, bandwidth: float | None, latency: float) -> float:
    if bandwidth is None or math.isinf(bandwidth):
        return latency
    return latency + stale_bytes / bandwidth


def _accurate_cumsum(values: FloatArray) -> FloatArray:
    """Prefix sums, each within an ulp or two (Neumaier), so segment sums match fsum."""
    out = np.empty(len(values), np.float64)
    total = comp = 0.0
    for i, v in enumerate(values.tolist()):
        t = total + v
        comp += (total - t) + v if abs(total) >= abs(v) else (v - t) + total
        total = t
        out[i] = total + comp
    return out


def _finite_nonneg(name: str, i: int, value: object, what: str = "a measured time in ms") -> float:
    # 0 <= v < inf also rejects NaN; the exact type test is only a fast path.
    if (type(value) in (float, int) or isinstance(value, Real)) and 0 <= value < math.inf:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    raise PartitionError(
        f"{name}[{i}] must be a finite number >= 0, got {value!r}; each is {what} "
        f"(clamp measurement noise below zero to 0)"
    )


def _count(name: str, i: int, value: object) -> int:
    if type(value) is int and value >= 0:
        return value
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise PartitionError(f"{name}[{i}] must be an integer >= 0 (bytes), got {value!r}")
    return int(value)


def _flag(i: int, value: object) -> bool:
    if value is True or value is False:
        return value
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, Integral) and value in (0, 1)):
        return bool(value)
    raise PartitionError(f"fresh[{i}] must be a bool, got {value!r}")


def _index(i: int, p: object) -> int:
    if type(p) is int and 0 <= p < i:
        return p
    if not isinstance(p, Integral) or isinstance(p, bool) or not 0 <= int(p) < i:
        raise PartitionError(
            f"preds[{i}] contains {p!r}, but predecessors must be node indices in 0..{i - 1}: "
            f"nodes must be listed in topological order"
        )
    return int(p)


def _boundary(i: int, x: object) -> int:
    if not isinstance(x, Integral) or isinstance(x, bool):
        raise PartitionError(f"boundaries[{i}] must be an int, got {x!r}")
    return int(x)


def _n_segments(problem: PartitionProblem, n_segments: object) -> int:
    if not isinstance(n_segments, Integral) or isinstance(n_segments, bool) or int(n_segments) < 1:
        raise PartitionError(f"n_segments must be an int >= 1, got {n_segments!r}")
    m = problem.n_nonfresh
    if int(n_segments) > m:
        raise PartitionError(
            f"n_segments={n_segments} but the problem has only {m} non-fresh nodes; each "
            f"segment needs at least one (fresh nodes are replicated, not placed): use "
            f"n_segments <= {m}"
        )
    return int(n_segments)


def _speeds(speeds: Sequence[float] | None, n_seg: int) -> list[float]:
    if speeds is None:
        return [1.0] * n_seg
    if len(speeds) != n_seg:
        raise PartitionError(
            f"speeds must have one entry per segment ({n_seg}), got {len(speeds)}: {list(speeds)}"
        )
    for k, s in enumerate(speeds):
        if not isinstance(s, Real) or not math.isfinite(s) or s <= 0:
            raise PartitionError(f"speeds[{k}] must be a finite number > 0, got {s!r}")
    return [float(s) for s in speeds]


def _link(bandwidth: float | None, latency: float) -> None:
    if bandwidth is not None and (not isinstance(bandwidth, Real) or not bandwidth > 0):
        raise PartitionError(
            f"bandwidth must be > 0 bytes per ms (None or inf for free transfers), got {bandwidth!r}"
        )
    if not isinstance(latency, Real) or not math.isfinite(latency) or latency < 0:
        raise PartitionError(f"link_latency_ms must be a finite number >= 0, got {latency!r}")


def _memory_caps(caps: Sequence[int | None] | None, n_seg: int) -> list[int | None]:
    if caps is None:
        return [None] * n_seg
    if len(caps) != n_seg:
        raise PartitionError(
            f"memory_caps must have one entry per segment ({n_seg}), got {len(caps)}: {list(caps)}"
        )
    for k, c in enumerate(caps):
        if c is not None and (not isinstance(c, Integral) or isinstance(c, bool) or c < 0):
            raise PartitionError(f"memory_caps[{k}] must be None or an int >= 0, got {c!r}")
    return [None if c is None else int(c) for c in caps]
