"""The device check rehearsed on CPU: benchmarks/gpu/check.sh --device cpu --small writes the
figures of every step, and its two ranks (staged through host memory, as on one GPU) match
the reference schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_rehearses_on_cpu(tmp_path):
    out = tmp_path / "check"
    # ASYNCDIFF_STAGE=1: the ranks stage every transfer through host memory as gloo ranks on one GPU do.
    # --no-compile: compiled equality is tests/test_compile.py's; inductor takes minutes on 2 cores.
    env = {**os.environ, "PYTHON": sys.executable, "ASYNCDIFF_STAGE": "1", "OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/check.sh"), "--no-install", "--device", "cpu", "--small",
                           "--steps", "3", "--repeats", "1", "--no-compile"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "check.json").read_text())
    assert data["passed"] and not data["errors"]
    assert data["meta"]["device"] == "cpu" and data["meta"]["steps"] == 3
    steps = data["steps"]
    assert set(steps) == {"1 profile", "2 reference", "3 ranks", "4 memory", "5 timing"}
    assert steps["1 profile"]["nodes"] > 100 and len(steps["1 profile"]["plan_boundaries"]) == 3
    assert steps["2 reference"]["split_vs_unsplit_eps_rel_l2_max"] <= 1e-5
    assert len(steps["2 reference"]["w1_vs_sequential_eps_rel_l2"]) == 3
    ranks = steps["3 ranks"]["ranks"]
    assert sorted(ranks) == ["0", "1"]
    for rank in ranks.values():
        assert rank["allclose"] and max(rank["eps_rel_l2_vs_reference"]) <= 1e-5
        assert rank["memory"]["staged"] is True
        assert rank["memory"]["real_bytes_after_move"] <= 1.05 * rank["memory"]["segment_param_bytes"]
    full = steps["4 memory"]["full_param_bytes"]
    assert sum(r["memory"]["segment_param_bytes"] for r in ranks.values()) < 1.2 * full
    timing = steps["5 timing"]
    assert len(timing["segments"]) == 2 and all(s["eager_ms"] > 0 for s in timing["segments"])
    assert timing["step_eager_ms"] > 0 and timing["compiled"].startswith("skipped (--no-compile")
    names = [c["name"] for c in data["checks"]]
    assert any("2 ranks on one device vs reference" in n for n in names) and all(c["ok"] for c in data["checks"])
    predicted = json.loads((out / "predicted.json").read_text())
    assert [r["config"] for r in predicted["rows"]] == ["N2 S1", "N3 S1", "N4 S1", "N2 S2", "N3 S2"]
    assert all(0 < p <= r["ideal"] + 1e-9 for r in predicted["rows"] for p in r["predicted"].values())
    assert "(prediction)" in (out / "predicted.md").read_text()
    table = (out / "check.md").read_text()
    assert "Passed: **True**" in table and "| segment 1 alone | eager" in table and "| rank 1 | segment weights" in table
