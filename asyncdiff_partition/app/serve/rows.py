"""Exact batching: a batched pipeline call whose model calls run one image row at a time.

Example::

    with exact_rows(pipe, images=3):              # 3 images in one pipeline call
        output = pipe(prompt=[a, b, c], generator=[g0, g1, g2], ...)
    # output.images[i] is bit for bit what pipe(prompt=a_i, generator=g_i) gives alone

Note [exact batching]
~~~~~~~~~~~~~~~~~~~~~
On a CPU, a matmul or a convolution over a batch of k rows does not give each row the numbers it
gets alone (blocking and reduction order follow the batch size). A service that batched naively
would answer a request with an image that depends on who else was in its batch. So while a
batch of k images runs as one pipeline call, every model component's ``forward`` is cut into
rows: a call whose batch is m * k (m = 2 for classifier-free guidance: the unconditional rows,
then the conditional rows) becomes k calls of m rows, rows ``i, i + k, ..`` for image i, exactly
the call that image alone would make, and the outputs are put back in place. The VAE's decoder
and encoder run one image at a time through its own slicing. What stays batched is elementwise
(scheduler step, guidance) and gives each row what it gives alone. Under the engine the
denoiser's ``forward`` is the scheduled one, so image i's call is the k-th call of its step: a
stream of its own (Note [streams] in pipelines/wrap.py) of the structure a solo call prepared.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["RowSplit", "exact_rows"]


class RowSplit:
    """A component's ``forward`` that runs a call over k images as k calls of one image each (Note [exact batching])."""

    def __init__(self, forward: Callable[..., Any], images: int):
        self.forward, self.images = forward, images
        self.__signature__ = inspect.signature(forward)  # what the scheduled forward binds a call with

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.ndim]
        batch = leaves[0].shape[0] if leaves else 0
        k = self.images
        if k < 2 or batch < k or batch % k:
            return self.forward(*args, **kwargs)  # not a batch of these images (a scalar call, a shared input)
        m = batch // k
        rows = [torch.tensor([i + j * k for j in range(m)]) for i in range(k)]

        def take(index: torch.Tensor) -> Callable[[Any], Any]:
            return lambda x: x.index_select(0, index) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch else x

        outputs = [self.forward(*pytree.tree_map(take(index), args), **pytree.tree_map(take(index), kwargs))
                   for index in rows]
        flat, spec = pytree.tree_flatten(outputs[0])
        columns = [pytree.tree_leaves(o) for o in outputs]
        joined = [_join([c[n] for c in columns], rows, batch) for n in range(len(flat))]
        return pytree.tree_unflatten(joined, spec)


def _join(parts: list[Any], rows: list[torch.Tensor], batch: int) -> Any:
    """Row outputs back in their batch places (a leaf that is not a per-row tensor is the first row's)."""
    first = parts[0]
    if not (isinstance(first, torch.Tensor) and first.ndim and first.shape[0] == len(rows[0])):
        return first
    out = first.new_empty((batch, *first.shape[1:]))
    for index, part in zip(rows, parts):
        out[index] = part
    return out


@contextlib.contextmanager
def exact_rows(pipe: Any, images: int, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Every module of ``modules`` runs row by row, the VAE decodes one image at a time, for one call of ``images`` images."""
    saved: list[tuple[torch.nn.Module, Any]] = []
    slicing: list[Any] = []
    try:
        if images > 1:
            for module in modules.values():
                own = module.__dict__.get("forward")
                saved.append((module, own))
                module.__dict__["forward"] = RowSplit(own if own is not None else module.forward, images)
                if callable(enable := getattr(module, "enable_slicing", None)) and not getattr(module, "use_slicing", True):
                    enable()
                    slicing.append(module)
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
        for module in slicing:
            module.disable_slicing()
