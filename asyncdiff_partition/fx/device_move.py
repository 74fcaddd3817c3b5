"""Moving a model's tensors to a device or dtype with weight stand-ins kept one element small.

A rank's capture holds every other segment's weights as stand-ins (Note [weight stand-ins]
in :mod:`asyncdiff_partition.fx.shipping`): one element expanded to the weight's shape.
``Module.to`` (and ``pipe.to("cuda")``) copies an expanded tensor into a dense one of the
full size, so a rank moved to its GPU would hold a full replica after all. Here only real
weights are copied; a stand-in becomes a stand-in on the new device (one element).

Example::

    captured = shipped.load(rank)
    move_captured(captured, torch.device("cuda", 0))   # the rank's own weights go to the GPU

Tensors are moved in place (``tensor.data = moved``), as ``Module.to`` does for parameters
and here for buffers and graph constants too, so everything that shares a tensor (the model,
its captured graph, the segments split from it) sees it moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from asyncdiff_partition.fx.capture import resolve_attr
from asyncdiff_partition.fx.shipping import is_stand_in

__all__ = ["move_captured", "move_module", "moved"]


def moved(tensor: Tensor, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``tensor`` on ``device`` (and in ``dtype`` if floating point); a stand-in stays a stand-in."""
    dev = torch.device(device) if device is not None else tensor.device
    dt = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if is_stand_in(tensor):  # every element is the one stored element: move that one
        one = tensor.as_strided((), (), tensor.storage_offset())
        return one.to(device=dev, dtype=dt).expand(tensor.shape)
    return tensor.to(device=dev, dtype=dt)


def move_module(module: torch.nn.Module, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> int:
    """Move every parameter and buffer of ``module`` in place; returns the real (non-stand-in) bytes.

    ``dtype`` applies to floating-point tensors only, as with ``Module.to``. Meta tensors (weights
    a rank released) stay where they are.
    """
    done: set[int] = set()
    real = 0
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for t in store.values():
                real += _move_in_place(t, device, dtype, done)
    return real


def move_captured(captured: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> int:
    """Move a :class:`~asyncdiff_partition.fx.capture.CapturedModel`'s weights, graph constants,
    original model and example inputs; returns the real bytes of its weights after the move.

    The example inputs change device (and floating dtype) too, so that shape passes and
    warm-up runs on them meet the weights where they are.
    """
    done: set[int] = set()
    gm = captured.graph_module
    real = move_module(gm, device, dtype)
    done.update(id(t) for t in (*gm.parameters(), *gm.buffers()))
    for node in gm.graph.find_nodes(op="get_attr"):
        value = resolve_attr(gm, str(node.target))
        if isinstance(value, Tensor):
            real += _move_in_place(value, device, dtype, done)
    model = getattr(captured, "model", None)
    if model is not None:
        for t in (*model.parameters(), *model.buffers()):
            real += _move_in_place(t, device, dtype, done)
    for t in captured.example:
        if isinstance(t, Tensor):
            _move_in_place(t, device, dtype, set())
    return real


def _move_in_place(t: Tensor | None, device: Any, dtype: torch.dtype | None, done: set[int]) -> int:
    if t is None or id(t) in done or t.device.type == "meta":
        return 0
    done.add(id(t))
    new = moved(t, device, dtype)
    if new is not t:
        with torch.no_grad():
            t.data = new
    return 0 if is_stand_in(t) else t.numel() * t.element_size()
