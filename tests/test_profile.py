"""Profiler: real per-node timings, the profile file's round trip and its error paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_captured, tiny_profile

from asyncdiff_partition.core.files import FileFormatError
from asyncdiff_partition.core.profile import SCHEMA_VERSION, Profile, ProfileError, fingerprint
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import NodeTimer, profile_model


def test_every_node_is_timed_and_the_total_is_checked_against_eager():
    profile = tiny_profile()
    graph = profile.op_graph()
    assert len(profile.costs) == len(profile.spread) == len(graph)
    assert all(c >= 0 for c in profile.costs) and all(s >= 0 for s in profile.spread)
    assert profile.repeats == 2 and len(profile.eager_ms["samples"]) == 2
    assert profile.eager_ms["median"] > 0 and profile.node_ms_sum > 0
    # the heavy ops dominate: convolutions cost more than reshapes
    costs = dict(zip(graph.order, profile.costs))
    convs = [costs[n] for n in graph.order if "conv2d" in graph.node(n)["target"]]
    views = [costs[n] for n in graph.order if graph.node(n)["target"].endswith(("view.default", "reshape.default"))]
    assert sorted(convs)[len(convs) // 2] > sorted(views)[len(views) // 2]
    assert 0.2 < profile.accuracy < 5  # reported, not assumed: a sanity range only


def test_profile_records_what_it_was_measured_on():
    profile = tiny_profile()
    assert profile.device == "cpu" and profile.threads == torch.get_num_threads() == 1
    assert profile.dtype == "float32" and profile.device_name
    assert profile.versions["torch"] == torch.__version__ and "diffusers" in profile.versions
    assert [i["name"] for i in profile.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert profile.inputs[0]["latent"] and profile.inputs[0]["shape"] == [2, 4, 16, 16]
    assert profile.peak_memory["param_bytes"] == profile.op_graph().param_bytes
    assert 0 < profile.peak_memory["activation_bytes"] < profile.peak_memory["rss_bytes"]


def test_node_timer_appends_one_time_per_node_per_run():
    captured = tiny_captured("tiny-dit")
    timer = NodeTimer(captured.graph_module)
    with torch.no_grad():
        for _ in range(3):
            out = timer.run(*captured.example)
    torch.testing.assert_close(out, captured.graph_module(*captured.example))
    assert {len(t) for t in timer.times.values()} == {3}


def test_fingerprint_depends_on_structure_and_shapes():
    captured = tiny_captured("tiny-dit")
    graph = build_op_graph(captured)
    specs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "latent": s.is_latent} for s in captured.inputs]
    assert fingerprint(graph, specs) == fingerprint(build_op_graph(captured), specs)
    other = [dict(specs[0], shape=[1, 4, 16, 16]), *specs[1:]]
    assert fingerprint(graph, other) != fingerprint(graph, specs)
    assert tiny_profile().fingerprint != profile_model(captured, model_name="tiny-dit", repeats=1).fingerprint


def test_profile_file_round_trips_exactly(tmp_path):
    profile = tiny_profile()
    path = profile.save(tmp_path / "sub" / "p.json")
    assert Profile.load(path) == profile
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ('{"kind": "profile", "schema_version": 1, "model": ', "corrupt or truncated"),
        ('{"kind": "plan", "schema_version": 1}', "is not a profile file"),
        ('{"kind": "profile", "schema_version": 99}', "schema_version 99"),
        ('{"kind": "profile", "schema_version": 1, "model": "x"}', "fingerprint must be present"),
    ],
)
def test_unusable_profile_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileFormatError, ProfileError), match=message) as info:
        Profile.load(path)
    assert "asyncdiff-partition profile" in str(info.value)


def test_bad_profiling_arguments():
    captured = tiny_captured("tiny-dit")
    with pytest.raises(ProfileError, match="repeats >= 1"):
        profile_model(captured, model_name="x", repeats=0)
    with pytest.raises(ProfileError, match="unknown device|not supported|no CUDA"):
        profile_model(captured, model_name="x", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="no CUDA device"):
            profile_model(captured, model_name="x", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_profile_uses_events():
    captured = tiny_captured("tiny-dit")
    profile = profile_model(captured, model_name="tiny-dit", device="cuda", repeats=2)
    assert profile.device.startswith("cuda") and "cuda_bytes" in profile.peak_memory
    captured.graph_module.to("cpu")


def test_segments_timed_alone_add_up_to_about_the_whole_model():
    from asyncdiff_partition.core.plan import make_plan
    from asyncdiff_partition.fx.profiler import profile_model, time_segments

    # Profiled right before the segments are timed: the session's cached profile may have been taken
    # minutes earlier under another load (a 2-core machine shared with other processes).
    captured = tiny_captured("tiny-unet2d-condition")
    plan = make_plan(profile_model(captured, model_name="tiny-unet2d-condition", warmup=1, repeats=3), 2)
    measured = time_segments(captured, plan.boundaries, warmup=1, repeats=3)
    assert len(measured) == 2 and all(m > 0 for m in measured)
    # the plan's predictions are the same order of magnitude as what the segments take alone
    for m, segment in zip(measured, plan.segments):
        assert 0.2 < segment.compute_ms / m < 5
