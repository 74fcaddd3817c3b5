"""Sending a captured model to other processes: whole, or cut down to one segment's weights.

``pickle.dumps(captured)`` works (Note [pickling a captured model] in fx/pickling.py). For the
ranks of a run, :func:`ship_segments` writes one file per segment in which every weight the
segment does not use is a one-element stand-in, so a rank loads (and ever holds) only its own
weights, not a full replica first:

    shipped = ship_segments(captured, segments, "/tmp/run")   # in the launching process
    captured = shipped.load(segment_index)                     # in a rank
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx

from asyncdiff_partition.fx.capture import CapturedModel, pack_captured, resolve_attr, restore_captured
from asyncdiff_partition.fx.pickling import is_stand_in

if TYPE_CHECKING:
    from asyncdiff_partition.fx.split import Segment

__all__ = ["ShippedSegments", "is_stand_in", "ship_segments"]

# The pickling itself: Note [pickling a captured model] and Note [weight stand-ins] in fx/pickling.py.


@dataclass(frozen=True)
class ShippedSegments:
    """Where :func:`ship_segments` put one capture file per segment."""

    directory: str
    n_segments: int

    def path(self, segment: int) -> Path:
        return Path(self.directory) / f"segment{segment}.pt"

    def load(self, segment: int) -> CapturedModel:
        """The capture with ``segment``'s weights real and every other weight a stand-in.

        ``torch.load`` reads each weight straight into its tensor (no serialized copy beside
        it), so loading never holds the weights twice. (Mapping the file instead, ``mmap=True``,
        gave the same peak but made the first two steps 0.4 s slower per rank on SD 1.5.)
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.load on a file we wrote ourselves
            shipped = torch.load(self.path(segment), weights_only=False)
        return restore_captured(shipped["graph"], shipped["tensors"])


def ship_segments(captured: CapturedModel, segments: Sequence[Segment], directory: str | os.PathLike) -> ShippedSegments:
    """Write ``captured`` once per segment, with only that segment's weights (Note [weight stand-ins]).

    Args:
        captured: the capture the segments were split from.
        segments: :func:`~asyncdiff_partition.fx.split.split_graph`'s segments of it.
        directory: an existing folder; ``segment{i}.pt`` files are written there.
    """
    shipped = ShippedSegments(str(directory), len(segments))
    weights = _weights(captured.graph_module) | _weights(captured.model)
    for segment in segments:
        graph, tensors = pack_captured(captured, stand_ins=weights - _weights(segment.module))
        torch.save({"graph": graph, "tensors": tensors}, shipped.path(segment.index))
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
