"""Per-node cost profiling on the target device (the file format is :mod:`asyncdiff_partition.core.profile`)."""

from __future__ import annotations

import datetime
import platform
import resource
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.profile import (
    Profile,
    ProfileError,
    fingerprint,
    peak_live_bytes,
)
from asyncdiff_partition.fx.capture import CapturedModel
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.split import split_graph

__all__ = ["NodeTimer", "device_name", "library_versions", "profile_model", "time_each_segment", "time_segments"]


class NodeTimer(torch.fx.Interpreter):
    """Runs the graph and appends each node's duration (ms) to ``self.times[node.name]``."""

    def __init__(self, gm: torch.fx.GraphModule, *, cuda: bool = False, cuda_sync: bool = False):
        super().__init__(gm)
        self.cuda, self.cuda_sync = cuda, cuda_sync
        self.times: dict[str, list[float]] = {node.name: [] for node in gm.graph.nodes}
        self._events: list[tuple[str, Any, Any]] = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._events = []
        result = super().run(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.times[name].append(start.elapsed_time(end))
        return result

    def run_node(self, node: torch.fx.Node) -> Any:
        if self.cuda:
            if self.cuda_sync:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = super().run_node(node)
            end.record()
            if self.cuda_sync:
                torch.cuda.synchronize()
            self._events.append((node.name, start, end))
            return result
        begin = time.perf_counter()
        result = super().run_node(node)
        self.times[node.name].append((time.perf_counter() - begin) * 1e3)
        return result


def profile_model(
    captured: CapturedModel,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    cuda_sync: bool = False,
    progress: bool = False,
    command: str = "",
) -> Profile:
    """Measure every node of a captured model on ``device``.

    Args:
        captured: from :func:`~asyncdiff_partition.fx.capture.capture_model`; its example inputs
            are the inputs profiled.
        model_name: recorded in the profile (zoo name or directory); default the model's class name.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; the model is moved there.
        warmup: untimed runs first (allocator, caches, lazy initialisation).
        repeats: timed runs; each node's cost is the median over them.
        cuda_sync: on CUDA, synchronise around every node (see the module docstring).
        progress: show a progress bar on stderr.
        command: the command line that made the profile, recorded for reproduction.

    Raises:
        ProfileError: bad arguments or an unavailable device.
    """
    if warmup < 0 or repeats < 1:
        raise ProfileError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    dev = _device(device)
    gm = captured.graph_module.to(dev)
    inputs = [t.to(dev) for t in captured.example]
    graph = build_op_graph(captured, inputs)
    input_specs = [
        s.to_dict() for s in captured.inputs
    ]
    cuda = dev.type == "cuda"
    timer = NodeTimer(gm, cuda=cuda, cuda_sync=cuda_sync)
    eager: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    model_name = model_name or type(captured.model).__name__
    bar = _progress(2 * warmup + 2 * repeats, progress, model_name)
    with torch.no_grad():
        for _ in range(warmup):
            timer.run(*inputs)
            captured.call_eager(inputs)
            bar.update(2)
        timer.times = {name: [] for name in timer.times}
        for _ in range(repeats):
            timer.run(*inputs)
            bar.update(1)
            eager.append(_time_call(lambda: captured.call_eager(inputs), cuda))
            bar.update(1)
    bar.close()
    times = [timer.times[name] for name in graph.order]
    peak = {
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "activation_bytes": peak_live_bytes(graph),
        "param_bytes": graph.param_bytes,
    }
    if cuda:
        peak["cuda_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return Profile(
        model=model_name,
        fingerprint=fingerprint(graph, input_specs),
        device=str(dev),
        device_name=device_name(dev),
        dtype=captured.latent.dtype,
        threads=torch.get_num_threads(),
        inputs=input_specs,
        versions=library_versions(),
        warmup=warmup,
        repeats=repeats,
        costs=[statistics.median(t) for t in times],
        spread=[max(t) - min(t) for t in times],
        eager_ms={"median": statistics.median(eager), "min": min(eager), "max": max(eager), "samples": eager},
        peak_memory=peak,
        graph=graph.to_dict(),
        command=command,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _time_call(fn: Any, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1e3


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ProfileError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError("device 'cuda' asked for, but no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ProfileError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for package in ("diffusers", "asyncdiff-partition"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _progress(total: int, enabled: bool, label: str) -> Any:
    return tqdm(total=total, disable=not enabled, desc=f"profiling {label}", unit="run", file=sys.stderr)


def time_segments(
    captured: CapturedModel, boundaries: Sequence[int], *, warmup: int = 1, repeats: int = 5
) -> list[float]:
    """Median ms of each segment run alone on its real inputs (predicted-vs-measured check).

    The segments are split from ``captured`` at ``boundaries`` (a plan's), run once in order to
    obtain every received value, then each is timed by itself.
    """
    segments = split_graph(captured, place(build_op_graph(captured), boundaries))
    inputs = dict(zip((s.name for s in captured.inputs), captured.example))
    with torch.no_grad():
        return time_each_segment(segments, inputs, warmup=warmup, repeats=repeats)


def time_each_segment(segments: Sequence[Any], inputs: Mapping[str, Any], *, warmup: int = 1,
                      repeats: int = 5) -> list[float]:
    """Median ms of each segment (``split.Segment`` or alike) run alone, fed by the ones before it."""
    values: dict[str, Any] = {}
    medians = []
    for segment in segments:
        args = [inputs[n] for n in segment.inputs] + [values[n] for n in segment.receives]
        for _ in range(warmup):
            segment.module(*args)
        samples = []
        for _ in range(repeats):
            begin = time.perf_counter()
            out = segment.module(*args)
            samples.append((time.perf_counter() - begin) * 1e3)
        values.update(zip(segment.outputs, out))
        medians.append(statistics.median(samples))
    return medians
