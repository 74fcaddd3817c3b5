"""The fidelity evaluation (evaluate.py) and the ``eval`` command, on a tiny model."""

from __future__ import annotations

import csv
import math

import pytest
from click.testing import CliRunner

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.evaluation.evaluate import COLUMNS, EXTRAPOLATION_GRID, evaluate, hand_boundaries
from asyncdiff_partition.evaluation.report import split_label


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate("tiny-unet2d", devices=(2,), strides=(1,), warmups=(0, 1, 3), steps=3, images=1,
                    latency_slacks=(0.5,), profile_repeats=1, out_dir=out)


def test_writes_csv_markdown_and_png(result):
    assert sorted(result.paths) == ["csv", "markdown", "plot"]
    with open(result.paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(COLUMNS)
    # The sequential baseline, then auto, hand and fidelity-aware split at N=2 for W = 0, 1 and 3.
    assert [(r["split"], r["n_devices"], r["warmup"]) for r in rows] == [("sequential", "1", "")] + [
        (split, "2", w) for split in ("auto", "hand", "fidelity") for w in ("0", "1", "3")]
    assert [r["latency_slack"] for r in rows] == [""] * 7 + ["0.5"] * 3
    text = result.paths["markdown"].read_text()
    assert text == result.markdown and "ReferenceSchedule" in text
    assert text.count("\n| auto |") == 3 and text.count("\n| hand |") == 3
    # the fidelity-aware rows read stale values extrapolated, λ chosen on the calibration batch
    factors = {r["extrapolation"] for r in rows[7:]}
    assert {r["extrapolation"] for r in rows[:7]} == {""} and len(factors) == 1
    assert float(factors.pop()) in EXTRAPOLATION_GRID
    label = split_label(result.rows[-1])
    assert label.startswith("fidelity (+50%") and text.count(f"\n| {label} |") == 3
    assert result.paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_figures(result):
    rows = {(r["split"], r["warmup"]): r for r in result.rows}
    for split in ("auto", "hand", "fidelity"):
        exact, stale = rows[(split, 3)], rows[(split, 1)]
        assert exact["psnr_db"] == math.inf and exact["ssim"] == pytest.approx(1.0)  # W >= T: sequential
        assert math.isfinite(stale["psnr_db"]) and stale["ssim"] < 1.0  # stale inputs change the sample
        assert rows[(split, 0)]["psnr_db"] == stale["psnr_db"]  # W = 0 runs as W = 1
        assert exact["predicted_speedup"] == pytest.approx(1.0)
        assert 1.0 < stale["predicted_speedup"] <= stale["ideal_speedup"] + 1e-9
        assert stale["ideal_speedup"] == pytest.approx(3 / (1 + 2 / 2))
    assert rows[("hand", 1)]["boundaries"].startswith("up_blocks.0")
    # Within the slack the fidelity-aware cut is no more stale, and no slower than allowed.
    auto, aware = rows[("auto", 1)], rows[("fidelity", 1)]
    assert aware["staleness"] <= auto["staleness"] and aware["relative_l2"] > 0
    assert 1 / aware["predicted_speedup"] <= 1 / auto["predicted_speedup"] * 1.5 + 1e-9


def test_hand_boundaries():
    from conftest import tiny, tiny_captured

    from asyncdiff_partition.core.plan import ASYNCDIFF_SD21_BOUNDARIES
    from asyncdiff_partition.fx.opgraph import build_op_graph

    unet, _ = tiny("tiny-unet2d-condition")  # SD 2.1's block layout: AsyncDiff's published split
    graph = build_op_graph(tiny_captured("tiny-unet2d-condition"))
    assert hand_boundaries(unet, graph, 3) == list(ASYNCDIFF_SD21_BOUNDARIES[3])
    dit, _ = tiny("tiny-dit")  # six transformer blocks, split evenly
    graph = build_op_graph(tiny_captured("tiny-dit"))
    assert hand_boundaries(dit, graph, 3) == ["transformer_blocks.2", "transformer_blocks.4"]
    with pytest.raises(ConfigError, match="too few for N=7"):
        hand_boundaries(dit, graph, 7)


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigError, match="strides must be 1 and/or 2"):
        evaluate("tiny-unet2d", strides=(3,))
    with pytest.raises(ConfigError, match="devices"):
        evaluate("tiny-unet2d", devices=())


@pytest.mark.parametrize("args, message", [
    (["--segments", "2,x"], "--segments expects comma-separated integers"),
    (["--warmup", "-1"], "warmups must be a non-empty list of W >= 0"),
    (["--model", "no-such-model"], "unknown model"),
    (["--latency-slack", "-1"], "latency slacks must be finite numbers >= 0"),
])
def test_cli_bad_input_is_one_line(args, message):
    from asyncdiff_partition.cli.main import main

    out = CliRunner().invoke(main, ["eval", *args])
    assert out.exit_code == 1
    assert out.output.startswith("error: ") and message in out.output and out.output.count("\n") == 1


def test_digits_rows_carry_class_accuracy_and_frechet_distance():
    pytest.importorskip("sklearn")
    result = evaluate("digits", devices=(2,), strides=(1,), warmups=(2,), steps=2, images=1, hand_split=False,
                      latency_slacks=(), profile_repeats=1)
    floor, sequential, exact = result.rows
    assert floor["split"] == "real digits" and floor["class_accuracy"] > 0.8 and floor["frechet_distance"] >= 0
    assert sequential["split"] == "sequential" and exact["split"] == "auto" and exact["psnr_db"] == math.inf
    # W >= T: the same samples, so the same judgement.
    assert exact["class_accuracy"] == sequential["class_accuracy"]
    assert exact["frechet_distance"] == pytest.approx(sequential["frechet_distance"])
    assert "| real digits |" in result.markdown
