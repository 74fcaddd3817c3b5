"""Runtime: real processes (gloo, through launch) reproduce the reference schedule, keep only
their own segment, fail fast and clearly."""

from __future__ import annotations

import dataclasses
import functools
import pickle
import re
import time

import _dist_worker as worker
import pytest
import torch
import torch.utils._pytree as pytree
from conftest import tiny_captured

from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import Plan, PlanError, make_plan
from asyncdiff_partition.core.schedule import slot_segment
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.ready import check_plan
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.runtime.launch import LaunchError, is_launched_externally, launch
from asyncdiff_partition.runtime.reference import ReferenceSchedule, UnsplitDenoiser

MODELS = ["tiny-unet2d-condition", "tiny-dit"]
TIMESTEPS = [900, 650, 400, 150]
# W = 0 (runs like W = 1): with T = 4 it gives round, reuse, tail for stride 2; W = 2 one round;
# W = T every step a warm-up step.
CASES = [{"warmup": 0, "time_shift": False}, {"warmup": 2, "time_shift": False},
         {"warmup": len(TIMESTEPS), "time_shift": False}, {"warmup": 0, "time_shift": True}]
# Stride 1 also reads its stale values extrapolated (Note [extrapolation]); with T = 4 and W = 1
# step 1 reads plainly and steps 2-3 extrapolate.
EXTRAPOLATED = [{"warmup": 0, "time_shift": False, "extrapolation": 0.5},
                {"warmup": 1, "time_shift": True, "extrapolation": 1.0}]
LAUNCHES = {2: [(2, 1)], 3: [(3, 1), (2, 2)], 4: [(3, 2)]}  # world size -> (N, stride) plans


@functools.cache
def _plan(name: str, n: int, stride: int) -> Plan:
    return make_plan(_profile(name), n, stride=stride, warmup=1, steps=len(TIMESTEPS))


@functools.cache
def _profile(name: str):
    return profile_model(tiny_captured(name), model_name=name, warmup=0, repeats=1)


@functools.cache
def _blob(name: str) -> bytes:
    return pickle.dumps(tiny_captured(name))


@functools.cache
def _chunk_model():
    model = worker.ChunkNet().eval()
    captured = capture_model(model, (torch.randn(2, 8), torch.full((2,), 900)), methods=("fx",))
    nodes = list(captured.graph_module.graph.nodes)
    chunk = next(i for i, n in enumerate(nodes) if n.target is torch.chunk)
    plan = make_plan(profile_model(captured, model_name="chunk", warmup=0, repeats=1), 2)
    return captured, dataclasses.replace(plan, boundaries=[0, chunk + 1, len(nodes)])


def _jobs(world: int) -> list[dict]:
    jobs = []
    for name in MODELS:
        for n, stride in LAUNCHES[world]:
            jobs.append({"key": f"{name} N{n} S{stride}", "model": name, "plan": _plan(name, n, stride),
                         "cases": CASES + EXTRAPOLATED if stride == 1 else CASES})
    if world == 2:
        unet, dit = MODELS
        jobs.append({"key": "chunk", "model": "chunk", "plan": _chunk_model()[1], "cases": CASES[:2]})
        jobs.append({"key": "other model", "model": unet, "plan": _plan(dit, 2, 1), "expect_error": True})
        jobs.append({"key": "wrong world", "model": dit, "plan": _plan(dit, 3, 1), "expect_error": True})
        other = _plan(dit, 2, 1)
        other = dataclasses.replace(other, boundaries=[0, other.boundaries[1] + 1, other.boundaries[2]])
        jobs.append({"key": "ranks disagree", "model": dit, "plan": _plan(dit, 2, 1), "plan_rank1": other,
                     "expect_error": True})
    return jobs


@functools.cache
def _launched(world: int) -> dict[int, dict]:
    blobs = {name: _blob(name) for name in MODELS}
    if world == 2:
        blobs["chunk"] = pickle.dumps(_chunk_model()[0])
    return launch(worker.run_jobs, (blobs, _jobs(world), TIMESTEPS), world, timeout_s=60)


def _captured(model: str):
    return _chunk_model()[0] if model == "chunk" else tiny_captured(model)


@functools.cache
def _segments(model: str, boundaries: tuple[int, ...]):
    captured = _captured(model)
    return split_graph(captured, place(build_op_graph(captured), list(boundaries)))


