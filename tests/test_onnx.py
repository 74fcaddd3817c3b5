"""ONNX through the same core: import, onnxruntime profile, plan, extracted segments, the schedule
on 2 gloo ranks against the torch reference, export of torch segments, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny, tiny_captured, tiny_profile

from asyncdiff_partition.app.job import run_plan
from asyncdiff_partition.app.onnx_export import export_plan_onnx, load_exported
from asyncdiff_partition.app.onnx_run import OnnxBackend, sample
from asyncdiff_partition.app.settings import RunConfig
from asyncdiff_partition.cli.main import main
from asyncdiff_partition.core.graph import OUTPUT
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import Plan, PlanError, make_plan, module_boundaries
from asyncdiff_partition.core.profile import Profile, fingerprint
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import run_segments, split_graph
from asyncdiff_partition.onnx.model import OUTPUT as ONNX_OUTPUT
from asyncdiff_partition.onnx.model import OnnxModelError, load_onnx
from asyncdiff_partition.onnx.profiler import example_feed, make_session, node_costs, profile_onnx
from asyncdiff_partition.onnx.segments import OnnxCapture, ready_onnx_segments, split_onnx
from asyncdiff_partition.runtime.reference import ReferenceSchedule

pytest.importorskip("onnxruntime")

NAME = "tiny-unet2d-condition"
CUT = "up_blocks.1.attentions.2"  # AsyncDiff's N=2 hand split: a module boundary both graphs share
TIMESTEPS = [900, 700, 500, 300]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    """The tiny UNet exported by torch's TorchScript exporter (module scopes in the node names)."""
    model, inputs = tiny(NAME)
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    args = (inputs.args[0], inputs.kwargs["timestep"], inputs.kwargs["encoder_hidden_states"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), kwargs={"return_dict": False}, dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["noise"])
    return path


@pytest.fixture(scope="module")
def model(onnx_path):
    return load_onnx(onnx_path)


@pytest.fixture(scope="module")
def profiled(model, tmp_path_factory):
    profile = profile_onnx(model, repeats=2)
    path = tmp_path_factory.mktemp("profile") / "unet.profile.json"
    profile.save(path)
    return profile, path


def _torch_segments(boundary_module):
    captured = tiny_captured(NAME)
    graph = build_op_graph(captured)
    return captured, split_graph(captured, place(graph, [0, *module_boundaries(graph, [boundary_module]), len(graph)]))


# --- import ---------------------------------------------------------------------------------------


