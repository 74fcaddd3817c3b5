"""Per-node cost of an ONNX model from onnxruntime's own profiler, as a project profile file.

Example::

    model = load_onnx("unet.onnx")
    profile = profile_onnx(model, repeats=5)            # CPUExecutionProvider, 1 thread
    profile.save("unet.cpu-1t.profile.json")
    plan = make_plan(profile, n_devices=2)               # plan.py needs nothing else

onnxruntime runs the whole model with ``SessionOptions.enable_profiling``; its JSON trace holds
one ``Node`` event per kernel run (``<node name>_kernel_time``, microseconds) inside one
``model_run`` event per run. Note [kernel events] says how events become op-graph node costs.
The eager figure beside them is the same session without profiling, timed from outside, so
``Profile.accuracy`` shows what the profiler adds.

Note [kernel events]
~~~~~~~~~~~~~~~~~~~~
onnxruntime's graph optimizer fuses and rewrites nodes before it runs them, and names the new
nodes after the old: ``<name>/MatMulAddFusion``, ``<name>_output_0_nchwc``, ``<name>_new_reshape``.
An event is charged to the op-graph node of the same name, else to the node with the longest
name that begins the event's name, else (``ReorderInput``, ``gemm_output_reshape``: layout
changes the optimizer adds) to the node of the next charged event of the same run, the kernel it
feeds. Nodes the optimizer folded away have no events and cost 0. With ``optimization="disable"``
every event names a node. Per node, the cost is the median over the timed runs of the summed
event time of each run. On CUDAExecutionProvider a ``Node`` event times the host side of the
node (kernel launches are asynchronous), so there ``Profile.accuracy`` says how far the node
times fall short of the whole run.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch

from asyncdiff_partition.core.profile import Profile, ProfileError, fingerprint, peak_live_bytes
from asyncdiff_partition.fx.profiler import device_name, library_versions
from asyncdiff_partition.onnx.model import OnnxModel, load_onnx

__all__ = ["OPTIMIZATION_LEVELS", "example_feed", "make_session", "node_costs", "onnxruntime", "profile_onnx",
           "providers"]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_KERNEL_SUFFIX = "_kernel_time"

Feed = dict[str, np.ndarray]


def onnxruntime() -> Any:
    """The onnxruntime module (an optional dependency: the ``onnx`` extra).

    Raises:
        ProfileError: onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort  # an optional dependency: imported where it is needed, or reported missing
    except ImportError:
        raise ProfileError("onnxruntime is not installed; pip install 'asyncdiff-partition[onnx]'") from None
    return ort


def providers(device: str = "cpu") -> list[Any]:
    """onnxruntime execution providers for ``cpu`` or ``cuda`` / ``cuda:N``.

    Raises:
        ProfileError: an unknown device, or CUDA asked for without CUDAExecutionProvider.
    """
    ort = onnxruntime()
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if kind == "cuda" and (not index or index.isdigit()):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ProfileError(
                f"device {device!r} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime has "
                f"{available}; install onnxruntime-gpu or use --device cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise ProfileError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")


def make_session(model: bytes, *, device: str = "cpu", threads: int = 1, optimization: str = "all",
                 profile_prefix: str | None = None) -> Any:
    """An ``InferenceSession`` run the way this project measures: sequential, ``threads`` intra-op threads."""
    ort = onnxruntime()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ProfileError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    if threads < 1:
        raise ProfileError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=providers(device))


