"""One call that runs any diffusers pipeline's denoisers asynchronously on several devices.

Example (a plain Python process: the ranks are started for you and stay up)::

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    parallelize(pipe, devices=2)                                   # 2 ranks start at the first call
    image = pipe(prompt="a red cube", height=512, width=512).images[0]   # the pipeline's own call
    pipe.close()                                                   # or interpreter exit

:func:`parallelize` makes the pipeline's call prepare itself (Note [prepared calls]) and puts a
:class:`~asyncdiff_partition.pipelines.wrap.ScheduledDenoiser` on every denoiser the call uses. It
runs in one of three places (Note [where the ranks run]).

Note [where the ranks run]
~~~~~~~~~~~~~~~~~~~~~~~~~~
* ``reference=True``: every segment in this process, the single-process reference schedule.
* Under an outside launcher (``torchrun``): every rank runs the user's script; each rank prepares
  the calls itself (rank 0 plans and sends the plan) and keeps only its segments' weights once the
  first call has run.
* Otherwise (a plain process): this process runs the pipeline and its loop, and the denoisers'
  calls run on ranks that it starts and keeps up (:mod:`~asyncdiff_partition.pipelines.engine`);
  it prepares every call structure and hands each rank its finished segments.

Note [prepared calls]
~~~~~~~~~~~~~~~~~~~~~
A pipeline call whose denoiser calls all have a captured structure runs at once. A call with a
new structure (another size, batch, guidance pattern, attention set-up) stops at its first such
denoiser call (:class:`~asyncdiff_partition.pipelines.wrap.NeedsCapture`, on every rank at the same
call), the pipeline's random state and the caller's generators are put back as they were, the
call is prepared (recorded, captured, planned, split: :mod:`~asyncdiff_partition.pipelines.compiler`)
and run again. Prompts, seeds and guidance scales never prepare again. Under an outside launcher
every rank keeps only its segments once the first call has run, so later structures cannot be
captured there: prepare them first (``parallelize(pipe, ..., **call)``, :func:`warm`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.plan import Plan, PlanError
from asyncdiff_partition.pipelines.compiler import CACHE_ENV, PlanBook, choose_plan, default_cache_dir
from asyncdiff_partition.pipelines.prepared import ParallelizeError, Prepared, plan_from_dict

__all__ = ["CACHE_ENV", "ParallelizeError", "choose_plan", "default_cache_dir", "describe", "parallel_state",
           "parallelize", "unparallelize", "warm"]

_STATE = "_asyncdiff_parallel"  # the pipeline's Prepared (or Engine), in its __dict__


def parallelize(
    pipe: Any,
    devices: int | ParallelConfig | None = None,
    *,
    batch_parallel: int | str | None = None,
    stride: int | None = None,
    warmup: int | None = None,
    switch_warmup: int | None = None,
    phases: dict[str, Any] | None = None,
    extrapolation: float | None = None,
    latency_slack: float | None = None,
    compile: bool | None = None,
    timeout_s: float | None = None,
    threads: int | None = None,
    plan: str | Path | None = None,
    reference: bool = False,
    cache_dir: str | Path | None = None,
    steps: int = 50,
    max_structures: int = 8,
    **call_kwargs: Any,
) -> Any:
    """Run ``pipe``'s denoisers as the asynchronous schedule; returns ``pipe``.

    Then call ``pipe(...)`` as before, with any arguments: each new call structure is prepared
    on its first call (Note [prepared calls]); ``call_kwargs``, if given, are prepared now. The
    plan in use is the denoiser's ``plan`` attribute (``pipe.unet.plan``); :func:`describe` lists
    every denoiser's. Where the ranks run: Note [where the ranks run].

    Args:
        pipe: a diffusers pipeline (any family: the denoisers are found, Note [finding the denoiser]).
        devices: D, all devices (ranks), or a whole :class:`~asyncdiff_partition.core.config.ParallelConfig`;
            the keywords below change single fields of it (their meaning: that class).
        plan: a saved plan file for this model at these shapes; default: make one.
        reference: run every segment in this process (fidelity checks; no ranks).
        cache_dir: where profiles are cached (default :func:`default_cache_dir`).
        steps: the T the plans' predicted speedups are written for.
        max_structures: call structures kept prepared on the started ranks; the least recently
            used is dropped beyond it.
        call_kwargs: a pipeline call to prepare now (``prompt``, ``height``, ``image``, ...).

    Raises:
        ConfigError: a configuration that breaks a rule of ``ParallelConfig``.
        ParallelizeError: another world size than the launcher started.
        RecordingError: the dry run did not find a denoiser.
        PlanError: ``plan`` was made for another model or other shapes.
    """
    from asyncdiff_partition.runtime.launch import is_launched_externally

    config = _config(devices, batch_parallel=batch_parallel, stride=stride, warmup=warmup,
                     switch_warmup=switch_warmup, phases=phases, extrapolation=extrapolation,
                     latency_slack=latency_slack, compile=compile, timeout_s=timeout_s, threads=threads)
    unparallelize(pipe)
    plans = PlanBook(config, cache_dir=cache_dir, steps=steps, plan_path=plan)
    state: Any
    if reference:
        state = Prepared(pipe, config, mode="reference", plans=plans)
    elif is_launched_externally():
        world = int(os.environ["WORLD_SIZE"])
        if world != config.world:
            raise ParallelizeError(f"parallelize(devices={config.devices}) needs {config.world} ranks but WORLD_SIZE is "
                                   f"{world}; start {config.world} processes or pass devices={world}")
        from asyncdiff_partition.runtime import comm

        _, _, device = comm.init(timeout_s=config.timeout_s)
        if device.type == "cuda":
            pipe.to(device)
        plans.agree = _agree
        state = Prepared(pipe, config, mode="ranks", plans=plans)
    else:
        from asyncdiff_partition.pipelines.engine import Engine

        state = Engine(pipe, config, plans=plans, max_structures=max_structures)
    _intercept(pipe, state)
    if call_kwargs:
        try:
            state.prepare((), call_kwargs)
        except BaseException:
            unparallelize(pipe)
            raise
    return pipe


def _config(devices: int | ParallelConfig | None, **fields_: Any) -> ParallelConfig:
    base = devices if isinstance(devices, ParallelConfig) else ParallelConfig()
    changes = {name: value for name, value in fields_.items() if value is not None}
    if isinstance(devices, int) and not isinstance(devices, bool):
        changes["devices"] = devices
    elif devices is not None and not isinstance(devices, ParallelConfig):
        raise ConfigError(f"devices must be a number of devices or a ParallelConfig, got {devices!r}")
    return base.replace(**changes)


def warm(pipe: Any, *args: Any, **call_kwargs: Any) -> Any:
    """Prepare the call ``pipe(*args, **call_kwargs)`` ahead (Note [prepared calls]); returns ``pipe``.

    Raises:
        ParallelizeError: ``pipe`` was not parallelized, or its ranks already dropped other weights.
    """
    _state(pipe, "warm").prepare(args, call_kwargs)
    return pipe


def describe(pipe: Any) -> list[str]:
    """What a parallelized pipeline runs: one line per denoiser, one for the weights each rank holds.

    Example:
        >>> print("\\n".join(describe(pipe)))  # doctest: +SKIP
        transformer (WanTransformer3DModel): 2 call(s) per step, 1 call structure(s), boundaries [0, 412, 838], ...
        weights per rank: rank 0 1.2 MB (transformer 0.6 MB, transformer_2 0.6 MB), rank 1 ...
    """
    return _state(pipe, "describe").summary()


def parallel_state(pipe: Any) -> Any:
    """What runs a parallelized pipeline: its :class:`~asyncdiff_partition.pipelines.engine.Engine` in a plain
    process (ranks, counts, timings, reports), else its :class:`~asyncdiff_partition.pipelines.prepared.Prepared`.

    Raises:
        ParallelizeError: ``pipe`` was not parallelized.
    """
    return _state(pipe, "parallel_state")


def unparallelize(pipe: Any) -> Any:
    """Undo :func:`parallelize`: ranks ended, the pipeline's own call and every denoiser's own ``forward`` back."""
    state = pipe.__dict__.pop(_STATE, None)
    if state is not None:
        object.__setattr__(pipe, "__class__", state.cls)
        state.close()
    return pipe


def _state(pipe: Any, what: str) -> Any:
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ParallelizeError(f"{what}() needs a parallelized pipeline; call parallelize({type(pipe).__name__}, ...) first")
    return state


def _intercept(pipe: Any, state: Any) -> None:
    """Route ``pipe(...)`` through ``state``: the instance gets a subclass of its own class (same name)
    whose ``__call__`` does that, and a ``close()``."""
    import functools

    cls = type(pipe)
    own = cls.__call__

    @functools.wraps(own)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__[_STATE].call(args, kwargs)

    def close(self: Any) -> None:
        """End the parallel run: ranks stopped, the pipeline as it was before parallelize."""
        unparallelize(self)

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self: Any, *exc: Any) -> None:
        unparallelize(self)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "close": close, "__enter__": __enter__,
                                      "__exit__": __exit__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    pipe.__dict__[_STATE] = state
    object.__setattr__(pipe, "__class__", sub)


def _agree(decide: Callable[[], Plan]) -> Plan:
    """Rank 0 decides the plan and sends it; every rank gets the same plan, or the same error."""
    from asyncdiff_partition.runtime import comm

    message: dict[str, Any] = {}
    if comm.rank() == 0:
        try:
            message = {"plan": decide().to_dict()}
        except AsyncDiffError as error:
            message = {"error": str(error)}
    message = comm.broadcast_object(message, src=0, what="the plan")
    if "error" in message:
        raise PlanError(message["error"])
    return plan_from_dict(message["plan"])
