"""The run contract: a bad plan or profile never starts a process, a fault ends the run in bounded
time with one line, an interrupt ends every rank and leaves nothing behind."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_profile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff_partition.app import preflight
from asyncdiff_partition.cli.main import main
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.plan import Plan, PlanError, format_plan, ideal_speedup, make_plan
from asyncdiff_partition.core.profile import Profile, ProfileError
from asyncdiff_partition.core.validation import check_plan_graph
from asyncdiff_partition.runtime.launch import GRACE_S, LaunchError, launch

MODEL = "tiny-unet2d-condition"
SCRIPT = Path(sys.executable).parent / "asyncdiff-partition"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real profile and plans of the tiny UNet (N=2, S=1 and S=2), as files."""
    folder = tmp_path_factory.mktemp("contract")
    profile = tiny_profile(MODEL)
    profile_path = profile.save(folder / "profile.json")
    plan = make_plan(profile, 2, steps=3, warmup=1, profile_path=str(profile_path))
    return {"profile": profile_path, "plan": plan.save(folder / "plan.json"),
            "plan-s2": make_plan(profile, 2, stride=2, steps=3, warmup=1).save(folder / "plan-s2.json")}


def _write(folder: str, data: dict, name: str = "file.json") -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file)
    return path


def _one_error_line(text: str) -> str:
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), text[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, text[-2000:]
    assert "Traceback" not in text and "Warning" not in text, text[-2000:]
    return lines[-1]


# --- plan and profile files ------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("n_devices", 100, "world_size must be n_devices + stride - 1 = 100, got 2"),
    ("n_devices", 0, "n_devices must be an integer >= 1, got 0"),
    ("n_devices", math.nan, "n_devices must be an integer, got nan"),
    ("steps", True, "steps must be an integer, got True"),
    ("stride", "1", "stride must be an integer, got '1'"),
    ("stride", -1, "stride must be an integer from 1 to 2, got -1"),
    ("world_size", 3, "world_size must be n_devices + stride - 1 = 2, got 3"),
    ("boundaries", [0, "1340", 1968], "boundaries[1] must be an integer, got '1340'"),
    ("boundaries", [0, 1968, 1340], "boundaries[2] must be greater than boundaries[1]"),
    ("boundaries", [0, 500, 1000, 1968], "boundaries must be a list of 3 entries"),
    ("speeds", [1.0, math.inf], "speeds[1] must be a finite number, got inf"),
    ("link_latency_ms", -1, "link_latency_ms must be a number >= 0, got -1"),
    ("segments", [], "segments must be a list of 2 entries (one per device), got 0 entries"),
])
def test_a_plan_field_that_breaks_a_rule_is_one_line_naming_file_and_field(files, tmp_path, field, value, message):
    data = json.loads(files["plan"].read_text())
    data[field] = value
    path = _write(str(tmp_path), data)
    with pytest.raises(PlanError) as error:
        Plan.load(path)
    text = str(error.value)
    assert text.startswith(f"plan file {path!r}: ") and message in text and "\n" not in text, text
    assert text.endswith("re-run 'asyncdiff-partition plan'")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s[1]["receives"].append({"value": 7, "from_segment": 0, "bytes": 1}), "].value must be a non-empty string, got 7"),
    (lambda s: s[1]["receives"][0].update(from_segment=1), "receives[0].from_segment must be an integer from 0 to 0"),
    (lambda s: s[1]["receives"][0].update(junk=1), "receives[0].junk must be absent"),
    (lambda s: s[0]["receives"].append({"value": "x", "from_segment": 0, "bytes": 1}), "segments[0].receives[0] must be absent"),
    (lambda s: s[1].update(start=5), "segments[1].start must be boundaries[1] = "),
    (lambda s: s[0].pop("param_bytes"), "segments[0].param_bytes must be present"),
])
def test_junk_in_segments_is_refused(files, tmp_path, edit, message):
    data = json.loads(files["plan"].read_text())
    edit(data["segments"])
    with pytest.raises(PlanError, match="plan file .*: segments") as error:
        Plan.load(_write(str(tmp_path), data))
    assert message in str(error.value), str(error.value)


