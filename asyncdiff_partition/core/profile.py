"""Per-node cost profiling on the target device, and the profile file.

Example::

    captured = capture_model(model, inputs.args, inputs.kwargs)
    profile = profile_model(captured, model_name="sd21-unet", repeats=5)
    profile.save("profiles/sd21-unet.cpu-1t.json")
    Profile.load("profiles/sd21-unet.cpu-1t.json").costs      # median ms per node

Every node is run through :class:`NodeTimer`, an ``fx.Interpreter``: on CPU each node is timed
with ``time.perf_counter``; on CUDA an event is recorded before and after every node without
synchronising in between (one synchronisation per run), so small kernels keep their
asynchronous launch; ``cuda_sync=True`` synchronises around every node instead. The profile also
records the whole-model eager latency on the same inputs, so that the sum of node medians can
be checked against it (the profiler's own accuracy is reported, never assumed).

Profile file fields added in schema 2 (schema 1 files, without them, still load):

    staleness   None, or what :mod:`asyncdiff_partition.fx.staleness` measured:
                {"per_node": [float, one per graph node: how much the node's value changes from
                one sampling step to the next (relative L2 of v(s) - v(s-1), mean over the steps
                that read stale values); 0.0 for nodes whose value never crosses a cut],
                "cut_error": [float, one per boundary 0..n: the one-step relative ε error of
                cutting there (staleness.py, Note [cut error])] (optional),
                "warmup": W, "runs": loops, "steps": T, "samples": batch, "guidance": scale or None,
                "metric": a one-line description, "command": how it was made}.
                :meth:`Profile.cut_staleness` turns it into the cost of cutting at each boundary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.files import read_json, write_json_atomic
from asyncdiff_partition.core.graph import OpGraph

__all__ = ["READABLE_VERSIONS", "SCHEMA_VERSION", "Profile", "ProfileError", "fingerprint", "peak_live_bytes"]


SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # schema 1: no staleness field (latency-only plans)
_REMAKE = "re-run 'asyncdiff-partition profile' to make a new one"


class ProfileError(AsyncDiffError, ValueError):
    """Bad profiling arguments or an unusable profile."""


@dataclass
class Profile:
    """Measured per-node costs of one model on one device, plus what they were measured on.

    ``costs[i]`` / ``spread[i]`` are the median and (max - min) in ms of node ``graph.order[i]``
    over the repeats. ``graph`` is the op graph as :meth:`OpGraph.to_dict` writes it.
    """

    model: str
    fingerprint: str
    device: str
    device_name: str
    dtype: str
    threads: int
    inputs: list[dict[str, Any]]
    versions: dict[str, str]
    warmup: int
    repeats: int
    costs: list[float]
    spread: list[float]
    eager_ms: dict[str, Any]
    peak_memory: dict[str, int]
    graph: dict[str, Any]
    command: str = ""
    created: str = ""
    compiled: dict[str, Any] | None = None  # costs scaled to compiled time: fx.compile Note [compiled profile]
    staleness: dict[str, Any] | None = None  # per-node and per-cut staleness: fx.staleness
    schema_version: int = SCHEMA_VERSION
    kind: str = field(default="profile", repr=False)

    @property
    def node_ms_sum(self) -> float:
        return float(sum(self.costs))

    @property
    def accuracy(self) -> float:
        """Sum of node medians / eager whole-model median (1.0 = the profile adds up exactly)."""
        return self.node_ms_sum / self.eager_ms["median"] if self.eager_ms["median"] else float("nan")

    def op_graph(self) -> OpGraph:
        return OpGraph.from_dict(self.graph)

    def cut_staleness(self) -> list[float] | None:
        """Per boundary b = 0..n, the fidelity cost of cutting there; None without a calibration.

        The measured ``cut_error`` where the file has it; else the summed ``per_node`` change of
        the values crossing b: a value produced at position i and last read at j crosses
        boundaries i+1..j (as in :meth:`OpGraph.cut_table`); only stale values (Note [value
        kinds]) arrive a step late.
        """
        if self.staleness is None:
            return None
        if self.staleness.get("cut_error") is not None:
            return [float(x) for x in self.staleness["cut_error"]]
        return self.proxy_staleness()

    def proxy_staleness(self) -> list[float] | None:
        """Per boundary, the summed ``per_node`` change of the stale values crossing it (see :meth:`cut_staleness`)."""
        if self.staleness is None:
            return None
        graph, per_node = self.op_graph(), self.staleness["per_node"]
        diff = [0.0] * (len(graph) + 2)
        for i, last in enumerate(graph.last_use()):
            node = graph.node(i)
            if node["kind"] == "op" and not node["fresh"] and last > i:
                diff[i + 1] += per_node[i]
                diff[last + 1] -= per_node[i]
        out, total = [], 0.0
        for b in range(len(graph) + 1):
            total += diff[b]
            out.append(max(total, 0.0))  # a running sum can dip a few ulps below zero
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write atomically as versioned JSON (load(save(p)) == p)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file.

        Raises:
            FileFormatError: missing, corrupt, truncated, not a profile, or unknown version.
            ProfileError: a field breaks a rule of :mod:`~asyncdiff_partition.core.validation` (the
                message names the file and the field).
        """
        from dataclasses import MISSING, fields

        from asyncdiff_partition.core.graph import NODE_KINDS
        from asyncdiff_partition.core.validation import FieldError, validate_profile

        data = read_json(path, kind="profile", schema_version=READABLE_VERSIONS, fix=_REMAKE)
        data["schema_version"] = SCHEMA_VERSION  # schema 1 is schema 2 without staleness
        own = fields(cls)
        try:
            validate_profile(data, path, fields=[f.name for f in own], node_kinds=NODE_KINDS, fix=_REMAKE,
                             required=[f.name for f in own if f.default is MISSING and f.default_factory is MISSING])
            profile = cls(**data)
            OpGraph.from_dict(profile.graph)
        except (FieldError, ValueError) as error:  # GraphError is a ValueError
            raise ProfileError(f"{error}" if isinstance(error, FieldError) else
                               f"profile file {str(path)!r} has an invalid graph ({error}); {_REMAKE}") from None
        staleness, n = profile.staleness, len(profile.costs)
        if staleness is not None and (not isinstance(staleness, dict) or not isinstance(staleness.get("per_node"), list)
                                      or len(staleness["per_node"]) != n
                                      or len(staleness.get("cut_error") or [0] * (n + 1)) != n + 1):
            raise ProfileError(f"profile file {str(path)!r} has a staleness field without one per_node value per "
                               f"node ({n}) and one cut_error per boundary ({n + 1}); {_REMAKE} and calibrate "
                               f"again ('asyncdiff-partition tune')")
        return profile


def fingerprint(graph: OpGraph, inputs: Sequence[dict[str, Any]]) -> str:
    """Hash of the graph's structure, sizes and input shapes/dtypes: same model, same shapes."""
    nodes = graph.to_dict()["nodes"]
    structure = [(n["kind"], n["op"], n["target"], n["out_bytes"], n["param_bytes"], n["preds"]) for n in nodes]
    shapes = [(i["name"], list(i["shape"]), i["dtype"], bool(i["latent"])) for i in inputs]
    payload = json.dumps([structure, shapes], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def peak_live_bytes(graph: OpGraph) -> int:
    """Largest sum of live computed values along the order (activations, parameters excluded)."""
    last = graph.last_use()
    live = peak = 0
    frees: dict[int, int] = {}
    for i, _name in enumerate(graph.order):
        node = graph.node(i)
        if node["kind"] == "op":
            live += node["out_bytes"]
            frees[last[i]] = frees.get(last[i], 0) + node["out_bytes"]
        peak = max(peak, live)
        live -= frees.pop(i, 0)
    return peak