def _reference(model: str, plan: Plan, case: dict):
    captured = _captured(model)
    feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    schedule = ReferenceSchedule(_segments(model, tuple(plan.boundaries)), stride=plan.stride, **case)
    with torch.no_grad():
        return worker.sample(schedule, feed, captured.latent.name, TIMESTEPS)


@pytest.mark.parametrize("world", sorted(LAUNCHES))
def test_every_rank_gets_the_reference_eps(world):
    results = _launched(world)
    assert sorted(results) == list(range(world))
    for job in _jobs(world):
        if job.get("expect_error"):
            continue
        for i, case in enumerate(job["cases"]):
            eps, x = _reference(job["model"], job["plan"], case)
            for rank, out in results.items():
                run = out[job["key"]]["runs"][i]
                where = f"{job['key']} {case} rank {rank}"
                assert len(run["eps"]) == len(TIMESTEPS)
                for step, (got, want) in enumerate(zip(run["eps"], eps)):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{where} step {step}")
                torch.testing.assert_close(run["x"], x, rtol=1e-5, atol=1e-6, msg=where)


@pytest.mark.parametrize("world", sorted(LAUNCHES))
def test_each_rank_keeps_only_its_segment(world):
    results = _launched(world)
    for job in _jobs(world):
        if job.get("expect_error") or job["model"] == "chunk":
            continue
        plan = job["plan"]
        segments = _segments(job["model"], tuple(plan.boundaries))
        for rank, out in results.items():
            kept = out[job["key"]]
            k = slot_segment(rank, plan.n_devices)
            assert kept["segment"] == k
            # What the plan charges to the segment, or (where larger) what the segment's module
            # holds: the plan charges a weight two segments use to the first one only (DiT's
            # final layer runs block 0's embedder again), but both need it.
            module = segments[k].module
            holds = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                        [*module.parameters(), *module.buffers()]}.values())
            share = max(plan.segments[k].param_bytes, holds)
            assert kept["resident"] <= 1.1 * share, (job["key"], rank, kept["resident"], share)
            assert kept["resident_full"] >= _profile(job["model"]).peak_memory["param_bytes"]  # sanity


def test_report_and_spans():
    out = _launched(2)[1][f"{MODELS[1]} N2 S1"]["runs"][0]
    assert [r["step"] for r in out["report"]] == list(range(len(TIMESTEPS)))
    assert all(r["rank"] == 1 and r["compute_ms"] > 0 for r in out["report"])
    assert sum(r["bytes_sent"] for r in out["report"]) > 0  # rank 1 broadcasts ε
    names = {s["name"] for s in out["spans"]}
    assert {"compute", "wait", "broadcast"} <= names
    assert all(s["start_s"] <= s["end_s"] for s in out["spans"])


def test_bad_plans_fail_on_every_rank_before_any_compute():
    results = _launched(2)
    for out in results.values():
        assert "PlanError" in out["other model"] and "fingerprint" in out["other model"]
        assert "needs N + stride - 1 = 3 ranks, but this run has 2" in out["wrong world"]
        # rank 1 read another plan: one clear error on every rank, naming both placements, no hang
        assert out["ranks disagree"].startswith("PlanError: the ranks do not run the same plan: rank 0 has")
        assert "but rank 1 has" in out["ranks disagree"]


def test_check_plan_messages(tmp_path):
    unet, dit = MODELS
    captured = tiny_captured(dit)
    check_plan(captured, _plan(dit, 2, 1), world_size=2)
    check_plan(captured, _plan(dit, 2, 1), world_size=3, stride=2)
    with pytest.raises(PlanError, match="needs N \\+ stride - 1 = 3 ranks"):
        check_plan(captured, _plan(dit, 2, 2), world_size=2)
    with pytest.raises(PlanError, match="another model: its graph has"):
        check_plan(captured, _plan(unet, 2, 1), world_size=2)
    # a plan whose profile was made with another batch size
    profile = _profile(dit)
    other = dataclasses.replace(profile, inputs=[dict(i, shape=[3, *i["shape"][1:]]) for i in profile.inputs],
                                fingerprint="0" * 16)
    path = other.save(tmp_path / "other.json")
    plan = make_plan(other, 2, profile_path=str(path))
    with pytest.raises(PlanError, match=r"input shapes differ .*hidden_states \(3, 4, 16, 16\) -> \(2, 4, 16, 16\)"):
        check_plan(captured, plan, world_size=2)


