"""Load test of `asyncdiff-partition serve`: bounded concurrent clients on 127.0.0.1, mixed sizes and prompts.

    python benchmarks/serve/load.py --tiny --rounds 3              # the tiny SD pipeline (built here)
    python benchmarks/serve/load.py --model /tmp/sd21 --sizes 256 --steps 4 --requests 4 --clients 1,2

Every configuration runs in a fresh server process, the configurations interleaved round by round;
the table holds medians over rounds. Configurations:

* ``engine2``: ``serve --devices 2`` (the denoiser in 2 segments on 2 ranks, one thread each);
* ``plain1t`` / ``plain2t``: ``serve --devices 1`` (the plain pipeline in the serving process, no
  ranks) with 1 or 2 threads;
* ``replicas2``: two ``plain1t`` servers, the client alternating between them (what a load
  balancer in front of two independent replicas does).

Each (configuration, clients) runs ``--requests`` requests at most and ``--time-limit`` seconds at
most after one warm-up request per size. ``--kill-rank`` adds one ``engine2`` run in which rank 1
is killed (SIGKILL) half way: its errors and the recovery are reported. Nothing but 127.0.0.1 is
contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube", "a blue ball on a table", "a green tree in the fog", "two cats", "an old map of a city"]
CONFIGS = {
    "engine2": [{"devices": 2, "threads": 1}],
    "plain1t": [{"devices": 1, "threads": 1}],
    "plain2t": [{"devices": 1, "threads": 2}],
    "replicas2": [{"devices": 1, "threads": 1}, {"devices": 1, "threads": 1}],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `serve` process on 127.0.0.1."""

    def __init__(self, model: str, devices: int, threads: int, cache: str, max_size: int, max_steps: int,
                 batching: str):
        self.port = free_port()
        command = [sys.executable, "-c", "from asyncdiff_partition.cli.main import main; main()", "--threads",
                   str(threads), "serve", "--model", model, "--devices", str(devices), "--port", str(self.port),
                   "--max-size", str(max_size), "--max-steps", str(max_steps), "--batching", batching,
                   "--max-queue", "256", "--request-timeout", "600"]
        self.process = subprocess.Popen(command, env={**os.environ, "ASYNCDIFF_CACHE": cache},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.began = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.process.stderr.read() if self.process.stderr else ''}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        self.ready_s = time.perf_counter() - self.began

    def pids(self) -> list[int]:
        return [r["pid"] for r in httpx.get(self.url + "/health", timeout=10).json()["ranks"]]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def body(rng: random.Random, sizes: list[int], steps: int) -> dict[str, Any]:
    size = rng.choice(sizes)
    return {"prompt": rng.choice(PROMPTS), "size": f"{size}x{size}", "num_inference_steps": steps,
            "seed": rng.randrange(2**31)}


def load(urls: list[str], clients: int, requests: int, time_limit: float, sizes: list[int], steps: int, seed: int,
         on_half: Any = None) -> dict[str, Any]:
    """``clients`` threads sending requests until ``requests`` were sent or ``time_limit`` passed."""
    lock = threading.Lock()
    sent = [0]
    results: list[tuple[float, int]] = []
    begin = time.perf_counter()
    halfway = threading.Event()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if sent[0] >= requests or time.perf_counter() - begin > time_limit:
                        return
                    ticket = sent[0]
                    sent[0] += 1
                url = urls[ticket % len(urls)]
                start = time.perf_counter()
                try:
                    status = http.post(url + "/v1/images/generations", json=body(rng, sizes, steps)).status_code
                except httpx.TransportError:
                    status = -1
                with lock:
                    results.append((time.perf_counter() - start, status))
                    if len(results) >= requests // 2 and not halfway.is_set():
                        halfway.set()
                        if on_half is not None:
                            on_half()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ok = sorted(latency for latency, status in results if status == 200)
    errors: dict[str, int] = {}
    for _, status in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    return {"requests": len(results), "ok": len(ok), "wall_s": wall, "throughput": len(ok) / wall,
            "p50_s": statistics.median(ok) if ok else None,
            "p95_s": ok[min(len(ok) - 1, int(round(0.95 * (len(ok) - 1))))] if ok else None, "errors": errors}