def test_import_gives_the_op_graph_a_torch_capture_gives(model):
    graph = model.graph
    assert ONNX_OUTPUT == OUTPUT
    assert (model.latent, model.timestep) == ("sample", "timestep")
    assert [s["name"] for s in model.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert model.inputs[0] == {"name": "sample", "path": "sample", "shape": [2, 4, 16, 16], "dtype": "float32",
                               "latent": True}
    assert not any(n.op_type in ("Shape", "Size") for n in model.proto.graph.node)  # Note [static shapes]
    kinds = [graph.node(i)["kind"] for i in range(len(graph))]
    assert kinds[:3] == ["input"] * 3 and kinds[-1] == "output" and kinds.count("output") == 1
    assert all(graph.node(i)["out_bytes"] > 0 for i in range(len(graph)) if kinds[i] == "op" and graph.nx.out_degree(graph.order[i]))
    # The time embedding depends on the timestep only: fresh, recomputed, never sent.
    assert graph.node("/time_embedding/linear_1/Gemm")["fresh"]
    assert not graph.node("/conv_in/Conv")["fresh"]
    # Parameters are counted once, by their first consumer.
    weights = sum(t.numel() * t.element_size() for t in tiny(NAME)[0].parameters())
    assert graph.param_bytes == pytest.approx(weights, rel=0.02)
    # The same cut sends the same tensors as in the torch capture of the same model.
    captured = tiny_captured(NAME)
    torch_graph = build_op_graph(captured)
    mine = graph.crossing(module_boundaries(graph, [CUT])[0])
    theirs = torch_graph.crossing(module_boundaries(torch_graph, [CUT])[0])
    assert (mine.stale_bytes, len(mine.stale)) == (theirs.stale_bytes, len(theirs.stale))
    assert fingerprint(graph, model.inputs) == fingerprint(load_onnx(model.path).graph, model.inputs)


# --- profile --------------------------------------------------------------------------------------


def test_profile_is_a_project_profile_that_plans(profiled, model):
    profile, path = profiled
    assert Profile.load(path) == profile
    assert len(profile.costs) == len(model.graph) and profile.node_ms_sum > 0
    costly = [model.graph.order[i] for i, c in enumerate(profile.costs) if c > 0]
    assert any("conv" in name.lower() for name in costly)
    assert profile.versions["onnxruntime_provider"] == "CPUExecutionProvider" and profile.threads == 1
    assert 0.3 < profile.accuracy < 3  # the profiler's overhead is reported, not hidden
    plan = make_plan(profile, 2)
    assert plan.method == "balanced" and len(plan.segments) == 2 and plan.predicted["imbalance"] < 1.3


def test_kernel_events_become_node_costs():
    def event(name, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # warm-up, skipped
        event("/a/Conv", 10, 50),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        event("ReorderInput", 205, 3),  # no node of that name: charged to the next kernel
        event("/a/Conv", 210, 40),
        event("/a/MatMul/MatMulAddFusion", 260, 20),  # fused: the longest node name it starts with
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        event("/a/Conv", 410, 60),
    ]
    samples, unmatched = node_costs(events, ["x", "/a/Conv", "/a/MatMul", "/a/Mat"], skip_runs=1)
    np.testing.assert_allclose(samples, [[0.0, 0.0], [0.043, 0.06], [0.02, 0.0], [0.0, 0.0]])
    assert unmatched == pytest.approx(0.0015)


# --- segments and the schedule ---------------------------------------------------------------------


def test_segments_recompute_the_model(model, profiled):
    plan = make_plan(profiled[0], 3)
    segments = split_onnx(model, place(model.graph, plan.boundaries))
    assert [s.index for s in segments] == [0, 1, 2] and segments[-1].outputs[-1] == OUTPUT
    assert "sample" not in segments[2].inputs and segments[2].receives  # the latent arrives as values
    feed = example_feed(model)
    full = torch.from_numpy(make_session(model.proto.SerializeToString()).run(None, feed)[0])
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    torch.testing.assert_close(run_segments(segments, inputs), full, atol=1e-5, rtol=0)
    unet = tiny(NAME)[0]
    with torch.no_grad():
        eager = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]
    torch.testing.assert_close(full, eager, atol=1e-4, rtol=0)
    exact = ReferenceSchedule(segments, warmup=len(TIMESTEPS))
    exact.reset(TIMESTEPS)
    torch.testing.assert_close(exact(dict(inputs, timestep=torch.full((2,), 900))),
                               torch.from_numpy(make_session(model.proto.SerializeToString()).run(
                                   None, dict(feed, timestep=np.full(2, 900)))[0]), atol=1e-5, rtol=0)


def test_reference_schedule_on_onnx_equals_it_on_torch(model):
    captured, torch_segments = _torch_segments(CUT)
    onnx_segments = split_onnx(model, place(model.graph, [0, *module_boundaries(model.graph, [CUT]), len(model.graph)]))
    assert len(onnx_segments[1].receives) == len(torch_segments[1].receives) == 7
    for warmup, stride in ((1, 1), (2, 1), (1, 2)):
        theirs = ReferenceSchedule(torch_segments, warmup=warmup, stride=stride)
        mine = ReferenceSchedule(onnx_segments, warmup=warmup, stride=stride)
        theirs.reset(TIMESTEPS)
        mine.reset(TIMESTEPS)
        x = captured.example[0].clone()
        for t in TIMESTEPS:
            inputs = {"sample": x, "timestep": torch.full((2,), t), "encoder_hidden_states": captured.example[2]}
            expected = theirs(inputs)
            torch.testing.assert_close(mine(inputs), expected, atol=1e-4, rtol=0)
            x = x - 0.1 * expected