def test_fake_tensor_shape_pass_matches_the_real_one(monkeypatch):
    # models over REAL_PASS_BYTES of weights get their shapes and layouts from fake tensors
    from asyncdiff_partition.fx import opgraph
    from asyncdiff_partition.fx.ready import ready_segments

    name = MODELS[1]
    captured = pickle.loads(_blob(name))  # a copy: the pass writes node.meta
    real = ready_segments(captured, _plan(name, 3, 1), world_size=3)
    monkeypatch.setattr(opgraph, "REAL_PASS_BYTES", 0)
    monkeypatch.setattr(torch.fx.Interpreter, "run_node", _no_real_compute(torch.fx.Interpreter.run_node))
    fake = ready_segments(captured, _plan(name, 3, 1), world_size=3)
    assert [s.layouts for s in fake] == [s.layouts for s in real]
    assert real[2].layouts.keys() == {*real[2].receives, "output"} and real[2].receives


def _no_real_compute(run_node):
    from torch._subclasses.fake_tensor import FakeTensor

    def checked(self, node):
        result = run_node(self, node)
        if node.op == "call_function":
            assert all(isinstance(t, FakeTensor) for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor))
        return result

    return checked


def test_a_failing_rank_stops_the_run_with_its_error():
    captured, plan = _chunk_model()
    begin = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch(worker.fail_at, (pickle.dumps(captured), plan, TIMESTEPS, 1, 2), 2, timeout_s=20)
    elapsed = time.monotonic() - begin
    message = str(failure.value)
    assert failure.value.rank == 1
    assert message.startswith("rank 1 failed: RuntimeError: injected failure in segment 1"), message
    assert "\n" not in message
    assert elapsed < 60


def test_a_hanging_rank_is_a_timeout_on_its_peers():
    captured, plan = _chunk_model()
    begin = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch(worker.fail_at, (pickle.dumps(captured), plan, TIMESTEPS, 1, 1, "hang"), 2, timeout_s=5)
    message = str(failure.value)
    assert failure.value.rank == 0
    assert message.startswith("rank 0 failed: PeerError: rank 0: waiting for ε of step 1 from rank 1"), message
    assert time.monotonic() - begin < 40


def test_a_killed_rank_stops_the_run():
    captured, plan = _chunk_model()
    begin = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch(worker.fail_at, (pickle.dumps(captured), plan, TIMESTEPS, 1, 2, "kill"), 2, timeout_s=30)
    message = str(failure.value)
    assert "\n" not in message
    # Rank 1 left no error behind (SIGKILL); its peer either lost it or was stopped by the agent.
    assert message.startswith(("rank 1 failed: exit code -9", "rank 0 failed: PeerError")), message
    assert time.monotonic() - begin < 60


def test_workers_that_die_before_their_entry_point_fail_fast():
    begin = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch(worker.run_jobs, (worker.Unloadable(), [], TIMESTEPS), 2, timeout_s=30)
    # Both ranks die on unpickling; whichever the launcher sees first is named (the other may be
    # killed by its watchdog first), so the line names rank 0 or rank 1, with the exit code.
    assert re.match(r"rank [01] failed: exit code 1", str(failure.value)), str(failure.value)
    assert time.monotonic() - begin < 30


def test_launch_arguments():
    assert not is_launched_externally()
    with pytest.raises(ValueError, match="fixed port"):
        launch(worker.run_jobs, (), 2, nnodes=2)
    with pytest.raises(ValueError, match="host:port"):
        launch(worker.run_jobs, (), 2, rdzv_endpoint="localhost")


