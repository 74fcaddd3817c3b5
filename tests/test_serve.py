"""The `serve` command: a real server process on 127.0.0.1, a tiny SD pipeline on 2 engine ranks, an httpx client.

Every image the service returns is compared, as PNG bytes, with the single-process reference
schedule run here with the same seed and size (same profile cache, so the same plans): requests
sent together at two sizes, a batched pair against the same two alone, a batch that loses one
client part way. A killed rank fails the requests in flight with 503 and the next request is
served on new ranks; bad requests get one OpenAI-shaped 4xx each; SIGTERM lets the request in
flight finish, refuses new ones and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from click.testing import CliRunner
from tiny_pipelines import build

from asyncdiff_partition.app.serve.encoding import png_b64
from asyncdiff_partition.cli.main import main
from asyncdiff_partition.pipelines.loading import load_pipeline
from asyncdiff_partition.pipelines.parallelize import parallelize, unparallelize

STEPS = 4
LONG = 80  # steps of a request that must still run while the test acts on it
WINDOW_MS = 400  # admission window: requests sent together are batched
ROUTE = "/v1/images/generations"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    pipe, _ = build("sd", root / "tokenizers")
    pipe.save_pretrained(root / "sd")
    return str(root / "sd"), str(root / "cache")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(folder):
    path, cache = folder
    port = _free_port()
    command = [sys.executable, "-c", "from asyncdiff_partition.cli.main import main; main()", "--threads", "1", "serve",
               "--model", path, "--devices", "2", "--port", str(port), "--admission-window-ms", str(WINDOW_MS),
               "--max-batch", "4", "--max-n", "2", "--max-size", "64", "--max-steps", str(LONG), "--drain", "30"]
    process = subprocess.Popen(command, env={**os.environ, "ASYNCDIFF_CACHE": cache}, stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.3)
    yield process, client, port
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def reference_pipe(folder):
    path, cache = folder
    pipe = parallelize(load_pipeline(path), devices=2, warmup=1, reference=True, cache_dir=cache)
    yield pipe
    unparallelize(pipe)


@pytest.fixture(scope="module")
def reference(reference_pipe):
    """PNG (base64) of a request as the single-process reference schedule gives it (made lazily: the server's
    profiles must be cached first, so that the reference plans as the server did)."""
    made = {}

    def image(seed: int, size: int, steps: int = STEPS) -> str:
        if (seed, size, steps) not in made:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the server (--threads 1): kernels round differently with more threads
            try:
                out = reference_pipe(prompt=["a red cube"], height=size, width=size, num_inference_steps=steps,
                                     generator=[torch.Generator().manual_seed(seed)], output_type="pil")
            finally:
                torch.set_num_threads(threads)
            made[(seed, size, steps)] = png_b64(out.images[0])
        return made[(seed, size, steps)]

    return image


def _body(seed: int, size: int = 16, steps: int = STEPS, **extra) -> dict:
    return {"prompt": "a red cube", "size": f"{size}x{size}", "num_inference_steps": steps, "seed": seed, **extra}


def _image(client: httpx.Client, body: dict) -> str:
    response = client.post(ROUTE, json=body)
    assert response.status_code == 200, response.text
    (entry,) = response.json()["data"]
    return entry["b64_json"]


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _pids(client: httpx.Client) -> list[int]:
    return [r["pid"] for r in client.get("/health").json()["ranks"]]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


class _Stream:
    """A streaming request: its progress events can be waited for before the test acts."""

    def __init__(self, client: httpx.Client, body: dict):
        self.context = client.stream("POST", ROUTE, json={**body, "stream": True})
        self.response = self.context.__enter__()
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()

    def event(self) -> tuple[str, object]:
        kind = "message"
        for line in self.lines:
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
                return kind, data if data == "[DONE]" else json.loads(data)
        raise AssertionError("the stream ended")

    def close(self) -> None:
        self.context.__exit__(None, None, None)


def test_requests_sent_together_at_two_sizes_equal_the_reference(server, reference):
    _, client, _ = server
    bodies = [_body(1, 16), _body(2, 24), _body(3, 16), _body(4, 24)]
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda b: _image(client, b), bodies))
    for body, image in zip(bodies, images):
        size = int(body["size"].split("x")[0])
        assert image == reference(body["seed"], size), f"seed {body['seed']}, {size} px: served vs reference"
    assert _metric(client, "asyncdiff_serve_batch_images_count") < len(bodies)  # some were batched


def test_a_batched_pair_equals_the_two_alone_and_a_request_repeats(server):
    _, client, _ = server
    before = _metric(client, "asyncdiff_serve_batch_images_sum") - _metric(client, "asyncdiff_serve_batch_images_count")
    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda s: _image(client, _body(s)), [11, 12]))
    after = _metric(client, "asyncdiff_serve_batch_images_sum") - _metric(client, "asyncdiff_serve_batch_images_count")
    assert after - before == 1  # the two ran as one call of 2 images
    alone = [_image(client, _body(s)) for s in (11, 12)]
    assert pair == alone and pair[0] != pair[1]
    two = client.post(ROUTE, json=_body(11, n=2)).json()["data"]  # n = 2: seeds 11 and 12
    assert [e["b64_json"] for e in two] == alone and [e["seed"] for e in two] == [11, 12]


def test_a_client_that_goes_away_is_cancelled_and_its_batch_finishes(server, reference):
    _, client, _ = server
    cancelled = _metric(client, 'asyncdiff_serve_requests_total{outcome="cancelled"}')
    with ThreadPoolExecutor(1) as pool:
        kept = pool.submit(_image, client, _body(7, steps=LONG))
        stream = _Stream(client, _body(8, steps=LONG))
        assert stream.event()[0] == "progress"
        stream.close()  # the client goes away mid-call: its row is dropped, the other row finishes
        assert kept.result() == reference(7, 16, LONG)
    alone = _Stream(client, _body(9, steps=LONG))  # alone: the call itself stops at its next step ...
    assert alone.event()[0] == "progress"
    alone.close()
    assert _image(client, _body(7, steps=LONG)) == reference(7, 16, LONG)  # ... and the next call is right
    deadline = time.monotonic() + 10
    while _metric(client, 'asyncdiff_serve_requests_total{outcome="cancelled"}') < cancelled + 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_killed_rank_fails_the_requests_in_flight_with_503_and_the_next_request_succeeds(server, reference):
    _, client, _ = server
    old = _pids(client)
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(client.post, ROUTE, json=_body(21, steps=LONG))
        stream = _Stream(client, _body(22, steps=LONG))
        assert stream.event()[0] == "progress"
        os.kill(old[1], signal.SIGKILL)
        kind, data = stream.event()
        while kind == "progress":
            kind, data = stream.event()
        stream.close()
        response = plain.result()
    assert kind == "error" and data["error"]["code"] == "ranks_failed", data
    assert response.status_code == 503 and "rank 1" in response.json()["error"]["message"], response.text
    assert _image(client, _body(1)) == reference(1, 16)  # new ranks, the same plans
    assert client.get("/health").status_code == 200 and not set(_pids(client)) & set(old)
    assert all(_gone(pid) for pid in old)
    assert _metric(client, 'asyncdiff_serve_requests_total{outcome="failed"}') == 2


@pytest.mark.parametrize("content, param", [
    ('{"prompt": "a red cube", "size": ', None),                              # malformed JSON
    ('{"prompt": "a red cube", "sizes": "16x16"}', "sizes"),                  # unknown field
    ('{"prompt": "a red cube", "size": "20x16"}', "size"),                    # not a multiple of 8
    ('{"prompt": "a red cube", "size": "128x128"}', "size"),                  # over --max-size
    ('{"prompt": "a red cube", "n": 3}', "n"),                                # over --max-n
    ('{"prompt": "a red cube", "num_inference_steps": 0}', "num_inference_steps"),
    ('{"size": "16x16"}', "prompt"),                                          # missing prompt
    ('{"prompt": "a red cube", "response_format": "url"}', "response_format"),
    ('{"prompt": "a red cube", "image": "not base64!"}', "image"),
])
def test_bad_requests_get_one_openai_error_and_the_service_carries_on(server, content, param):
    _, client, _ = server
    response = client.post(ROUTE, content=content, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert client.get("/health").status_code == 200


def test_exact_rows_give_each_image_the_numbers_it_gets_alone_and_fused_batching_does_not(server, reference_pipe):
    """PNG bytes hide differences below 1/255: here the pipeline's float output, on the reference schedule's
    streams (one per image row), after the server made the plans."""
    from asyncdiff_partition.app.serve.rows import exact_rows
    from asyncdiff_partition.pipelines.recording import components

    modules = {n: m for n, m in components(reference_pipe).items() if isinstance(m, torch.nn.Module)}

    prompts = ["a red cube", "a blue ball"]

    def sample(seeds, rows):
        with exact_rows(reference_pipe, rows, modules):
            out = reference_pipe(prompt=[prompts[s % 2] for s in seeds], height=16, width=16, num_inference_steps=STEPS,
                                 generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")
        return out.images

    exact, fused = sample([30, 31], 2), sample([30, 31], 1)
    alone = [sample([30], 1)[0], sample([31], 1)[0]]
    assert torch.equal(exact[0], alone[0]) and torch.equal(exact[1], alone[1]) and not torch.equal(alone[0], alone[1])
    difference = (fused - exact).abs().max().item()
    assert 0 < difference < 1e-4, difference  # fused: one batched call, close but not equal


def test_models_and_metrics(server):
    _, client, _ = server
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["sd"]
    text = client.get("/metrics").text
    for name in ("asyncdiff_serve_queue_depth", "asyncdiff_serve_request_seconds_bucket", 'stage="compile"',
                 'asyncdiff_serve_rank_step_seconds{kind="compute",rank="1"}'):
        assert name in text


def test_sigterm_drains_the_request_in_flight_and_leaves_no_process(server, reference):
    process, client, port = server
    pids = _pids(client)
    stream = _Stream(client, _body(7, steps=LONG))
    assert stream.event()[0] == "progress"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = client.post(ROUTE, json=_body(1))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    kind, data = stream.event()
    while kind == "progress":
        kind, data = stream.event()
    assert data["data"][0]["b64_json"] == reference(7, 16, LONG)  # the request in flight finished
    assert stream.event()[1] == "[DONE]"
    stream.close()
    assert process.wait(30) == 0
    assert all(_gone(pid) for pid in [*pids, process.pid])


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/folder"], "not a pipeline folder"),
    (["--model", "{folder}", "--max-n", "8", "--max-batch", "4"], "--max-n 8 is more than --max-batch 4"),
    (["--model", "{folder}", "--devices", "3", "--batch-parallel", "2"], "do not split"),
])
def test_command_line_mistakes_are_one_line_before_any_rank_starts(folder, args, message):
    args = [a.replace("{folder}", folder[0]) for a in args]
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_batcher_takes_the_oldest_key_bounds_the_images_and_refuses_a_full_queue():
    from asyncdiff_partition.app.serve.batcher import Batcher, Closed, Job, QueueFull

    batcher = Batcher(max_queue=4, max_rows=3, window_s=0.01)
    jobs = [Job(key=key, rows=rows, spec=None) for key, rows in [("a", 1), ("b", 1), ("a", 2), ("a", 1)]]
    for job in jobs:
        batcher.put(job)
    with pytest.raises(QueueFull, match="--max-queue 4"):
        batcher.put(Job(key="a", rows=1, spec=None))
    assert batcher.take() == [jobs[0], jobs[2]] and not batcher.idle()  # 3 images at most; "b" keeps its place
    batcher.finish()
    jobs[3].cancelled.set()  # a client that went away while waiting is never run
    assert batcher.take() == [jobs[1]]
    batcher.finish()
    batcher.close()
    assert batcher.take() is None and batcher.idle()
    with pytest.raises(Closed):
        batcher.put(Job(key="a", rows=1, spec=None))


def test_after_more_failures_than_restarts_health_says_why_and_requests_get_503(folder):
    from types import SimpleNamespace

    from asyncdiff_partition.app.serve.options import ServeOptions
    from asyncdiff_partition.app.serve.schema import RequestError
    from asyncdiff_partition.app.serve.service import Service

    service = Service(ServeOptions(model=folder[0]).checked())
    service.runner = SimpleNamespace(engine=SimpleNamespace(failures=3, restarts=2, pool=None))  # what Engine counts
    service.last_error = "rank 1 died while running a command (exit code -9)"
    status, body = service.health()
    assert status == 503 and body["status"] == "failed" and "3 times in a row" in body["reason"]
    assert "rank 1 died" in body["reason"]
    with pytest.raises(RequestError) as refused:
        service.submit(None)
    assert refused.value.status == 503 and refused.value.code == "ranks_failed"