def test_receives_that_do_not_match_the_model_are_refused_before_any_rank(files, tmp_path):
    """Well-formed but wrong: a value that does not cross into the segment (found against the graph)."""
    data = json.loads(files["plan"].read_text())
    data["segments"][1]["receives"][0]["value"] = "conv_out"
    plan = Plan.load(_write(str(tmp_path), data))
    graph = Profile.load(files["profile"]).op_graph()
    check_plan_graph(Plan.load(files["plan"]), graph, files["plan"])  # the original fits
    with pytest.raises(PlanError, match="segments\\[1\\].receives must be the values crossing into segment 1"):
        check_plan_graph(plan, graph, "plan.json")


@pytest.mark.parametrize("field, value, message", [
    ("costs", [], "costs must be a list of "),
    ("threads", 0, "threads must be an integer >= 1, got 0"),
    ("repeats", 1.5, "repeats must be an integer, got 1.5"),
    ("eager_ms", {"median": -1}, "eager_ms.median must be a number >= 0, got -1"),
    ("inputs", [{"name": "x", "shape": [2], "dtype": "float32", "latent": "yes"}], "inputs[0].latent must be true or false"),
])
def test_a_profile_field_that_breaks_a_rule_is_one_line(files, tmp_path, field, value, message):
    data = json.loads(files["profile"].read_text())
    data[field] = value
    path = _write(str(tmp_path), data)
    with pytest.raises(ProfileError) as error:
        Profile.load(path)
    assert str(error.value).startswith(f"profile file {path!r}: ") and message in str(error.value), str(error.value)


JUNK = st.sampled_from([None, True, False, -1, 0, 1, 2, 3, 10**12, 1.5, -0.5, math.nan, math.inf, "", "1", "x",
                        [], [0], [1, 2], {}, {"a": 1}])


@st.composite
def mutations(draw, data):
    """One edit of a JSON tree: a value replaced by junk, a key removed, or a key added."""
    data = copy.deepcopy(data)
    node, key = None, None
    current = data
    while True:  # walk down to a random place
        keys = list(current) if isinstance(current, dict) else list(range(len(current)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        node, current = current, current[key]
        if not isinstance(current, (dict, list)) or draw(st.booleans()):
            break
    if node is None:
        return data
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        node[key] = draw(JUNK)
    elif action == "delete":
        node.pop(key) if isinstance(node, dict) else node.pop(key)
    elif isinstance(node, dict):
        node["surplus"] = draw(JUNK)
    else:
        node.append(draw(JUNK))
    return data


def _uses_of_a_plan(plan: Plan, graph) -> None:
    """What `run` and `plan` do with a loaded plan before any process starts."""
    from asyncdiff_partition.app.settings import RunConfig, run_settings

    world = run_settings(RunConfig(model=None, plan="p.json"), plan).world
    preflight.check_devices(world, oversubscribe=True)
    preflight.plan_ship_bytes(plan)
    ideal_speedup(plan.steps, plan.warmup, plan.n_devices, plan.stride)
    format_plan(plan)
    assert plan.bytes_per_step >= 0 and plan.broadcast_bytes_per_step >= 0
    check_plan_graph(plan, graph, "p.json")


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_plans_are_project_errors_never_crashes(files, data):
    original = json.loads(files["plan"].read_text())
    graph = _graph(files)
    mutated = data.draw(mutations(original))
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, mutated)
        try:
            _uses_of_a_plan(Plan.load(path), graph)
        except AsyncDiffError as error:
            assert "\n" not in str(error)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_profiles_are_project_errors_never_crashes(files, data):
    original = json.loads(files["profile"].read_text())
    original["graph"]["nodes"] = original["graph"]["nodes"][:40]  # a short graph: mutations land everywhere
    original["costs"], original["spread"] = original["costs"][:40], original["spread"][:40]
    mutated = data.draw(mutations(original))
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, mutated)
        try:
            profile = Profile.load(path)
            profile.op_graph()
            assert profile.accuracy == profile.accuracy or profile.eager_ms["median"] == 0
        except AsyncDiffError as error:
            assert "\n" not in str(error)


