"""A prediction still being computed elsewhere: a tensor that becomes the real one at its first use.

Example::

    eps = Pending(lambda: collect_from_ranks(), shape=(1, 16, 2, 8, 8), dtype=torch.float32)
    out = uncond + 5.0 * (eps - uncond)       # the first use waits for the real value, then computes

Note [pending predictions]
~~~~~~~~~~~~~~~~~~~~~~~~~~
A pipeline that makes a step's guidance passes as separate denoiser calls (Wan: the conditional
call, then the unconditional one) uses neither prediction before it has made both calls. With batch
groups over those calls (``batch_parallel`` = the calls per step), call k runs on group k: the engine
sends call 0 to group 0 and hands the pipeline a pending prediction at once, so the pipeline makes
call 1, which group 1 computes at the same time. Any use of a pending prediction (a torch function
or method, a property such as ``shape``) first waits for its value, so nothing can read a value
that is not there: at worst (a pipeline that uses the first prediction before the second call) the
calls run one after the other, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["Pending", "resolved"]


class Pending(Tensor):
    """A tensor of known shape, dtype and device whose value ``resolve()`` returns when first needed."""

    _resolve: Callable[[], Tensor]
    _value: Tensor | None

    @staticmethod
    def __new__(cls, resolve: Callable[[], Tensor], *, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Pending:
        shell = torch.empty((), dtype=dtype, device=device).expand(shape)  # one element: never read
        made = Tensor._make_subclass(cls, shell)
        made._resolve, made._value = resolve, None
        return made

    def value(self) -> Tensor:
        """The real tensor (waits for it the first time)."""
        if self._value is None:
            self._value = self._resolve()
        return self._value

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        args, kwargs = pytree.tree_map(resolved, (args, kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __repr__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return f"Pending({tuple(self.shape)}, {self.dtype}, resolved={self._value is not None})"


def resolved(value: Any) -> Any:
    """``value`` with a :class:`Pending` replaced by its real tensor (anything else as it is)."""
    return value.value() if isinstance(value, Pending) else value