def example_feed(model: OnnxModel, seed: int = 0) -> Feed:
    """Random inputs of the model's shapes: normal floats, timestep 500, other integers 0."""
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    for spec in model.inputs:
        dtype, shape = np.dtype(spec["dtype"]) if spec["dtype"] != "bfloat16" else None, spec["shape"]
        if dtype is None:
            raise ProfileError(f"input {spec['name']!r} is bfloat16, which numpy cannot feed; pass inputs=")
        if dtype.kind == "f":
            feed[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif spec["name"] == model.timestep:
            feed[spec["name"]] = np.full(shape, 500, dtype=dtype)
        else:
            feed[spec["name"]] = np.zeros(shape, dtype=dtype)
    return feed


def profile_onnx(
    model: OnnxModel | str | os.PathLike[str],
    *,
    model_name: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    warmup: int = 1,
    repeats: int = 5,
    optimization: str = "all",
    inputs: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    command: str = "",
    **load_options: Any,
) -> Profile:
    """Measure every node of an ONNX model with onnxruntime's profiler.

    Args:
        model: an imported model, or the path of an ``.onnx`` file (read with ``load_options``,
            see :func:`~asyncdiff_partition.onnx.model.load_onnx`).
        model_name: recorded in the profile; default the file path (``run`` finds it there).
        device: ``cpu`` (CPUExecutionProvider) or ``cuda`` / ``cuda:N`` (CUDAExecutionProvider).
        threads: intra-op threads (on CPU one thread stands for one device).
        warmup: untimed runs first; repeats: timed runs, each node's cost their median.
        optimization: onnxruntime graph optimization level, one of :data:`OPTIMIZATION_LEVELS`;
            the segments run at the same level.
        inputs: input arrays by name; default :func:`example_feed`.
        seed: of the default inputs.
        command: the command line, recorded for reproduction.

    Raises:
        ProfileError: bad arguments, or a device onnxruntime does not offer.
        OnnxModelError: the file cannot be imported.
    """
    if warmup < 0 or repeats < 1:
        raise ProfileError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model, **load_options)
    feed = dict(inputs) if inputs is not None else example_feed(model, seed)
    missing = sorted(set(model.input_names) - set(feed))
    if missing:
        raise ProfileError(f"inputs lack {missing}; the model's inputs are {model.input_names}")
    blob = model.proto.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="asyncdiff-ort-") as folder:
        session = make_session(blob, device=device, threads=threads, optimization=optimization,
                               profile_prefix=os.path.join(folder, "ort"))
        for _ in range(warmup + repeats):
            session.run(None, feed)
        with open(session.end_profiling(), encoding="utf-8") as file:
            events = json.load(file)
    samples, unmatched_ms = node_costs(events, model.graph.order, skip_runs=warmup)
    plain = make_session(blob, device=device, threads=threads, optimization=optimization)
    for _ in range(warmup):
        plain.run(None, feed)
    eager = []
    for _ in range(repeats):
        begin = time.perf_counter()
        plain.run(None, feed)
        eager.append((time.perf_counter() - begin) * 1e3)
    graph = model.graph
    provider = session.get_providers()[0]
    versions = {**library_versions(), "onnx": _version("onnx"), "onnxruntime": onnxruntime().__version__,
                "onnxruntime_provider": provider, "onnxruntime_optimization": optimization,
                "onnxruntime_unmatched_ms": f"{unmatched_ms:.3f}"}
    dev = torch.device(device)
    latent = next(spec for spec in model.inputs if spec["latent"])
    return Profile(
        model=model_name or model.path,
        fingerprint=fingerprint(graph, model.inputs),
        device=str(dev),
        device_name=device_name(dev) if dev.type == "cpu" else f"onnxruntime {device}",
        dtype=latent["dtype"],
        threads=threads,
        inputs=[dict(spec) for spec in model.inputs],
        versions=versions,
        warmup=warmup,
        repeats=repeats,
        costs=[statistics.median(s) for s in samples],
        spread=[max(s) - min(s) for s in samples],
        eager_ms={"median": statistics.median(eager), "min": min(eager), "max": max(eager), "samples": eager},
        peak_memory={"rss_bytes": _rss(), "activation_bytes": peak_live_bytes(graph),
                     "param_bytes": graph.param_bytes},
        graph=graph.to_dict(),
        command=command,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def node_costs(events: Sequence[Mapping[str, Any]], order: Sequence[str], *,
               skip_runs: int = 0) -> tuple[list[list[float]], float]:
    """Per op-graph node (in ``order``), its ms in each timed run (Note [kernel events]).

    Args:
        events: onnxruntime's profile trace (the JSON list).
        order: the op-graph node names.
        skip_runs: the first runs are warm-up and not counted.

    Returns:
        (per node the list of per-run ms, median over runs of the ms of events that matched no
        node by name and were charged to a neighbour).

    Raises:
        ProfileError: the trace holds no timed run.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed = runs[skip_runs:]
    if not timed:
        raise ProfileError(f"the onnxruntime trace has {len(runs)} runs, none after the {skip_runs} warm-up run(s)")
    starts = [start for start, _ in timed]
    index = {name: i for i, name in enumerate(order)}
    per_run: list[dict[int, float]] = [{} for _ in timed]
    pending: list[list[float]] = [[] for _ in timed]
    unmatched = [0.0 for _ in timed]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)),
                     key=lambda e: e["ts"])
    last: list[int | None] = [None for _ in timed]
    for event in kernels:
        r = bisect.bisect_right(starts, event["ts"]) - 1
        if r < 0 or event["ts"] > timed[r][1]:
            continue  # a warm-up run's event
        ms = event["dur"] / 1e3
        node = _match(event["name"][: -len(_KERNEL_SUFFIX)], index)
        if node is None:
            pending[r].append(ms)
            unmatched[r] += ms
            continue
        per_run[r][node] = per_run[r].get(node, 0.0) + ms + sum(pending[r])
        pending[r], last[r] = [], node
    for r, left in enumerate(pending):  # trailing unmatched events: to the last kernel of the run
        kernel = last[r]
        if left and kernel is not None:
            per_run[r][kernel] += sum(left)
    samples = [[run.get(i, 0.0) for run in per_run] for i in range(len(order))]
    return samples, statistics.median(unmatched)


def _match(name: str, index: Mapping[str, int]) -> int | None:
    """The op-graph node an event name belongs to: same name, else longest node name it starts with."""
    for length in range(len(name), 0, -1):
        found = index.get(name[:length])
        if found is not None:
            return found
    return None


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
