"""CLI: click's runner for behaviour and error paths, one real console-script subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from asyncdiff_partition.cli.main import main
from asyncdiff_partition.pipelines import zoo


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, ["--threads", "1", *args])

    return invoke


def test_help_lists_the_commands(run):
    result = run("--help")
    assert result.exit_code == 0
    for command in ("inspect", "demo", "models"):
        assert command in result.output


def test_models_lists_the_zoo(run):
    result = run("models")
    assert result.exit_code == 0
    assert all(name in result.output for name in zoo.list_models())


def test_inspect_json_describes_the_model(run):
    result = run("inspect", "--model", "tiny-dit", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["model_class"] == "DiTTransformer2DModel"
    assert summary["capture_method"] == "export"
    assert summary["inputs"][0]["latent"] and summary["inputs"][0]["name"] == "hidden_states"
    assert summary["fresh_ops"] > 0 and summary["op_nodes"] > summary["fresh_ops"]
    assert len(summary["cheapest_cuts"]) == 5
    assert all(c["stale_bytes"] > 0 for c in summary["cheapest_cuts"])
    modules = [c["after"].split(" ")[0] for c in summary["cheapest_cuts"]]
    assert len(set(modules)) == len(modules)


def test_inspect_a_local_pipeline_directory(run, tmp_path):
    model = zoo.build_model("tiny-unet2d")
    model.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    result = run("inspect", "--model", str(tmp_path / "pipe"))
    assert result.exit_code == 0, result.output
    assert "UNet2DModel" in result.output and "<- latent" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--model", "sd99-unet"], "unknown model 'sd99-unet'"),
        (["inspect", "--model", "./no/such/dir"], "does not exist"),
        (["inspect", "--model", "tiny-unet2d-condition", "--size", "10"], "must be a multiple of 8"),
    ],
)
def test_user_mistakes_are_one_line_and_non_zero(run, args, message):
    result = run(*args)
    assert result.exit_code == 1
    assert message in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output


def test_bad_option_value_is_a_usage_error(run):
    result = run("inspect", "--batch", "0")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_console_script_runs_as_a_real_process(tmp_path):
    script = shutil.which("asyncdiff-partition", path=os.path.dirname(sys.executable))
    assert script, "console script not installed next to the interpreter"
    ok = subprocess.run([script, "--threads", "1", "inspect", "--model", "tiny-sd3", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model_class"] == "SD3Transformer2DModel"
    bad = subprocess.run([script, "inspect", "--model", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: unknown model") and "Traceback" not in bad.stderr


def test_profile_command_writes_a_loadable_profile(run, tmp_path):
    from asyncdiff_partition.core.profile import Profile

    out = tmp_path / "dit.json"
    result = run("profile", "--model", "tiny-dit", "--repeats", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "% of eager" in result.output
    profile = Profile.load(out)
    assert profile.model == "tiny-dit" and profile.threads == 1
    assert profile.command.startswith("asyncdiff-partition")


@pytest.fixture
def profile_file(tmp_path):
    from conftest import tiny_profile

    return str(tiny_profile().save(tmp_path / "unet.profile.json"))


def test_plan_command_prints_the_table_and_compares_with_asyncdiff(run, profile_file, tmp_path):
    from asyncdiff_partition.core.plan import Plan

    out = tmp_path / "plan.json"
    result = run("plan", "--profile", profile_file, "--devices", "2", "--compare", "asyncdiff",
                 "--bandwidth", "10", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "balanced plan for 2 device(s)" in result.output
    assert "AsyncDiff's hand split at N=2" in result.output
    assert result.output.count("predicted ms") == 2
    plan = Plan.load(out)
    assert plan.n_devices == 2 and plan.bandwidth_gbps == 10 and plan.profile["path"] == profile_file


def test_plan_command_takes_hand_boundaries_and_speeds(run, profile_file, tmp_path):
    from asyncdiff_partition.core.plan import Plan

    out = tmp_path / "hand.json"
    result = run("plan", "--profile", profile_file, "--devices", "3", "--boundaries", "mid_block,up_blocks.3",
                 "--speeds", "1,1,0.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    assert plan.method == "manual" and plan.speeds == [1.0, 1.0, 0.5]
    assert plan.segments[1].first_module.startswith("mid_block")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--devices", "100000"], "segments"),
        (["--devices", "2", "--boundaries", "up_blocks.9"], "no node of module 'up_blocks.9'"),
        (["--devices", "5", "--compare", "asyncdiff"], "N = 2, 3, 4"),
    ],
)
def test_plan_mistakes_are_one_line(run, profile_file, tmp_path, extra, message):
    result = run("plan", "--profile", profile_file, "--out", str(tmp_path / "p.json"), *extra)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([l for l in result.output.splitlines() if l.startswith("error:")]) == 1


def test_plan_devices_are_all_ranks_and_stride_takes_one_of_them(run, profile_file, tmp_path):
    """Note [one flag, one meaning]: --devices is D in every command; stride 2 spends one rank, so N = D - 1."""
    from asyncdiff_partition.core.plan import Plan

    out = tmp_path / "s2.json"
    result = run("plan", "--profile", profile_file, "--devices", "3", "--stride", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "plan for 3 device(s), N=2 segment(s)" in result.output
    plan = Plan.load(out)
    assert (plan.n_devices, plan.stride, plan.world_size) == (2, 2, 3)
    result = run("plan", "--profile", profile_file, "--devices", "1", "--stride", "2", "--out", str(out))
    assert result.exit_code == 1 and "leave no segment" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--batch-parallel", "2", "--speeds", "1,1"], "--speeds: only for plans of one batch group"),
    (["--phases", '{"kind": "adaptive", "threshold": 0.3}', "--stride", "2", "--compare", "asyncdiff"],
     "--stride, --compare: only for plans of one batch group"),
    (["--batch-parallel", "2", "--latency-slack", "0.1"], "--latency-slack: only for plans of one batch group"),
    (["--max-stale-hops", "2"], "--max-stale-hops: the budget of a hybrid plan"),
    (["--model", "tiny-unet2d"], "--model: read by --measure only"),
])
def test_plan_refuses_what_it_would_not_honour(run, profile_file, tmp_path, extra, message):
    out = tmp_path / "p.json"
    result = run("plan", "--profile", profile_file, "--devices", "2", "--out", str(out), *extra)
    assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--devices", "2"], "--devices: fixed by the plan file"),
    (["--batch-parallel", "2", "--extrapolation", "0.5"], "--batch-parallel, --extrapolation: fixed by the plan file"),
    (["--size", "64"], "--size: only with --prompt"),
])
def test_run_with_a_plan_refuses_what_the_plan_fixes(run, profile_file, tmp_path, extra, message):
    plan, out = tmp_path / "p.json", tmp_path / "out"
    assert run("plan", "--profile", profile_file, "--devices", "2", "--out", str(plan)).exit_code == 0
    result = run("run", "--plan", str(plan), "--out", str(out), *extra)
    assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output, result.output
    assert not out.exists()


def test_plan_with_a_missing_or_corrupt_profile(run, tmp_path):
    result = run("plan", "--profile", str(tmp_path / "nope.json"), "--devices", "2")
    assert result.exit_code == 1 and "does not exist" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = run("plan", "--profile", str(bad), "--devices", "2", "--out", str(tmp_path / "plan.json"))
    assert result.exit_code == 1 and "corrupt or truncated" in result.output
    assert not (tmp_path / "plan.json").exists()  # nothing half-written


def test_plan_rejects_non_numeric_speeds(run, profile_file):
    result = run("plan", "--profile", profile_file, "--devices", "2", "--speeds", "fast,slow")
    assert result.exit_code == 2 and "comma-separated numbers" in result.output


def test_plan_measure_runs_each_segment_alone(run, profile_file, tmp_path):
    result = run("plan", "--profile", profile_file, "--devices", "2", "--measure", "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert "measured ms" in result.output and "error" in result.output
    rows = [l for l in result.output.splitlines() if l[:1].isdigit()]
    assert len(rows) == 2 and all("%" in r.split()[-1] for r in rows)


def test_plan_measure_refuses_another_model(run, profile_file, tmp_path):
    result = run("plan", "--profile", profile_file, "--devices", "2", "--measure", "--model", "tiny-dit",
                 "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 1 and "fingerprint" in result.output


def test_demo_writes_a_profile_a_plan_and_the_comparison(run, tmp_path):
    from PIL import Image

    from asyncdiff_partition.core.plan import Plan
    from asyncdiff_partition.core.profile import Profile

    out = tmp_path / "demo"
    result = run("demo", "--out", str(out), "--steps", "4")
    assert result.exit_code == 0, result.output
    assert "plan for 2 devices" in result.output and "cheapest cut points" in result.output
    profile = Profile.load(out / "digits.cpu-1t.profile.json")
    assert next(i for i in profile.inputs if i["latent"])["shape"] == [20, 1, 16, 16]  # 10 digits, cond + uncond
    plan = Plan.load(out / "plan-2.json", fingerprint=profile.fingerprint)
    assert plan.n_devices == 2 and len(plan.segments) == 2
    for run_dir in ("sequential", "async"):
        assert sorted(p.name for p in (out / run_dir).glob("image-*.png")) == sorted(f"image-{i}.png" for i in range(10))
        assert (out / run_dir / "report.json").is_file()
    with Image.open(out / "comparison.png") as sheet:
        assert sheet.width >= 10 * 16 * 4 and sheet.height >= 2 * 16 * 4
    lines = result.output.splitlines()
    assert any(l.startswith("asynchronous, 2 processes") and l.count("x") >= 3 for l in lines)
    assert any(l.startswith("PSNR dB") for l in lines) and any(l.startswith("SSIM") for l in lines)
    assert f"wrote {out / 'comparison.png'}" in result.output


def test_a_bug_keeps_its_traceback(run, profile_file, tmp_path, monkeypatch):
    """Only AsyncDiffError and OSError are user mistakes; anything else is a bug, not an `error:` line."""
    from asyncdiff_partition.cli import main as cli

    def broken(*args, **kwargs):
        raise KeyError("a bug in the partitioner")

    monkeypatch.setattr(cli, "make_plan", broken)
    result = run("plan", "--profile", profile_file, "--devices", "2", "--out", str(tmp_path / "p.json"))
    assert result.exit_code != 0
    assert isinstance(result.exception, KeyError) and result.exc_info[2] is not None  # the traceback travels
    assert "error:" not in result.output


def test_an_os_error_is_one_line(run, profile_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("plan", "--profile", profile_file, "--devices", "2", "--out", str(blocker / "p.json"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")


# --- run / profile on a saved pipeline folder (--prompt) ----------------------------------------


@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory):
    """A tiny SD and a tiny SD ControlNet pipeline saved with save_pretrained, and a conditioning image."""
    from tiny_pipelines import build, random_image

    root = tmp_path_factory.mktemp("pipelines")
    for family in ("sd", "controlnet"):
        pipe, _ = build(family, root / "tokenizers")
        pipe.save_pretrained(root / family)
    random_image(0, 16).save(root / "edges.png")
    return root


def test_run_a_saved_pipeline_with_a_prompt_on_two_ranks_equals_its_reference(run, pipeline_folders, tmp_path,
                                                                                monkeypatch):
    """The one run path: set-up here, 2 engine ranks sample, report.json and trace written; the same run
    as the single-process reference schedule (same cached profile, same plan) gives the same image."""
    from PIL import Image

    from asyncdiff_partition.app.report import load_report
    from asyncdiff_partition.core.plan import Plan

    monkeypatch.setenv("ASYNCDIFF_CACHE", str(tmp_path / "cache"))
    out, ref = tmp_path / "out", tmp_path / "ref"
    common = ["--model", str(pipeline_folders / "sd"), "--prompt", "a red cube", "--steps", "8"]
    result = run("run", *common, "--reference", "--out", str(ref))
    assert result.exit_code == 0, result.output
    result = run("run", *common, "--devices", "2", "--out", str(out), "--trace", str(tmp_path / "trace.json"))
    assert result.exit_code == 0, result.output
    assert "StableDiffusionPipeline: set-up load " in result.output and "spawn" in result.output
    assert "unet: 1 call(s) per step" in result.output and "sampling" in result.output
    image = Image.open(out / "image-0.png")
    assert image.size == (32, 32)  # the pipeline's own default size
    assert image.tobytes() == Image.open(ref / "image-0.png").tobytes()  # 2 ranks = the reference schedule
    assert Plan.load(out / "plan.json").n_devices == 2 and f"wrote {out / 'plan.json'}" in result.output
    report = load_report(out / "report.json")
    assert report["meta"]["mode"] == "engine" and {r["rank"] for r in report["ranks"]} == {0, 1}
    assert set(report["meta"]["setup_s"]) >= {"load_s", "prepare_s", "record_s", "compile_s", "ship_s", "spawn_s"}
    assert all(m["peak_rss"] for m in report["meta"]["memory"].values())
    assert (tmp_path / "trace.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "3"], "--nproc 3 but the run has 2 ranks"),
    (["--devices", "3"], "the run needs 3 processes but this machine has"),
    (["--stride", "3"], "Invalid value for '--stride'"),
    (["--batch-parallel", "2", "--stride", "2"], "devices=2 leave no segment with batch_parallel=2 and stride=2"),
    (["--extrapolation", "0.5", "--stride", "2", "--devices", "3"], "extrapolation needs stride 1"),
    (["--phases", "{"], "--phases must be JSON"),
    (["--devices", "2", "--stride", "2", "--warmup", "-1"], "Invalid value for '--warmup'"),
])
def test_pipeline_run_options_are_honoured_or_refused_in_one_line(run, pipeline_folders, tmp_path, extra, message,
                                                                   monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    out = tmp_path / "out"
    result = run("run", "--model", str(pipeline_folders / "sd"), "--prompt", "a red cube", "--out", str(out), *extra)
    assert result.exit_code != 0 and message in result.output
    assert not out.exists()


def test_pipeline_run_honours_batch_groups_and_phases(run, pipeline_folders, tmp_path, monkeypatch):
    """--batch-parallel and --phases reach the plan the run writes (reference schedule: no ranks needed)."""
    from asyncdiff_partition.core.plan import Plan

    monkeypatch.setenv("ASYNCDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = run("run", "--model", str(pipeline_folders / "sd"), "--prompt", "a red cube", "--steps", "3", "--reference",
                 "--devices", "2", "--batch-parallel", "2", "--phases", '{"kind": "fixed", "async_steps": [1, 2]}',
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    plan = Plan.load(out / "plan.json")
    assert (plan.batch_parallel, plan.n_devices, plan.phases["kind"]) == (2, 1, "fixed")
    assert (out / "image-0.png").is_file()


def test_run_a_controlnet_folder_with_an_image(run, pipeline_folders, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("ASYNCDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = run("run", "--model", str(pipeline_folders / "controlnet"), "--prompt", "a red cube", "--image",
                 str(pipeline_folders / "edges.png"), "--devices", "2", "--steps", "8", "--size", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "StableDiffusionControlNetPipeline: set-up" in result.output and "  unet: 1 call(s)" in result.output
    assert Image.open(out / "image-0.png").size == (16, 16)


@pytest.mark.parametrize("family, extra, message", [
    ("sd", ["--image", "{root}/edges.png"], "StableDiffusionPipeline takes no image, so --image cannot be used"),
    ("controlnet", [], "the dry run of StableDiffusionControlNetPipeline"),
    ("sd", ["--size", "20"], "the dry run of StableDiffusionPipeline"),
    ("sd/unet", [], "--prompt needs a diffusers pipeline folder (model_index.json)"),
])
def test_pipeline_run_mistakes_are_found_before_any_rank_starts(run, pipeline_folders, tmp_path, family, extra,
                                                                  message):
    out = tmp_path / "out"
    args = [a.format(root=pipeline_folders) for a in extra]
    result = run("run", "--model", str(pipeline_folders / family), "--prompt", "a red cube", "--devices", "2",
                 "--out", str(out), *args)
    assert result.exit_code == 1
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not out.exists()  # nothing profiled, planned or sampled


def test_profile_plan_and_run_a_pipeline_with_a_saved_plan(run, pipeline_folders, tmp_path):
    profile, plan, out = tmp_path / "sd.profile.json", tmp_path / "plan.json", tmp_path / "out"
    folder = str(pipeline_folders / "sd")
    result = run("profile", "--model", folder, "--prompt", "a red cube", "--size", "16", "--repeats", "1",
                 "--out", str(profile))
    assert result.exit_code == 0, result.output
    result = run("plan", "--profile", str(profile), "--devices", "2", "--out", str(plan))
    assert result.exit_code == 0, result.output
    result = run("run", "--model", folder, "--prompt", "a red cube", "--size", "16", "--plan", str(plan),
                 "--reference", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "image-0.png").is_file() and not (out / "plan.json").exists()  # the given plan, not a new one
    result = run("run", "--model", folder, "--prompt", "a red cube", "--size", "32", "--plan", str(plan),
                 "--reference", "--out", str(tmp_path / "other"))
    assert result.exit_code == 1 and "plan was made for model fingerprint" in result.output