def test_async_on_two_gloo_ranks_equals_the_torch_reference(profiled, tmp_path):
    """tiny UNet -> ONNX -> profile -> plan N=2 -> 2 real processes == torch ReferenceSchedule."""
    profile, profile_path = profiled
    plan = make_plan(profile, 2, boundaries=[CUT], steps=4, warmup=1, profile_path=str(profile_path))
    plan_path = plan.save(tmp_path / "plan.json")
    result = run_plan(RunConfig(model=None, plan=str(plan_path), out_dir=str(tmp_path / "run"), threads=1,
                                guidance=1.0, timeout_s=60, progress=False), OnnxBackend())
    got = torch.from_numpy(np.load(result["latent"]))
    captured, torch_segments = _torch_segments(CUT)
    expected = sample(ReferenceSchedule(torch_segments, warmup=1), captured, steps=4, seed=0, guidance=1.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["meta"]["runtime"] == "onnxruntime" and report["summary"]["ranks"] == 2
    sent = [row["bytes_sent"] for rank in report["ranks"] if rank["rank"] == 0 for row in rank["steps"]]
    assert sent[1] == plan.bytes_per_step  # segment 0 sends exactly the planned values


def test_a_plan_of_another_model_is_refused(model, profiled):
    plan = make_plan(profiled[0], 2)
    with pytest.raises(PlanError, match="fingerprint 0123456789abcdef"):
        ready_onnx_segments(model, dataclasses.replace(plan, fingerprint="0123456789abcdef"), world_size=2)
    with pytest.raises(OnnxModelError, match="shape inference failed"):  # shapes baked into the export
        load_onnx(model.path, input_shapes={"sample": [2, 4, 8, 8]})
    with pytest.raises(PlanError, match="needs N \\+ stride - 1 = 2 ranks"):
        ready_onnx_segments(model, plan, world_size=3)
    ready = ready_onnx_segments(model, plan, world_size=2)  # layouts from the static shapes
    assert ready[1].layouts.keys() == {*ready[1].receives, OUTPUT}
    assert ready[1].layouts[OUTPUT].leaves[0].shape == OnnxCapture.of(model).latent.shape


# --- export of torch segments -----------------------------------------------------------------------


def test_export_onnx_writes_checked_segments_that_run_the_schedule(tmp_path):
    profile = tiny_profile(NAME)
    profile_path = profile.save(tmp_path / "torch.profile.json")
    plan_path = make_plan(profile, 2, boundaries=[CUT], profile_path=str(profile_path)).save(tmp_path / "plan.json")
    manifest = export_plan_onnx(plan_path, tmp_path / "segments")
    assert [s["exporter"] for s in manifest["segments"]] == ["torch.onnx.export(dynamo=False)"] * 2
    assert max(s["max_abs_error"] for s in manifest["segments"]) < 1e-4
    captured, torch_segments = _torch_segments(CUT)
    exported = load_exported(tmp_path / "segments")
    assert [s.receives for s in exported] == [s.receives for s in torch_segments]
    theirs, mine = ReferenceSchedule(torch_segments, warmup=1), ReferenceSchedule(exported, warmup=1)
    theirs.reset(TIMESTEPS)
    mine.reset(TIMESTEPS)
    x = captured.example[0]
    for t in TIMESTEPS:
        inputs = {"sample": x, "timestep": torch.full((2,), t), "encoder_hidden_states": captured.example[2]}
        torch.testing.assert_close(mine(inputs), theirs(inputs), atol=1e-4, rtol=0)


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_profile_plan_run_export_an_onnx_model(onnx_path, tmp_path):
    runner = CliRunner()
    invoke = lambda *args: runner.invoke(main, ["--threads", "1", *args])  # noqa: E731
    profile = tmp_path / "p.json"
    result = invoke("profile", "--model", str(onnx_path), "--repeats", "1", "--out", str(profile))
    assert result.exit_code == 0, result.output
    plan = tmp_path / "plan.json"
    result = invoke("plan", "--profile", str(profile), "--devices", "2", "--measure", "--out", str(plan))
    assert result.exit_code == 0, result.output
    assert "measured ms" in result.output and Plan.load(plan).model == str(onnx_path)
    result = invoke("run", "--plan", str(plan), "--steps", "3", "--reference", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "run" / "latent.npy").shape == (1, 4, 16, 16)  # guidance: half the batch
    result = invoke("export-onnx", "--plan", str(plan), "--out", str(tmp_path / "seg"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "seg" / "segment1.onnx").is_file() and "max abs error" in result.output


# --- bad input ------------------------------------------------------------------------------------


def _save(graph, path, opset=17):
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def _tiny_graph(nodes, outputs=("y",), batch=2):
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])
    outs = [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [batch, 4]) for o in outputs]
    return oh.make_graph(nodes, "g", [x], outs)


