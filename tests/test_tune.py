"""The ``tune`` search (evaluation/tune.py) and its command, on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.core.profile import Profile
from asyncdiff_partition.evaluation.tune import TuneError, pareto_front, tune


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return tune("tiny-unet2d", devices=3, steps=3, images=1, slacks=(0.0, 0.5), profile_repeats=1,
                out_dir=tmp_path_factory.mktemp("tune"))


def test_searches_every_configuration_that_fits(result):
    configs = {(r["n_devices"], r["stride"], r["latency_slack"]) for r in result.rows}
    assert configs == {(1, 1, 0.0), (2, 1, 0.0), (2, 1, 0.5), (3, 1, 0.0), (3, 1, 0.5), (2, 2, 0.0), (2, 2, 0.5)}
    assert all(r["world_size"] <= 3 for r in result.rows)
    sequential = next(r for r in result.rows if r["n_devices"] == 1)
    assert sequential["psnr_db"] == float("inf") and sequential["pareto"]
    # No target: the fastest configuration; nothing on the front is slower and less faithful than another.
    assert result.chosen["latency_ms"] == min(r["latency_ms"] for r in result.rows)
    front = [r for r in result.rows if r["pareto"]]
    for r in result.rows:
        if not r["pareto"]:
            assert any(f["latency_ms"] <= r["latency_ms"] and f["psnr_db"] >= r["psnr_db"] for f in front)


def test_writes_table_plot_profile_and_plan(result):
    paths = result.paths
    assert sorted(paths) == ["csv", "markdown", "plan", "plot", "profile"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.rows) and sum(r["chosen"] == "True" for r in rows) == 1
    assert "**yes**" in paths["markdown"].read_text()
    profile = Profile.load(paths["profile"])
    assert profile.staleness is not None and len(profile.staleness["cut_error"]) == len(profile.costs) + 1
    plan = Plan.load(paths["plan"], fingerprint=profile.fingerprint)
    assert plan == result.plan and plan.n_devices == result.chosen["n_devices"]
    assert plan.objective["latency_slack"] == result.chosen["latency_slack"]
    assert plan.extrapolation == result.chosen["extrapolation"]
    # stride 1 reads extrapolated values with the λ best on the batch; stride 2 and N = 1 plainly
    assert all(r["extrapolation"] == 0.0 for r in result.rows if r["stride"] == 2 or r["n_devices"] == 1)
    assert {r["extrapolation"] for r in result.rows} <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_targets_pick_the_right_configuration(result, tmp_path):
    from asyncdiff_partition.evaluation.tune import _choose

    rows = result.rows
    sequential = next(r for r in rows if r["n_devices"] == 1)
    limit = 0.99 * sequential["latency_ms"]  # leaves out only the sequential model
    picked = _choose(rows, "psnr_db", {"max_latency_ms": limit})
    assert picked["latency_ms"] <= limit and picked["n_devices"] > 1
    assert all(r["psnr_db"] <= picked["psnr_db"] for r in rows if r["latency_ms"] <= limit)
    floor = sorted(r["psnr_db"] for r in rows)[len(rows) // 2]
    picked = _choose(rows, "psnr_db", {"min_psnr": floor})
    assert picked["psnr_db"] >= floor
    assert all(r["latency_ms"] >= picked["latency_ms"] for r in rows if r["psnr_db"] >= floor)
    with pytest.raises(TuneError, match="no configuration for 3 device"):
        tune("tiny-unet2d", devices=3, strides=(1,), slacks=(0.0,), steps=3, images=1, profile_repeats=1,
             max_latency_ms=1e-6, out_dir=tmp_path)
    assert (tmp_path / "tune.md").is_file() and not (tmp_path / "plan.json").exists()  # table kept, no plan


def test_pareto_front():
    assert pareto_front([(1, 5), (2, 3), (2, 4), (3, 3), (1, 5), (0.5, 9)]) == [0, 1, 5]
    assert pareto_front([]) == []


@pytest.mark.parametrize("args, message", [
    (["--devices", "2", "--min-psnr", "20", "--max-latency-ms", "5"], "give at most one target"),
    (["--devices", "2", "--model", "tiny-unet2d", "--max-fd-ratio", "1.2"], "needs the digits model's classifier"),
])
def test_cli_mistakes_are_one_line(args, message):
    from asyncdiff_partition.cli.main import main

    out = CliRunner().invoke(main, ["tune", *args])
    assert out.exit_code == 1
    assert out.output.startswith("error: ") and message in out.output and out.output.count("\n") == 1


def test_cli_tune_writes_a_plan(tmp_path):
    from asyncdiff_partition.cli.main import main

    out = CliRunner().invoke(main, ["tune", "--model", "tiny-unet2d", "--devices", "2", "--steps", "3", "--stride",
                                    "1", "--latency-slack", "0,0.5", "--min-psnr", "0", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "chosen: N=" in out.output
    assert json.loads((tmp_path / "plan.json").read_text())["kind"] == "plan"