def run_config(name: str, args: argparse.Namespace, clients: int, seed: int, kill: bool = False) -> dict[str, Any]:
    servers = [Server(args.model, s["devices"], s["threads"], args.cache, max(args.sizes), args.steps, args.batching)
               for s in CONFIGS[name]]
    try:
        urls = [s.url for s in servers]
        for server in servers:  # warm-up: every size prepared (recorded, captured, planned) before the clock
            for size in args.sizes:
                response = httpx.post(server.url + "/v1/images/generations", timeout=3600,
                                      json={"prompt": "warm", "size": f"{size}x{size}", "num_inference_steps": args.steps})
                response.raise_for_status()
        killed: list[int] = []

        def kill_rank() -> None:
            pid = servers[0].pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        result = load(urls, clients, args.requests, args.time_limit, args.sizes, args.steps, seed,
                      on_half=kill_rank if kill else None)
        if kill:
            after = httpx.post(urls[0] + "/v1/images/generations", timeout=600,
                               json={"prompt": "after", "size": f"{args.sizes[0]}x{args.sizes[0]}",
                                     "num_inference_steps": args.steps})
            health = httpx.get(urls[0] + "/health", timeout=10).json()
            result.update(killed_pid=killed, after_kill_status=after.status_code,
                          new_pids=[r["pid"] for r in health["ranks"]])
        result.update(config=name, clients=clients, ready_s=[round(s.ready_s, 1) for s in servers])
        return result
    finally:
        for server in servers:
            server.stop()


def tiny_pipeline(folder: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipelines import build

    out = Path(folder) / "sd"
    if not (out / "model_index.json").is_file():
        pipe, _ = build("sd", Path(folder) / "tokenizers")
        pipe.save_pretrained(out)
    return str(out)


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["clients"], "killed_pid" in row), []).append(row)
    lines = ["| configuration | clients | runs | throughput (img/s) | p50 (s) | p95 (s) | errors |",
             "|---|---|---|---|---|---|---|"]

    def med(values: list[Any]) -> str:
        values = [v for v in values if v is not None]
        return f"{statistics.median(values):.3f}" if values else "-"

    for (config, clients, killed), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        errors: dict[str, int] = {}
        for r in runs:
            for status, count in r["errors"].items():
                errors[status] = errors.get(status, 0) + count
        label = config + (" (rank 1 killed half way)" if killed else "")
        shown = ", ".join(f"{n}x{s}" for s, n in sorted(errors.items())) or "0"
        lines.append(f"| {label} | {clients} | {len(runs)} | {med([r['throughput'] for r in runs])} | "
                     f"{med([r['p50_s'] for r in runs])} | {med([r['p95_s'] for r in runs])} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="pipeline folder; or --tiny")
    parser.add_argument("--tiny", action="store_true", help="build and serve the tests' tiny SD pipeline")
    parser.add_argument("--configs", default="engine2,plain1t,plain2t,replicas2")
    parser.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated (low and high load)")
    parser.add_argument("--requests", type=int, default=24, help="requests per run at most")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per run at most")
    parser.add_argument("--sizes", default="32,64", help="image sizes (px), mixed at random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batching", default="exact", choices=["exact", "fused"])
    parser.add_argument("--kill-rank", action="store_true", help="also an engine2 run with rank 1 killed half way")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="asyncdiff-serve-bench-")
    args.cache = os.path.join(work, "cache")
    args.model = tiny_pipeline(work) if args.tiny else args.model
    if not args.model:
        parser.error("give --model PIPELINE_DIR or --tiny")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for r in range(args.rounds):
        for clients in [int(c) for c in args.clients.split(",")]:
            for name in args.configs.split(","):
                row = run_config(name, args, clients, seed=r)
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.kill_rank:
            clients = max(int(c) for c in args.clients.split(","))
            row = run_config("engine2", args, clients, seed=r, kill=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "model": args.model, "sizes": args.sizes,
            "steps": args.steps, "batching": args.batching}
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