def test_bad_files_give_one_clear_error(tmp_path, model):
    (tmp_path / "text.onnx").write_text("not a model at all\n")
    (tmp_path / "cut.onnx").write_bytes(model.proto.SerializeToString()[:5000])
    for name in ("text.onnx", "cut.onnx", "missing.onnx"):
        with pytest.raises(OnnxModelError, match=r"ONNX"):
            load_onnx(tmp_path / name)
    runner = CliRunner()
    result = runner.invoke(main, ["profile", "--model", str(tmp_path / "cut.onnx")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_control_flow_outputs_and_shapes_are_checked(tmp_path):
    relu = oh.make_node("Relu", ["x"], ["y"])
    branch = oh.make_graph([oh.make_node("Identity", ["x"], ["z"])], "b", [],
                           [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4])])
    cond = oh.make_node("Constant", [], ["c"], value=oh.make_tensor("v", onnx.TensorProto.BOOL, [], [True]))
    if_node = oh.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="branchy")
    with pytest.raises(OnnxModelError, match="control flow.*'branchy' is a If"):
        load_onnx(_save(_tiny_graph([cond, if_node]), tmp_path / "if.onnx"), latent="x")
    two = [relu, oh.make_node("Sigmoid", ["x"], ["w"])]
    with pytest.raises(OnnxModelError, match="2 outputs"):
        load_onnx(_save(_tiny_graph(two, outputs=("y", "w")), tmp_path / "two.onnx"), latent="x")
    unnamed = oh.make_graph([oh.make_node("Relu", ["features"], ["y"])], "g",
                            [oh.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [2, 4])],
                            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    with pytest.raises(OnnxModelError, match="cannot tell which input.*--latent"):
        load_onnx(_save(unnamed, tmp_path / "relu.onnx"))
    assert load_onnx(tmp_path / "relu.onnx", latent="features").latent == "features"
    symbolic = _save(_tiny_graph([relu], batch="N"), tmp_path / "sym.onnx")
    with pytest.raises(OnnxModelError, match="symbolic dimension 'N' at position 0.*--batch"):
        load_onnx(symbolic, latent="x")
    assert load_onnx(symbolic, latent="x", batch=3).inputs[0]["shape"] == [3, 4]
    reshape = oh.make_node("Reshape", ["x", "s"], ["y"])  # its target shape is a runtime input
    s = oh.make_tensor_value_info("s", onnx.TensorProto.INT64, [2])
    graph = oh.make_graph([reshape], "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]), s],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    with pytest.raises(OnnxModelError, match="no static shape for 'y'"):
        load_onnx(_save(graph, tmp_path / "reshape.onnx"), latent="x")
