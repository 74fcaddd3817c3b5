"""What a rank is handed: a ready segment and the layouts of the values it receives and yields.

Example::

    ready = ReadySegment(index=1, module=module, inputs=["sample", "timestep"], receives=["add_3"],
                         outputs=["output"], layouts={"add_3": layout, "output": out}, fingerprint=plan.fingerprint,
                         placement=placement)
    buffers = ready.layouts["add_3"].empty(device)           # irecv into these
    value = ready.layouts["add_3"].build(buffers)            # the value the module takes

Both backends (:mod:`asyncdiff_partition.fx.split` for torch, :mod:`asyncdiff_partition.onnx.segments`
for ONNX) turn a captured model and a :class:`~asyncdiff_partition.core.placement.Placement` into
:class:`ReadySegment` s; :class:`~asyncdiff_partition.runtime.denoiser.AsyncDenoiser` and
:class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule` see only this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.placement import Placement

__all__ = ["ReadySegment", "RunnableSegment", "TensorSlot", "ValueLayout", "is_dense", "tensor_leaves", "wire"]


class RunnableSegment(Protocol):
    """What a schedule needs of a segment: a split one (``fx.split.Segment``) or a ready one."""

    @property
    def index(self) -> int: ...

    @property
    def inputs(self) -> Sequence[str]: ...

    @property
    def receives(self) -> Sequence[str]: ...

    @property
    def outputs(self) -> Sequence[str]: ...

    @property
    def module(self) -> Callable[..., Any]: ...


@dataclass(frozen=True)
class TensorSlot:
    """A tensor leaf of a transferred value; ``stride`` for a dense tensor laid out otherwise than
    row-major (channels-last convolution outputs): Note [memory order]."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] | None = None


# Note [memory order]
# ~~~~~~~~~~~~~~~~~~~
# Kernels may round differently on a channels-last input and on its row-major copy, so a value
# that crosses a cut must reach its consumer laid out as the producer made it, or the split model
# is no longer the model. A dense tensor (no gaps, no overlaps, any order of dimensions) travels
# as its memory, flat, and the receiver views its buffer with the producer's strides; any other
# view travels as a row-major copy (and the single-process reference reads that copy too,
# reference.as_sent).


def is_dense(t: Tensor) -> bool:
    """No gaps and no overlaps in memory, dimensions in any order (a permuted contiguous tensor)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _strided(t: Tensor) -> tuple[int, ...] | None:
    return tuple(t.stride()) if not t.is_contiguous() and is_dense(t) else None


@dataclass(frozen=True)
class ValueLayout:
    """How a value is made of tensor leaves (and constant leaves, which never travel)."""

    spec: Any  # pytree.TreeSpec
    leaves: tuple[Any, ...]  # TensorSlot or a constant

    @classmethod
    def of(cls, value: Any) -> ValueLayout:
        """The layout of a value (real, fake or meta tensors, or a nest of them)."""
        leaves, spec = pytree.tree_flatten(value)
        return cls(spec, tuple(TensorSlot(tuple(x.shape), x.dtype, _strided(x)) if isinstance(x, Tensor) else x
                               for x in leaves))

    def empty(self, device: torch.device | str) -> list[Tensor]:
        """Uninitialised buffers for the tensor leaves, in order, as they travel (Note [memory order])."""
        return [torch.empty(_numel(leaf.shape) if leaf.stride is not None else leaf.shape, dtype=leaf.dtype,
                            device=device)
                for leaf in self.leaves if isinstance(leaf, TensorSlot)]

    def build(self, tensors: list[Tensor]) -> Any:
        """The value from its tensor leaves (as :meth:`empty` lists them)."""
        it = iter(tensors)

        def leaf_of(leaf: Any) -> Any:
            if not isinstance(leaf, TensorSlot):
                return leaf
            t = next(it)
            return t.as_strided(leaf.shape, leaf.stride) if leaf.stride is not None else t

        return pytree.tree_unflatten([leaf_of(leaf) for leaf in self.leaves], self.spec)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def wire(t: Tensor) -> Tensor:
    """A tensor as it travels (Note [memory order]): row-major as it is, a dense one as its flat memory,
    anything else as a row-major copy."""
    if t.is_contiguous():
        return t
    if is_dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.contiguous()


def tensor_leaves(value: Any) -> list[Tensor]:
    """The tensor leaves of a value, as they travel (:func:`wire`)."""
    return [wire(x) for x in pytree.tree_leaves(value) if isinstance(x, Tensor)]


@dataclass
class ReadySegment:
    """One segment, finished: everything a rank needs to run it and to talk to the others.

    Call ``module(*inputs, *received)`` in the orders of :attr:`inputs` and :attr:`receives`;
    it returns a tuple in the order of :attr:`outputs`.

    Attributes:
        index: the segment's position (0 starts the model).
        module: a torch ``fx.GraphModule`` or an ONNX segment module; holds only its weights.
        inputs: model-input names it reads (``captured.inputs[i].name``).
        receives: stale values it consumes from earlier segments.
        outputs: values later segments read (its sends), then ``OUTPUT`` if it yields ε.
        layouts: of every value in :attr:`receives`, and of ``OUTPUT`` (ranks allocate ε).
        fingerprint: the model fingerprint verified against the plan when it was made.
        placement: the whole placement (torch-free): who produces and who consumes each value.
    """

    index: int
    module: Callable[..., Any]
    inputs: list[str]
    receives: list[str]
    outputs: list[str]
    layouts: dict[str, ValueLayout]
    fingerprint: str
    placement: Placement
    replicated: list[str] = field(default_factory=list)

    def source(self, value: str) -> int:
        """The segment that produces a received value."""
        return self.placement.owner[value]

    def tag(self, value: str) -> int:
        """The message tag of a transferred value (its op-graph position)."""
        return self.placement.positions[value]