_GRAPHS: dict = {}


def _graph(files):
    if "g" not in _GRAPHS:
        _GRAPHS["g"] = Profile.load(files["profile"]).op_graph()
    return _GRAPHS["g"]


# --- checks before any rank starts (in process: each fails before the capture) ----------------


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """A TMPDIR of this test's own, seen by this process and the processes it starts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return folder


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), obj={})


def test_more_ranks_than_devices_needs_oversubscribe(files, tmpdir_env, tmp_path):
    count, what = preflight.devices_present()
    if count >= 3:
        pytest.skip(f"{count} {what}: a stride-2 plan of 3 ranks fits")
    result = _cli("run", "--plan", str(files["plan-s2"]), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert f"the run needs 3 processes but this machine has {count} {what}" in line and "--oversubscribe" in line
    assert not list(tmpdir_env.iterdir())
    preflight.check_devices(3, oversubscribe=True, present=(2, "CPU cores"))  # the flag lets it through


def test_a_temp_folder_too_small_for_the_segments_is_named_with_the_tmpdir_hint(files, tmpdir_env, tmp_path):
    data = json.loads(files["plan"].read_text())
    data["segments"][0]["param_bytes"] = 1 << 60  # an exbibyte of weights to ship
    result = _cli("run", "--plan", _write(str(tmp_path), data), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "writes about" in line and f"temp folder {str(tmpdir_env)!r}" in line and "TMPDIR" in line, line
    assert not list(tmpdir_env.iterdir())


@pytest.mark.parametrize("out", ["/proc/asyncdiff-out", "{file}/out"])
def test_an_unwritable_out_is_found_before_the_run(files, tmpdir_env, tmp_path, out):
    (tmp_path / "file").write_text("")
    out = out.replace("{file}", str(tmp_path / "file"))
    result = _cli("run", "--plan", str(files["plan"]), "--out", out)
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert line.startswith(f"error: --out folder {out!r} is not writable ("), line
    assert not list(tmpdir_env.iterdir())


def test_a_bad_plan_is_one_line_through_the_cli(files, tmp_path):
    data = json.loads(files["plan"].read_text())
    data["n_devices"], data["world_size"] = 100, 100
    result = _cli("run", "--plan", _write(str(tmp_path), data, "plan.json"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "boundaries must be a list of 101 entries (n_devices + 1)" in _one_error_line(result.output)


# --- faults and signals on real processes ----------------------------------------------------

SCENARIOS = ("sigint", "sigterm", "sigstop", "sigkill")
TIMEOUT_S = 5


def _tree(root: int) -> set[int]:
    """``root`` and its descendants now (a /proc scan)."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(parents.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _scenario(how: str, plan: Path, folder: Path) -> dict:
    """Start `asyncdiff-partition run`, fault or signal it once its ranks run, watch it end."""
    tmp = folder / "tmp"
    tmp.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    env.pop("ASYNCDIFF_DEBUG", None)
    env.pop("ASYNCDIFF_START_METHOD", None)  # the product's default start method (conftest sets forkserver)
    command = [str(SCRIPT), "--threads", "1", "run", "--plan", str(plan), "--steps", "999", "--out", str(folder / "out"),
               "--timeout", str(TIMEOUT_S)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stdout.read1(4096), b"")), daemon=True)
    reader.start()
    seen: set[int] = set()
    ranks: dict[int, int] = {}
    deadline = time.monotonic() + 400
    # SIGINT / SIGTERM once the ranks exist; a hang or a kill once they sample (rank 0's progress bar).
    ready = (lambda: len(ranks) == 2) if how in ("sigint", "sigterm") else (lambda: b"sampling" in b"".join(chunks))
    while process.poll() is None and time.monotonic() < deadline and not (len(ranks) == 2 and ready()):
        seen |= _tree(process.pid)
        for record in glob.glob(str(tmp / "asyncdiff-launch-*" / "pid*.json")):
            try:
                ranks[int(Path(record).stem[3:])] = json.loads(Path(record).read_text())["pid"]
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
    assert process.poll() is None, b"".join(chunks).decode(errors="replace")
    seen |= _tree(process.pid)
    sent = time.monotonic()
    if how == "sigint":
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    elif how == "sigterm":
        os.kill(process.pid, signal.SIGTERM)
    elif how == "sigstop":
        os.kill(ranks[1], signal.SIGSTOP)
    else:
        os.kill(ranks[1], signal.SIGKILL)
    try:
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    elapsed = time.monotonic() - sent
    reader.join(10)
    time.sleep(0.5)  # orphans, if any, would still be alive now
    return {"code": process.returncode, "elapsed": elapsed, "output": b"".join(chunks).decode(errors="replace"),
            "left": sorted(pid for pid in seen | set(ranks.values()) if pid != process.pid and _alive(pid)),
            "temp": sorted(p.name for p in tmp.iterdir() if p.name.startswith(("asyncdiff-", "torchelastic_")))}


