"""Extrapolated stale values (runtime/extrapolation.py): the rule, the reference schedule step by step, the plan field.

That the ranks read them the same way is tests/test_runtime.py's (the EXTRAPOLATED cases).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_captured, tiny_profile

from asyncdiff_partition.core.errors import PlanError
from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import Plan, format_plan, make_plan
from asyncdiff_partition.core.schedule import ScheduleError, check_extrapolation
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.runtime.extrapolation import StaleHistory, extrapolate
from asyncdiff_partition.runtime.reference import ReferenceSchedule

MODEL = "tiny-unet2d-condition"
TIMESTEPS = [900, 700, 500, 300, 100]


def test_history_extrapolates_only_from_the_two_previous_steps():
    history = StaleHistory(0.5)
    history.put("v", torch.tensor([1.0, 2.0]), made=0)
    assert torch.equal(history.read("v", 1), torch.tensor([1.0, 2.0]))  # one version: plain
    history.put("v", torch.tensor([3.0, 2.0]), made=1)
    assert torch.equal(history.read("v", 2), torch.tensor([4.0, 2.0]))  # 3 + 0.5 (3 - 1), 2 + 0.5 (2 - 2)
    assert torch.equal(history.read("v", 3), torch.tensor([3.0, 2.0]))  # two steps old: plain
    assert torch.equal(history.newest("v"), torch.tensor([3.0, 2.0]))
    history.put("v", torch.tensor([5.0, 0.0]), made=3)  # a gap (made 3 after 1): plain
    assert torch.equal(history.read("v", 4), torch.tensor([5.0, 0.0]))
    plain = StaleHistory(0.0)
    plain.put("v", torch.tensor([1.0]), made=0)
    plain.put("v", torch.tensor([3.0]), made=1)
    assert torch.equal(plain.read("v", 2), torch.tensor([3.0]))


def test_extrapolate_goes_leaf_by_leaf_and_leaves_integers_alone():
    newest = (torch.tensor([2.0]), [torch.tensor([4], dtype=torch.int64)], {"a": torch.tensor([1.0])}, 7)
    older = (torch.tensor([1.0]), [torch.tensor([0], dtype=torch.int64)], {"a": torch.tensor([3.0])}, 6)
    got = extrapolate(newest, older, 1.0)
    assert torch.equal(got[0], torch.tensor([3.0])) and torch.equal(got[1][0], torch.tensor([4]))
    assert isinstance(got[1], list) and torch.equal(got[2]["a"], torch.tensor([-1.0])) and got[3] == 7


@pytest.mark.parametrize("factor, stride, message", [
    (-0.1, 1, "between 0 .* and 1, got -0.1"), (1.5, 1, "between 0 .* and 1, got 1.5"),
    (0.5, 2, "extrapolation needs stride 1"),
])
def test_bad_factors_are_refused(factor, stride, message):
    with pytest.raises(ScheduleError, match=message):
        check_extrapolation(factor, stride)
    with pytest.raises(PlanError, match=message):
        make_plan(tiny_profile(MODEL), 2, stride=stride, extrapolation=factor)
    check_extrapolation(0.0, 2)


def _feed(captured):
    return {spec.name: t for spec, t in zip(captured.inputs, captured.example)}


def test_reference_schedule_reads_extrapolated_values_step_by_step():
    """N = 2, W = 1: segment 1 at step s >= 2 reads v(s-1) + λ (v(s-1) - v(s-2)) of segment 0's values."""
    captured = tiny_captured(MODEL)
    plan = make_plan(tiny_profile(MODEL), 2, warmup=1, steps=len(TIMESTEPS))
    first, second = split_graph(captured, place(build_op_graph(captured), plan.boundaries))
    feed = _feed(captured)
    factor = 0.5
    schedule = ReferenceSchedule([first, second], warmup=1, extrapolation=factor)
    schedule.reset(TIMESTEPS)
    made = []
    with torch.no_grad():
        for s, t in enumerate(TIMESTEPS):
            inputs = dict(feed, timestep=torch.full_like(feed["timestep"], t))
            eps = schedule(inputs)
            values = dict(zip(first.outputs, first.module(*[inputs[n] for n in first.inputs])))
            made.append(values)
            if s == 0:
                read = values
            elif s == 1:
                read = made[0]
            else:
                read = {k: made[s - 1][k] + factor * (made[s - 1][k] - made[s - 2][k]) for k in second.receives}
            want = dict(zip(second.outputs, second.module(*[inputs[n] for n in second.inputs],
                                                          *[read[n] for n in second.receives])))
            assert torch.equal(eps, want[OUTPUT]), f"step {s}"
    plain = ReferenceSchedule([first, second], warmup=1)
    assert plain.extrapolation == 0.0


def test_extrapolation_zero_is_the_plain_schedule_and_exact_steps_are_untouched():
    captured = tiny_captured(MODEL)
    plan = make_plan(tiny_profile(MODEL), 2, warmup=1, steps=len(TIMESTEPS))
    segments = split_graph(captured, place(build_op_graph(captured), plan.boundaries))
    feed = _feed(captured)

    def run(**options):
        schedule = ReferenceSchedule(segments, **options)
        schedule.reset(TIMESTEPS)
        with torch.no_grad():
            return [schedule(dict(feed, timestep=torch.full_like(feed["timestep"], t))) for t in TIMESTEPS]

    plain, zero = run(warmup=1), run(warmup=1, extrapolation=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert all(torch.equal(a, b) for a, b in zip(run(warmup=len(TIMESTEPS)), run(warmup=len(TIMESTEPS), extrapolation=1.0)))
    moved = run(warmup=1, extrapolation=1.0)
    assert torch.equal(moved[1], plain[1]) and not torch.equal(moved[2], plain[2])


def test_plan_field_round_trips_and_old_files_read_as_zero(tmp_path):
    profile = tiny_profile(MODEL)
    plan = make_plan(profile, 2, extrapolation=0.5)
    assert plan.extrapolation == 0.5 and "+ 0.5 (v(s-1) - v(s-2))" in format_plan(plan)
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["extrapolation"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Plan.load(tmp_path / "old.json").extrapolation == 0.0
    for bad, rule in ((1.5, "between 0"), ("half", "must be a number")):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "extrapolation": bad}))
        with pytest.raises(PlanError, match=f"bad.json.*extrapolation.*{rule}"):
            Plan.load(tmp_path / "bad.json")
    stride2 = dataclasses.replace(make_plan(profile, 2, stride=2), extrapolation=0.5).to_dict()
    (tmp_path / "s2.json").write_text(json.dumps(stride2))
    with pytest.raises(PlanError, match="extrapolation needs stride 1"):
        Plan.load(tmp_path / "s2.json")
