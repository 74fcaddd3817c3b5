"""Sending a captured model to other processes: whole, or as one finished segment per rank.

``pickle.dumps(captured)`` works (Note [pickling a captured model] in fx/pickling.py). For the
ranks of a run, :func:`ship_segments` writes one file per ready segment: the segment's module
with only its own weights, its value layouts, the verified fingerprint and the placement, plus
the capture's shell (input specs, call signature, the original model with every weight a
one-element stand-in), so that a rank loads (and ever holds) only its own weights, and builds no
op graph and splits nothing:

    ready = ready_segments(captured, plan, world_size=2)          # in the launching process
    shipped = ship_segments(ready, "/tmp/run", captured)
    segment, shell = shipped.load(segment_index)                   # in a rank
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from asyncdiff_partition.core.files import atomic_path
from asyncdiff_partition.fx.capture import CapturedModel, pack_captured, resolve_attr, restore_captured
from asyncdiff_partition.fx.layout import ReadySegment
from asyncdiff_partition.fx.pickling import is_stand_in

__all__ = ["ShippedSegments", "is_stand_in", "ship_segments"]

# The pickling itself: Note [pickling a captured model] and Note [weight stand-ins] in fx/pickling.py.


@dataclass(frozen=True)
class ShippedSegments:
    """Where :func:`ship_segments` put one file per ready segment."""

    directory: str
    n_segments: int

    def path(self, segment: int) -> Path:
        return Path(self.directory) / f"segment{segment}.pt"

    def load(self, segment: int) -> tuple[ReadySegment, Any]:
        """(the ready segment, the capture shell it was shipped with, or None).

        The shell of a torch capture is the ``CapturedModel`` whose graph is the segment's own
        module, with every weight other than the segment's a stand-in. ``torch.load`` reads each
        weight straight into its tensor (no serialized copy beside it), so loading never holds
        the weights twice.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.load on a file we wrote ourselves
            warnings.simplefilter("ignore", FutureWarning)  # torch's own TreeSpec unpickling
            shipped = torch.load(self.path(segment), weights_only=False)
        if "graph" not in shipped:
            return shipped["segment"], shipped["shell"]
        shell = restore_captured(shipped["graph"], shipped["tensors"])
        ready = ReadySegment(module=shell.graph_module, **shipped["segment"])
        return ready, shell


def ship_segments(segments: Sequence[ReadySegment], directory: str | os.PathLike,
                  captured: CapturedModel | Any = None,
                  saved: Mapping[int, tuple[str, str]] | None = None) -> ShippedSegments:
    """Write one file per ready segment into ``directory`` (``segment{i}.pt``).

    Args:
        segments: the ready segments of one plan, in order.
        directory: the folder (created if missing); every file is written whole or not at all.
        captured: the capture the segments were made from. A torch capture ships as a shell
            around each segment's module with only that segment's weights (Note [weight
            stand-ins]); anything else (an ONNX model's input specs) ships as it is, beside
            segments whose modules pickle on their own.
        saved: weights a folder holds unchanged (id -> safetensors file, key): named, not copied
            (Note [weights by name] in fx/pickling.py).
    """
    shipped = ShippedSegments(str(directory), len(segments))
    if not isinstance(captured, CapturedModel):
        for segment in segments:
            with atomic_path(shipped.path(segment.index)) as tmp:
                torch.save({"segment": segment, "shell": captured}, tmp)
        return shipped
    weights = _weights(captured.graph_module) | _weights(captured.model)
    for segment in segments:
        module = segment.module
        assert isinstance(module, torch.fx.GraphModule)
        shell = dataclasses.replace(captured, graph_module=module)
        graph, tensors = pack_captured(shell, stand_ins=weights - _weights(module), saved=saved)
        fields = {f.name: getattr(segment, f.name) for f in dataclasses.fields(segment) if f.name != "module"}
        with atomic_path(shipped.path(segment.index)) as tmp:
            torch.save({"graph": graph, "tensors": tensors, "segment": fields}, tmp)
    return shipped


def _weights(module: torch.nn.Module | None) -> set[int]:
    """Ids of a module's parameters, buffers and tensor attributes its graph reads (``get_attr``)."""
    if module is None:
        return set()
    found = {id(t) for t in (*module.parameters(), *module.buffers())}
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.find_nodes(op="get_attr"):
            value = resolve_attr(module, str(node.target))
            if isinstance(value, torch.Tensor):
                found.add(id(value))
    return found
