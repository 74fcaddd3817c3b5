"""Run reports and Chrome traces: valid JSON with the expected fields, summaries that add up."""

from __future__ import annotations

import json
import math

import pytest

from asyncdiff_partition.app.report import format_run, load_report, summarize_steps, write_report, write_trace
from asyncdiff_partition.core.files import FileFormatError


def rows(rank: int, compute: list[float], wait: float = 1.0, sent: int = 100) -> list[dict]:
    return [{"step": s, "rank": rank, "compute_ms": c, "wait_ms": wait, "comm_ms": 0.5, "bytes_sent": sent}
            for s, c in enumerate(compute)]


REPORTS = {0: rows(0, [10.0, 4.0, 4.0, 6.0]), 1: rows(1, [0.0, 5.0, 3.0, 3.0], wait=2.0, sent=300)}


def test_summary_takes_the_slowest_rank_per_step_and_sums_bytes():
    s = summarize_steps(REPORTS, warmup=1)
    # step times: max over ranks of compute + wait + comm
    assert [max(10 + 1.5, 0 + 2.5), max(5.5, 7.5), max(5.5, 5.5), max(7.5, 5.5)] == [11.5, 7.5, 5.5, 7.5]
    assert s["ranks"] == 2 and s["steps"] == 4
    assert s["step_ms"]["median"] == pytest.approx(7.5)
    assert s["step_ms"]["max"] == pytest.approx(11.5) and s["total_ms"] == pytest.approx(32.0)
    assert s["bytes_sent_per_step"]["median"] == 400 and s["bytes_sent_total"] == 1600
    assert s["warmup_step_ms"]["median"] == pytest.approx(11.5)
    assert s["async_step_ms"]["median"] == pytest.approx(7.5)
    assert [r["rank"] for r in s["per_rank"]] == [0, 1]
    assert s["per_rank"][1]["wait_ms"] == 2.0 and s["per_rank"][1]["bytes_sent_per_step"] == 300


def test_summary_accepts_a_list_indexed_by_rank():
    assert summarize_steps([REPORTS[0], REPORTS[1]]) == summarize_steps(REPORTS)


def test_empty_report_summarises_to_nan_and_formats():
    s = summarize_steps({0: []}, warmup=0)
    assert s["steps"] == 0 and math.isnan(s["step_ms"]["median"])
    assert "0 steps on 1 rank(s)" in format_run(s)


def test_report_file_round_trips_with_meta_summary_and_rows(tmp_path):
    path = write_report(tmp_path / "sub" / "report.json", REPORTS, {"model": "tiny-dit", "warmup": 1, "steps": 4})
    data = load_report(path)
    assert data["kind"] == "run_report" and data["schema_version"] == 1
    assert data["meta"] == {"model": "tiny-dit", "warmup": 1, "steps": 4}
    assert data["summary"]["async_step_ms"]["median"] == pytest.approx(7.5)
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert data["ranks"][1]["steps"][2] == REPORTS[1][2]
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write leaves no temp file


def test_a_trace_is_not_a_report(tmp_path):
    trace = write_trace(tmp_path / "t.json", {0: []})
    with pytest.raises(FileFormatError, match="not a run_report file"):
        load_report(trace)


def test_trace_is_chrome_trace_event_format(tmp_path):
    spans = {
        0: [{"name": "segment 0", "start_s": 100.0, "end_s": 100.25}, {"name": "send", "start_s": 100.25,
                                                                       "end_s": 100.3, "bytes": 64}],
        1: [{"name": "segment 1", "start_s": 100.1, "end_s": 100.2}],
    }
    data = json.loads(write_trace(tmp_path / "trace.json", spans).read_text())
    assert set(data) >= {"traceEvents"}
    complete = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 3
    for event in complete:
        assert set(event) >= {"name", "ph", "ts", "dur", "pid", "tid"}
        assert event["pid"] == 0 and event["dur"] >= 0
    first = next(e for e in complete if e["name"] == "segment 0")
    assert first["ts"] == 0 and first["dur"] == pytest.approx(250_000) and first["tid"] == 0
    second = next(e for e in complete if e["name"] == "segment 1")
    assert second["ts"] == pytest.approx(100_000) and second["tid"] == 1
    assert next(e for e in complete if e["name"] == "send")["args"] == {"bytes": 64}
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1"}


def test_format_run_is_one_line_with_the_parts():
    line = format_run(summarize_steps(REPORTS, warmup=1), wall_s=1.234)
    assert "\n" not in line
    assert "4 steps on 2 rank(s)" in line and "warm-up 11.5 ms" in line and "async 7.5 ms" in line
    assert "400 B sent per step" in line and "wall 1.23 s" in line