@pytest.fixture(scope="module")
def outcomes(files, tmp_path_factory):
    """The four scenarios, run at the same time (each is mostly start-up on two cores)."""
    folder = tmp_path_factory.mktemp("scenarios")
    results: dict[str, dict] = {}

    def one(how: str) -> None:
        try:
            results[how] = _scenario(how, files["plan"], folder / how)
        except BaseException as error:  # noqa: BLE001 - reported by the test that reads it
            results[how] = {"error": repr(error)}

    threads = [threading.Thread(target=one, args=(how,)) for how in SCENARIOS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _check_clean(outcome: dict) -> str:
    assert "error" not in outcome, outcome.get("error")
    assert outcome["left"] == [], f"processes left: {outcome['left']}"
    assert outcome["temp"] == [], f"temp folders left: {outcome['temp']}"
    return _one_error_line(outcome["output"])


@pytest.mark.parametrize("how, code", [("sigint", 130), ("sigterm", 143)])
def test_an_interrupt_ends_every_rank_with_one_line(outcomes, how, code):
    outcome = outcomes[how]
    line = _check_clean(outcome)
    assert outcome["code"] == code and line == "error: interrupted", outcome["output"][-2000:]


def test_steps_the_scheduler_cannot_take_are_refused_before_any_rank(files, tmp_path):
    from asyncdiff_partition.app.pipeline_backend import check_scheduler_steps
    from asyncdiff_partition.core.errors import ConfigError
    from asyncdiff_partition.pipelines.offline import build_pipeline

    scheduler = build_pipeline("tiny-unet2d-condition", seed=0).pipe.scheduler  # steps_offset=1, leading
    check_scheduler_steps(scheduler, 999)
    with pytest.raises(ConfigError, match="--steps 1000 gives timestep 1000 .* use at most 999 steps"):
        check_scheduler_steps(scheduler, 1000)


def test_a_hung_rank_ends_the_run_within_the_timeout_and_a_grace(outcomes):
    outcome = outcomes["sigstop"]
    line = _check_clean(outcome)
    assert outcome["code"] == 1
    assert line.startswith("error: rank 1 stopped answering") and "rank 0 failed: PeerError: rank 0: " in line, line
    # The bound is TIMEOUT_S + GRACE_S + a poll; the rest is slack for a loaded two-core machine.
    assert outcome["elapsed"] < TIMEOUT_S + GRACE_S + 12, outcome["elapsed"]


def test_a_killed_rank_is_the_last_line(outcomes):
    outcome = outcomes["sigkill"]
    line = _check_clean(outcome)
    assert outcome["code"] == 1 and line.startswith("error: rank 1 failed: exit code -9"), outcome["output"][-2000:]


# --- soak ---------------------------------------------------------------------------------------


def _square(x: int) -> int:
    return x * x


def _fail_on_rank_one(x: int) -> int:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one refuses")
    return x


def test_twenty_launches_leave_no_process_folder_or_descriptor(tmpdir_env):
    """20 launches in a row (2 ranks each, every fourth failing) in this process: no growth.

    launch() on a trivial function with fork, not 20 full `run`s: those would take minutes on
    two cores, and the launcher path (agent, watchdog, records, signals, temp folders) is the same.
    """
    def children() -> set[int]:
        return {pid for pid in _tree(os.getpid()) if pid != os.getpid() and _alive(pid)}

    assert launch(_square, (3,), 2, timeout_s=30, start_method="fork") == {0: 9, 1: 9}  # warm: resource tracker
    before_children, before_fds = children(), len(os.listdir("/proc/self/fd"))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for i in range(20):
        if i % 4 == 3:
            with pytest.raises(LaunchError, match="rank 1 failed: ValueError: rank one refuses"):
                launch(_fail_on_rank_one, (i,), 2, timeout_s=30, start_method="fork")
        else:
            assert launch(_square, (i,), 2, timeout_s=30, start_method="fork") == {0: i * i, 1: i * i}
    time.sleep(0.5)
    assert children() <= before_children
    assert len(os.listdir("/proc/self/fd")) <= before_fds
    assert list(tmpdir_env.iterdir()) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def _environment_of_rank(name: str) -> tuple[str | None, str]:
    return os.environ.get(name), os.environ["RANK"]


def test_forkserver_ranks_see_the_launching_environment_of_the_moment(monkeypatch):
    """The fork server keeps the environment it started with; its ranks get the launcher's (Note [forkserver])."""
    monkeypatch.setenv("ASYNCDIFF_TEST_FLAG", "first")
    assert launch(_environment_of_rank, ("ASYNCDIFF_TEST_FLAG",), 2, start_method="forkserver") == {
        0: ("first", "0"), 1: ("first", "1")}
    monkeypatch.setenv("ASYNCDIFF_TEST_FLAG", "second")
    assert launch(_environment_of_rank, ("ASYNCDIFF_TEST_FLAG",), 2, start_method="forkserver")[1] == ("second", "1")
    monkeypatch.delenv("ASYNCDIFF_TEST_FLAG")
    assert launch(_environment_of_rank, ("ASYNCDIFF_TEST_FLAG",), 2, start_method="forkserver")[0] == (None, "0")
    with pytest.raises(AsyncDiffError, match="start method must be one of spawn, fork, forkserver, got 'threads'"):
        launch(_square, (1,), 2, start_method="threads")


def _killed_on_rank_one() -> None:
    from asyncdiff_partition.runtime import comm

    comm.init(timeout_s=10)
    if comm.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    comm.barrier("the barrier with rank 1")


def test_a_rank_killed_under_the_fork_server_ends_the_run_with_one_line_naming_it():
    """The killed rank, or (its death reaching the agent through the server) the peer that lost it."""
    begin = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        launch(_killed_on_rank_one, (), 2, timeout_s=10, start_method="forkserver")
    message = str(caught.value)
    assert message.startswith(("rank 1 failed: exit code -9", "rank 0 failed: PeerError")), message
    assert "rank 1" in message and "\n" not in message and time.monotonic() - begin < 10 + GRACE_S + 5


def test_a_warmup_that_covers_every_step_is_noted():
    from asyncdiff_partition.app.settings import RunSettings

    assert "every step runs exactly" in RunSettings(steps=5, warmup=50, stride=1, world=2).note
    assert RunSettings(steps=20, warmup=1, stride=1, world=2).note is None
