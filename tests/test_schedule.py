"""Schedule: the step table, and the single-process reference against the unsplit model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_captured

from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.schedule import (
    ScheduleError,
    check_stride,
    decided_ahead,
    exact_mask,
    make_schedule,
    n_slots,
    readers,
    slot_segment,
    world_size,
)
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import Segment, split_graph
from asyncdiff_partition.runtime.reference import ReferenceSchedule

# --- the table ------------------------------------------------------------------------------


def _phases(table):
    return [s.phase for s in table]


def test_stride_1_table():
    table = make_schedule(3, 5, warmup=2)
    assert _phases(table) == ["warmup", "warmup", "async", "async", "async"]
    for step in table:
        assert [(w.slot, w.segment, w.timestep) for w in step.work] == [(k, k, step.index) for k in range(3)]
        assert step.eps == (2, step.index)
    shifted = make_schedule(3, 5, warmup=2, time_shift=True)
    assert [[w.timestep for w in s.work] for s in shifted] == [[0] * 3, [1] * 3, [1] * 3, [2] * 3, [3] * 3]


def test_stride_2_table_pairs_steps_and_ends_with_a_tail():
    table = make_schedule(2, 6, warmup=1, stride=2)
    assert _phases(table) == ["warmup", "round", "reuse", "round", "reuse", "tail"]
    rows = [[(w.slot, w.segment, w.timestep) for w in s.work] for s in table]
    assert rows == [
        [(0, 0, 0), (1, 1, 0)],
        [(0, 0, 2), (1, 1, 2), (2, 1, 1)],  # main slots a step ahead, extra slot on t_s
        [],
        [(0, 0, 4), (1, 1, 4), (2, 1, 3)],
        [],
        [(0, 0, 5), (1, 1, 5)],  # the odd step left over: like a stride-1 step
    ]
    assert [s.eps for s in table] == [(1, 0), (2, 1), (1, 1), (2, 3), (1, 3), (1, 5)]
    shifted = make_schedule(2, 6, warmup=1, stride=2, time_shift=True)
    assert [[w.timestep for w in s.work] for s in shifted] == [[0, 0], [1, 1, 0], [], [3, 3, 2], [], [4, 4]]
    # an even number of steps after the warm-up: no tail
    assert _phases(make_schedule(3, 5, warmup=1, stride=2)) == ["warmup", "round", "reuse", "round", "reuse"]


@pytest.mark.parametrize("stride", [1, 2])
def test_warmup_edges(stride):
    # W = 0 runs like W = 1 (nothing stale to read at step 0); W >= T is all warm-up
    assert make_schedule(3, 6, warmup=0, stride=stride) == make_schedule(3, 6, warmup=1, stride=stride)
    assert _phases(make_schedule(3, 4, warmup=9, stride=stride)) == ["warmup"] * 4
    assert make_schedule(3, 0, warmup=1, stride=stride) == []


def test_stride_2_every_slot_computes_once_per_two_steps():
    for n in (1, 2, 3, 4):
        for steps in range(1, 12):
            for warmup in range(0, 4):
                table = make_schedule(n, steps, warmup=warmup, stride=2)
                after = [s for s in table if not s.chained]
                slots = [w.slot for s in after for w in s.work]
                tails = sum(s.phase == "tail" for s in after)
                assert tails == (len(after) % 2)
                for slot in range(n_slots(n, 2)):
                    expected = len(after) // 2 + (tails if slot < n else 0)
                    assert slots.count(slot) == expected, (n, steps, warmup, slot)
                for s in table:
                    assert all(w.segment == slot_segment(w.slot, n) for w in s.work)
                    assert s.eps[1] <= s.index


def test_readers():
    table = make_schedule(2, 5, warmup=2, stride=2)  # warmup warmup round reuse tail
    slots = lambda i: sorted({w.slot for w in readers(table, i)})  # noqa: E731
    assert slots(0) == [0, 1]  # the chain of step 0 only
    assert slots(1) == [0, 1, 2]  # the chain, and the round after it (extra slot included)
    assert slots(2) == [0, 1]  # the round -> the tail (no extra slot there)
    assert slots(3) == []  # nothing computed
    assert slots(4) == []  # the last step


def test_bad_arguments():
    for kwargs in ({"warmup": -1}, {"warmup": 1, "stride": 3}):
        with pytest.raises(ScheduleError):
            make_schedule(2, 5, **kwargs)
    with pytest.raises(ScheduleError):
        make_schedule(0, 5, warmup=1)


# --- the reference on a toy model that records what it saw -----------------------------------


class _Recorder(torch.nn.Module):
    """Segment k: its received records, then the row (k, latent value, timestep value)."""

    def __init__(self, k: int, last: bool):
        super().__init__()
        self.k, self.last = k, last

    def forward(self, sample, timestep, *received):
        row = torch.tensor([[self.k, sample.flatten()[0].item(), timestep.flatten()[0].item()]])
        return (torch.cat([*received, row]),)


def _toy(n: int, skip: bool = False) -> list[Segment]:
    """N recorder segments in a chain; with ``skip``, the last one also reads segment 0."""
    segments = []
    for k in range(n):
        receives = [f"h{k - 1}"] if k else []
        if skip and k == n - 1 and k > 1:
            receives = ["h0", *receives]
        segments.append(Segment(k, _Recorder(k, k == n - 1), ["sample", "timestep"], receives,  # type: ignore[arg-type]
                                [OUTPUT] if k == n - 1 else [f"h{k}"], []))
    return segments


T = [10, 11, 12, 13, 14, 15]  # t_i = 10 + i


def _records(schedule, steps):
    """ε of every step as rows (segment, step whose latent it saw, index of the timestep)."""
    schedule.reset(T[:steps])
    out = []
    for s in range(steps):  # the latent of step s is the number s
        eps = schedule({"sample": torch.full((1,), float(s)), "timestep": torch.full((2,), T[s])})
        out.append([(int(k), int(x), int(t) - 10) for k, x, t in eps.tolist()])
    return out


def test_reference_stride_1_staleness_pyramid():
    got = _records(ReferenceSchedule(_toy(3), warmup=2), 5)
    assert got == [
        [(0, 0, 0), (1, 0, 0), (2, 0, 0)],
        [(0, 1, 1), (1, 1, 1), (2, 1, 1)],
        [(0, 1, 1), (1, 1, 1), (2, 2, 2)],  # async from here: each segment reads the previous step
        [(0, 1, 1), (1, 2, 2), (2, 3, 3)],
        [(0, 2, 2), (1, 3, 3), (2, 4, 4)],
    ]
    shifted = _records(ReferenceSchedule(_toy(3), warmup=2, time_shift=True), 5)
    assert shifted[2:] == [
        [(0, 1, 1), (1, 1, 1), (2, 2, 1)],
        [(0, 1, 1), (1, 2, 1), (2, 3, 2)],
        [(0, 2, 1), (1, 3, 2), (2, 4, 3)],
    ]


def test_reference_reads_every_value_from_the_previous_step():
    # segment 2 reads h0 directly (one step old) and through segment 1 (two steps old)
    got = _records(ReferenceSchedule(_toy(3, skip=True), warmup=1), 4)
    assert got[2] == [(0, 1, 1), (0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert got[3] == [(0, 2, 2), (0, 1, 1), (1, 2, 2), (2, 3, 3)]


def test_reference_stride_2():
    got = _records(ReferenceSchedule(_toy(2), warmup=1, stride=2), 6)
    assert got == [
        [(0, 0, 0), (1, 0, 0)],
        [(0, 0, 0), (1, 1, 1)],  # extra slot: latent x1, t1, stale values of the warm-up step
        [(0, 0, 0), (1, 1, 2)],  # reused: main slots' round at x1 with t2
        [(0, 1, 2), (1, 3, 3)],
        [(0, 1, 2), (1, 3, 4)],
        [(0, 3, 4), (1, 5, 5)],  # tail: a stride-1 step on the last round's values
    ]
    shifted = _records(ReferenceSchedule(_toy(2), warmup=1, stride=2, time_shift=True), 6)
    assert shifted == [
        [(0, 0, 0), (1, 0, 0)],
        [(0, 0, 0), (1, 1, 0)],
        [(0, 0, 0), (1, 1, 1)],
        [(0, 1, 1), (1, 3, 2)],
        [(0, 1, 1), (1, 3, 3)],
        [(0, 3, 3), (1, 5, 4)],
    ]
    # 3 warm-up steps of 6 leave 3: a round (reading the last warm-up step), its reuse, a tail
    got = _records(ReferenceSchedule(_toy(3), warmup=3, stride=2), 6)
    assert got[3] == [(0, 2, 2), (1, 2, 2), (2, 3, 3)]
    assert got[4] == [(0, 2, 2), (1, 2, 2), (2, 3, 4)]
    assert got[5] == [(0, 2, 2), (1, 3, 4), (2, 5, 5)]


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_warmup_covering_every_step_is_sequential(stride):
    got = _records(ReferenceSchedule(_toy(3), warmup=6, stride=stride), 6)
    assert got == [[(k, s, s) for k in range(3)] for s in range(6)]


def test_reference_checks_the_call_order():
    schedule = ReferenceSchedule(_toy(2), warmup=1)
    feed = {"sample": torch.zeros(1), "timestep": torch.full((2,), 10)}
    with pytest.raises(ScheduleError, match="reset"):
        schedule(feed)
    schedule.reset([10])
    schedule(feed)
    with pytest.raises(ScheduleError, match="reset"):
        schedule(feed)
    schedule.reset([10, 11])
    with pytest.raises(ScheduleError, match="timesteps\\[0\\] = 10"):
        schedule({"sample": torch.zeros(1), "timestep": torch.full((2,), 99)})
    with pytest.raises(ScheduleError, match="timestep_input"):
        ReferenceSchedule(_toy(2), warmup=1, stride=2, timestep_input="t")


# --- the reference on a real model -----------------------------------------------------------

NAME = "tiny-dit"
STEPS = 5


@functools.cache
def _model():
    captured = tiny_captured(NAME)
    graph = build_op_graph(captured)
    stale = [i for i, n in enumerate(graph.order) if graph.node(n)["kind"] == "op" and not graph.fresh[i]]
    n = len(graph)
    splits = {1: [0, n], 2: [0, stale[len(stale) // 2], n], 3: [0, stale[len(stale) // 3], stale[2 * len(stale) // 3], n]}
    return captured, {k: split_graph(captured, place(graph, b)) for k, b in splits.items()}


def _ddim_loop(denoise):
    """A real DDIM loop (diffusers' scheduler); ``denoise(inputs) -> eps``; returns (eps list, x)."""
    from diffusers import DDIMScheduler

    captured, _ = _model()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    x = feed["hidden_states"].clone()
    history = []
    if hasattr(denoise, "reset"):
        denoise.reset(scheduler.timesteps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = denoise(dict(feed, hidden_states=x, timestep=t.expand(2)))
            history.append(eps)
            x = scheduler.step(eps[:, :4], t, x).prev_sample  # DiT learns sigma: 8 channels out
    return history, x


def _unsplit(inputs):
    captured, _ = _model()
    return captured.graph_module(*[inputs[spec.name] for spec in captured.inputs])


def _close(a, b, exact=True):
    eps_a, x_a = a
    eps_b, x_b = b
    tol = {"atol": 0, "rtol": 0} if exact else {}
    for i, (p, q) in enumerate(zip(eps_a, eps_b)):
        torch.testing.assert_close(p, q, msg=f"step {i}", **tol)
    torch.testing.assert_close(x_a, x_b, **tol)


@pytest.mark.parametrize("stride", [1, 2])
def test_full_warmup_equals_the_unsplit_model(stride):
    _, splits = _model()
    expected = _ddim_loop(_unsplit)
    for n in (2, 3):
        _close(_ddim_loop(ReferenceSchedule(splits[n], warmup=STEPS, stride=stride)), expected)


def test_one_segment_is_the_unsplit_model():
    _, splits = _model()
    expected = _ddim_loop(_unsplit)
    for warmup in (0, 1, 3):
        _close(_ddim_loop(ReferenceSchedule(splits[1], warmup=warmup)), expected)


@pytest.mark.parametrize("stride", [1, 2])
def test_async_differs_from_sequential_but_is_deterministic(stride):
    _, splits = _model()
    expected = _ddim_loop(_unsplit)
    first = _ddim_loop(ReferenceSchedule(splits[2], warmup=1, stride=stride))
    again = _ddim_loop(ReferenceSchedule(splits[2], warmup=1, stride=stride))
    _close(first, again)
    torch.testing.assert_close(first[0][0], expected[0][0], atol=0, rtol=0)  # the warm-up step is exact
    assert (first[1] - expected[1]).abs().max() > 1e-4  # stale values change the result


# --- phases: a per-step exactness mask (Note [phases]) -------------------------------------

def test_fixed_async_window_table():
    table = make_schedule(2, 6, warmup=1, exact=[True, True, False, False, True, True])
    assert _phases(table) == ["warmup", "warmup", "async", "async", "exact", "exact"]
    assert [s.chained for s in table] == [True, True, False, False, True, True]
    stride2 = make_schedule(2, 7, warmup=1, stride=2, exact=[True, False, False, True, False, False, False])
    assert _phases(stride2) == ["warmup", "round", "reuse", "exact", "round", "reuse", "tail"]
    # step 0 is exact whatever the mask says; the default mask is the warm-up
    assert make_schedule(3, 5, warmup=0, exact=[False] * 5) == make_schedule(3, 5, warmup=1)
    assert make_schedule(3, 5, warmup=2, exact=exact_mask(5, warmup=2)) == make_schedule(3, 5, warmup=2)
    with pytest.raises(ScheduleError, match="one per step"):
        make_schedule(2, 5, warmup=1, exact=[True] * 4)
    with pytest.raises(ScheduleError, match="start"):
        exact_mask(5, warmup=1, async_steps=(3, 2))
    assert exact_mask(4, warmup=1, async_steps=(2, 9)) == [True, True, False, False]


def test_world_size_is_groups_times_slots():
    assert [world_size(n, s, b) for n, s, b in [(2, 1, 1), (1, 1, 2), (2, 1, 2), (2, 2, 2), (3, 2, 1)]] == [2, 2, 4, 6, 4]


def _masks(steps):
    return [[bool(bits >> s & 1) for s in range(steps)] for bits in range(2 ** steps)]


@pytest.mark.parametrize("stride", [1, 2])
def test_every_mask_step_and_its_readers_depend_only_on_the_mask_decided_ahead(stride):
    ahead = decided_ahead(stride)
    for n in (1, 2, 3):
        for steps in range(1, 8):
            for mask in _masks(steps):
                table = make_schedule(n, steps, warmup=1, stride=stride, exact=mask)
                assert [s.index for s in table] == list(range(steps))
                for s in range(steps):
                    known = mask[: s + 1 + ahead]
                    for rest in ([True] * (steps - len(known)), [False] * (steps - len(known))):
                        other = make_schedule(n, steps, warmup=1, stride=stride, exact=known + rest)
                        assert other[: s + 1] == table[: s + 1], (n, mask, s)
                        assert readers(other, s) == readers(table, s), (n, mask, s)
                    assert table[s].chained == (s == 0 or mask[s])
                    assert table[s].eps[1] <= s


def _expected_stride_1(n, mask, steps):
    """ε records by the equations: h_k(s) reads h_{k-1} of step s if step s is exact, else of s - 1."""
    def rec(k, s):
        if k < 0:
            return []
        return rec(k - 1, s if (s == 0 or mask[s]) else s - 1) + [(k, s, s)]

    return [rec(n - 1, s) for s in range(steps)]


def test_reference_follows_every_stride_1_mask_by_the_equations():
    for n in (1, 2, 3):
        for mask in _masks(5):
            window = ReferenceSchedule(_toy(n), warmup=1)
            window.policy.reset = lambda steps, p=window.policy, m=mask: setattr(p, "mask", list(m))  # a fixed mask
            got = _records(window, 5)
            assert got == _expected_stride_1(n, mask, 5), (n, mask)


def test_reference_hand_over_async_to_exact_and_back_stride_2():
    schedule = ReferenceSchedule(_toy(2), warmup=1, stride=2, phases={"kind": "fixed", "async_steps": [1, 3]})
    assert _records(schedule, 6)[:3] == [[(0, 0, 0), (1, 0, 0)], [(0, 0, 0), (1, 1, 1)], [(0, 0, 0), (1, 1, 2)]]
    schedule.policy.reset = lambda steps, p=schedule.policy: setattr(p, "mask", [True, False, False, True, False, False])
    assert _records(schedule, 6) == [
        [(0, 0, 0), (1, 0, 0)],
        [(0, 0, 0), (1, 1, 1)],  # round: the extra slot on x1, t1, the warm-up's values
        [(0, 0, 0), (1, 1, 2)],  # reuse
        [(0, 3, 3), (1, 3, 3)],  # exact again: the whole chain recomputed, nothing stale
        [(0, 3, 3), (1, 4, 4)],  # a round reading the exact step's values
        [(0, 3, 3), (1, 4, 5)],
    ]


def test_fixed_window_with_a_hand_computed_eps():
    schedule = ReferenceSchedule(_toy(3), warmup=1, phases={"kind": "fixed", "async_steps": [2, 4]})
    assert _records(schedule, 6) == [
        [(0, 0, 0), (1, 0, 0), (2, 0, 0)],
        [(0, 1, 1), (1, 1, 1), (2, 1, 1)],
        [(0, 1, 1), (1, 1, 1), (2, 2, 2)],  # async: the exact step 1's values
        [(0, 1, 1), (1, 2, 2), (2, 3, 3)],
        [(0, 4, 4), (1, 4, 4), (2, 4, 4)],  # exact: recomputed, nothing of the async steps left
        [(0, 5, 5), (1, 5, 5), (2, 5, 5)],
    ]
    assert [r["mode"] for r in schedule.policy.record()] == ["exact", "exact", "async", "async", "exact", "exact"]


@pytest.mark.parametrize("stride", [1, 2])
def test_an_all_exact_mask_on_a_real_model_is_the_unsplit_model(stride):
    _, splits = _model()
    exact = ReferenceSchedule(splits[3 - stride + 1], warmup=0, stride=stride,
                              phases={"kind": "fixed", "async_steps": [0, 0]})
    _close(_ddim_loop(exact), _ddim_loop(_unsplit))
    assert {r["mode"] for r in exact.policy.record()} == {"exact"}


def test_the_one_stride_rule_and_world_size():
    assert [check_stride(1), check_stride(2)] == [1, 2]
    assert [n_slots(3, 1), n_slots(3, 2)] == [3, 4]
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ScheduleError, match=f"stride must be 1 or 2 .*got {bad!r}"):
            check_stride(bad)
    with pytest.raises(ScheduleError, match="stride must be 1 or 2"):
        n_slots(2, 3)
