"""Compiled segments: ``torch.compile`` of a segment for its device, and profiles of compiled costs.

Example::

    segment.module = compile_segment(segment.module, torch.device("cuda"))   # CUDA graphs
    profile = compile_profile(profile_model(captured, model_name="sd21"), captured)

Which compilation a device gets (``mode="auto"``):

    device   compiler present           mode                             outputs
    cuda     (inductor's Triton)        "reduce-overhead" (CUDA graphs)  cloned after every call
    cpu      C++ compiler found         "default" (inductor C++)         as returned
    cpu      no C++ compiler            none: eager kept, one warning    as returned

CUDA graphs replay into the same output buffers on every call, so a compiled segment clones
its outputs: the schedule keeps a segment's values across steps (stale values, ε). Shapes are
static (``dynamic=False``): a segment sees the same shapes at every step of a run.

Note [compiled profile]
~~~~~~~~~~~~~~~~~~~~~~~
The per-node profile cannot be taken compiled: inductor fuses nodes into kernels that span
many graph nodes, so a node has no compiled cost of its own. A compiled profile
(:func:`compile_profile`, ``profile --compile``) therefore keeps the eager per-node medians
and scales every one of them by the whole model's measured compiled/eager ratio on the
profiled inputs; both whole-model times and the ratio are recorded under ``compiled``. The
plan then balances compiled costs under the assumption that compilation speeds every part of
the model up by the same factor. Where it does not (attention speeds up more than a
convolution), ``plan --measure`` and the device check's per-segment compiled times show by
how much; a per-segment ratio would need the cuts first, which is the plan's job.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["MODES", "CompileError", "CompileUnavailable", "CompiledSegment", "compile_mode", "compile_profile",
           "compile_segment", "cpp_compiler", "module_device"]

MODES = ("auto", "default", "reduce-overhead", "max-autotune", "eager")


class CompileError(AsyncDiffError, ValueError):
    """An unknown compile mode, or a mode the device cannot take."""


class CompileUnavailable(UserWarning):
    """Compilation was asked for but is not possible here; the segment stays eager."""


def cpp_compiler() -> str | None:
    """The C++ compiler inductor uses on CPU (its own search: ``$CXX`` / ``g++`` ...), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or an inductor without cpp_builder
        return None


def compile_mode(device: torch.device | str, mode: str = "auto") -> str | None:
    """The ``torch.compile`` mode a segment on ``device`` gets; None: stay eager (warned once).

    Raises:
        CompileError: ``mode`` is not one of :data:`MODES`, or CUDA graphs asked for off CUDA.
    """
    if mode not in MODES:
        raise CompileError(f"compile mode must be one of {', '.join(MODES)}; got {mode!r}")
    dev = torch.device(device)
    if mode == "eager":
        return None
    if mode == "reduce-overhead" and dev.type != "cuda":
        raise CompileError(f"compile mode 'reduce-overhead' (CUDA graphs) needs a CUDA device, not {dev}; "
                           f"use mode 'auto' or 'default'")
    if dev.type == "cpu" and cpp_compiler() is None:
        warnings.warn("torch.compile on CPU needs a C++ compiler (inductor found none: install g++ or set $CXX); "
                      "running the segments eager", CompileUnavailable, stacklevel=3)
        return None
    if mode == "auto":
        return "reduce-overhead" if dev.type == "cuda" else "default"
    return mode


class CompiledSegment(torch.nn.Module):
    """A segment module and its compiled forward; ``parameters()`` are the segment's own.

    Called like the segment (``module(*tensors)`` → tuple of its outputs).
    """

    _compiled: Callable[..., Any]

    def __init__(self, module: torch.nn.Module, mode: str):
        super().__init__()
        self.module = module
        self.mode = mode
        # Kept outside the module tree: the compiled wrapper holds the same parameters.
        object.__setattr__(self, "_compiled", torch.compile(module, mode=mode, dynamic=False))

    @property
    def cuda_graphs(self) -> bool:
        return self.mode == "reduce-overhead"

    def forward(self, *args: Any) -> Any:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return pytree.tree_map_only(Tensor, torch.clone, self._compiled(*args))
        return self._compiled(*args)


def compile_segment(module: torch.nn.Module, device: torch.device | str, *, mode: str = "auto") -> torch.nn.Module:
    """``module`` compiled for ``device`` (see the module docstring's table); itself where not possible.

    Compilation happens at the first call (seconds to minutes: call it once before timing).

    Example:
        >>> segment.module = compile_segment(segment.module, "cpu")  # doctest: +SKIP

    Args:
        module: a segment's ``fx.GraphModule`` (or any module), already on ``device``.
        device: where it runs; chooses the mode under ``"auto"``.
        mode: ``"auto"``, a ``torch.compile`` mode, or ``"eager"`` (no compilation).

    Raises:
        CompileError: see :func:`compile_mode`.
    """
    chosen = compile_mode(device, mode)
    if chosen is None or isinstance(module, CompiledSegment) or not isinstance(module, torch.nn.Module):
        return module
    return CompiledSegment(module, chosen)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def compile_profile(profile: Any, captured: Any, *, mode: str = "auto", warmup: int = 1, repeats: int = 5) -> Any:
    """The profile with every node's cost scaled to compiled time (Note [compiled profile]).

    Runs the whole captured model eager and compiled on the profile's device and example
    inputs, ``repeats`` times each, interleaved; the ratio of the medians scales the costs.
    Without a compiler (CPU, no C++ compiler) the profile comes back unchanged, with a warning.

    Args:
        profile: from :func:`~asyncdiff_partition.fx.profiler.profile_model` of ``captured``.
        captured: the captured model the profile measured.
        mode, warmup, repeats: compile mode (:func:`compile_mode`), untimed and timed runs.
    """
    dev = torch.device(profile.device)
    gm = captured.graph_module.to(dev)
    inputs = [t.to(dev) for t in captured.example]
    compiled = compile_segment(gm, dev, mode=mode)
    if compiled is gm:
        return profile
    with torch.no_grad():
        begin = time.perf_counter()
        compiled(*inputs)
        _sync(dev)
        startup_s = time.perf_counter() - begin
        for _ in range(warmup):
            compiled(*inputs)
            gm(*inputs)
        eager, fast = [], []
        for _ in range(repeats):
            eager.append(_time(gm, inputs, dev))
            fast.append(_time(compiled, inputs, dev))
    ratio = statistics.median(fast) / statistics.median(eager)
    record = {"mode": compiled.mode, "ratio": ratio, "startup_s": startup_s,
              "eager_ms": _stats(eager), "compiled_ms": _stats(fast),
              "costs": "eager node medians x ratio (Note [compiled profile] in asyncdiff_partition.fx.compile)"}
    return replace(profile, costs=[c * ratio for c in profile.costs], spread=[s * ratio for s in profile.spread],
                   compiled=record)


def _time(fn: Any, inputs: Sequence[Tensor], dev: torch.device) -> float:
    _sync(dev)
    begin = time.perf_counter()
    fn(*inputs)
    _sync(dev)
    return (time.perf_counter() - begin) * 1e3


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}