def test_one_rank_in_this_process_is_the_unsplit_model(monkeypatch):
    from asyncdiff_partition.fx.ready import ready_segments
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser
    from asyncdiff_partition.runtime.launch import _free_port

    name = MODELS[1]
    captured = tiny_captured(name)
    plan = make_plan(_profile(name), 1)
    (segment,) = ready_segments(captured, plan, world_size=1)
    names, latent = [s.name for s in captured.inputs], captured.latent.name
    with pytest.raises(RuntimeError, match="comm.init"):
        AsyncDenoiser(segment, plan, input_names=names, latent=latent)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port("127.0.0.1")))
    assert is_launched_externally()
    assert comm.init(timeout_s=20) == (0, 1, torch.device("cpu"))
    try:
        with pytest.raises(PlanError, match="made for model fingerprint"):
            AsyncDenoiser(dataclasses.replace(segment, fingerprint="0" * 16), plan, input_names=names, latent=latent)
        denoiser = AsyncDenoiser(segment, plan, warmup=0, input_names=names, latent=latent)
        feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
        with torch.no_grad():
            got = worker.sample(denoiser, feed, captured.latent.name, TIMESTEPS)
            want = worker.sample(UnsplitDenoiser(captured), feed, captured.latent.name, TIMESTEPS)
        for a, b in zip(got[0], want[0]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        with pytest.raises(ValueError, match="needs model inputs"):
            denoiser.reset(TIMESTEPS)
            denoiser({"timestep": torch.full_like(feed["timestep"], TIMESTEPS[0])})
    finally:
        comm.shutdown()


def test_spawned_ranks_of_run_build_no_op_graph_and_split_nothing(tmp_path):
    """`run` compiles the plan once in the launching process; each rank loads its finished segment."""
    from conftest import tiny_profile

    from asyncdiff_partition.app.job import run_plan
    from asyncdiff_partition.app.report import load_report
    from asyncdiff_partition.app.settings import RunConfig

    plan_path = make_plan(tiny_profile("tiny-dit"), 2, steps=2, warmup=1).save(tmp_path / "plan.json")
    result = run_plan(RunConfig(model=None, plan=str(plan_path), out_dir=str(tmp_path / "run"), timeout_s=120,
                                progress=False))
    meta = load_report(result["report"])["meta"]
    assert meta["ranks_reported"] == [0, 1] and meta["runtime"] == "torch"
    assert meta["compiler_counts_per_rank"] == [{"op_graphs": 0, "placements": 0, "splits": 0}] * 2
    assert meta["launcher_compiler_counts"] == {"op_graphs": 1, "placements": 1, "splits": 1}


def test_run_samples_a_hybrid_plan_on_batch_groups_like_its_reference(tmp_path):
    """`run` with a B = 2 plan (CFG-parallel, one segment per group): each rank captures one batch
    group's rows and runs a HybridDenoiser; the images are the reference schedule's."""
    import numpy as np
    from conftest import tiny
    from PIL import Image

    from asyncdiff_partition.app.job import run_plan
    from asyncdiff_partition.app.report import load_report
    from asyncdiff_partition.app.settings import RunConfig
    from asyncdiff_partition.core.hybrid_plan import make_hybrid_plan
    from asyncdiff_partition.fx.capture import capture_model
    from asyncdiff_partition.fx.profiler import profile_model
    from asyncdiff_partition.pipelines import zoo

    name = "tiny-unet2d-condition"
    model, _ = tiny(name)
    profiles = {}
    for rows in (2, 1):
        inputs = zoo.example_inputs(model, batch=rows)
        captured = capture_model(model, inputs.args, inputs.kwargs, latent=inputs.latent)
        profiles[rows] = profile_model(captured, model_name=name, warmup=0, repeats=1)
        profiles[rows].save(tmp_path / f"b{rows}.json")
    choice = make_hybrid_plan(profiles[2], 2, sliced=profiles[1], batch_parallel=2, steps=3, warmup=1,
                              profile_path=str(tmp_path / "b2.json"), sliced_path=str(tmp_path / "b1.json"))
    plan_path = choice.plan.save(tmp_path / "plan.json")
    assert choice.plan.batch_parallel == 2 and choice.plan.world_size == 2
    common = dict(model=None, plan=str(plan_path), timeout_s=120, progress=False, guidance=5.0)
    ranks = run_plan(RunConfig(**common, out_dir=str(tmp_path / "ranks")))
    reference = run_plan(RunConfig(**common, reference=True, out_dir=str(tmp_path / "reference")))
    assert load_report(ranks["report"])["meta"]["ranks_reported"] == [0, 1]
    assert len(ranks["images"]) == len(reference["images"]) == 1
    for got, want in zip(ranks["images"], reference["images"]):
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (got, want))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
