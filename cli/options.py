"""The run configuration's flags, shared by the commands that run ranks, and what a command refuses.

Note [one flag, one meaning]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every flag of :class:`~asyncdiff_partition.core.config.ParallelConfig` has one name and one meaning
in every command (``--devices`` is D, all ranks of the run; N, the segments, follows from it), and
:meth:`ParallelConfig.checked` is the one set of rules. A command that cannot honour a flag the
user gave refuses it in one line (:func:`refuse`) instead of dropping it; "given" is what the user
typed, not a default (click's parameter source).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import click

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import ConfigError

__all__ = ["CONFIG_FLAGS", "given", "parallel_config", "parallel_options", "refuse"]

# parameter name -> ParallelConfig field
CONFIG_FLAGS = {"devices": "devices", "batch_parallel": "batch_parallel", "stride": "stride", "warmup": "warmup",
                "switch_warmup": "switch_warmup", "phases_json": "phases", "extrapolation": "extrapolation",
                "latency_slack": "latency_slack", "compile_": "compile", "timeout_s": "timeout_s"}


def parallel_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The flags of a :class:`ParallelConfig`; unset ones keep its defaults (see :func:`parallel_config`)."""
    options = [
        click.option("--devices", type=click.IntRange(min=1), default=None,
                     help="D, all devices (ranks) of the run; each of B batch groups runs N = D / B - S + 1 segments "
                          "(default 2)."),
        click.option("--batch-parallel", type=click.IntRange(min=1), default=None,
                     help="B batch groups: guidance branches run side by side (default 1)."),
        click.option("--stride", type=click.IntRange(1, 2), default=None,
                     help="S: 2 = stride denoising, one extra rank per group (default 1)."),
        click.option("--warmup", type=click.IntRange(min=0), default=None,
                     help="W, exact warm-up steps, counted in inference steps (default 1)."),
        click.option("--switch-warmup", type=click.IntRange(min=0), default=None,
                     help="Exact steps where a second denoiser takes over (default: --warmup)."),
        click.option("--phases", "phases_json", default=None,
                     help='Switching policy as JSON, e.g. \'{"kind": "adaptive", "threshold": 0.3}\'.'),
        click.option("--extrapolation", type=click.FloatRange(0, 1), default=None,
                     help="λ: stale values are read as v(s-1) + λ (v(s-1) - v(s-2)) (stride 1; default 0)."),
        click.option("--latency-slack", type=click.FloatRange(min=0), default=None,
                     help="How much slower than the fastest split a less stale split may be (default 0)."),
        click.option("--compile", "compile_", is_flag=True, default=False,
                     help="torch.compile each rank's segment (CUDA graphs on CUDA; on CPU needs a C++ compiler, "
                          "else eager with a warning)."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None,
                     help="Seconds a rank waits for another before giving up (default 300)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def given(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """The parameters among ``names`` that the user set (on the command line or from the environment)."""
    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return [name for name in names if ctx.get_parameter_source(name) in sources]


def refuse(ctx: click.Context, names: Iterable[str], why: str) -> None:
    """One :class:`ConfigError` naming the flags among ``names`` the user gave, with ``why`` (Note [one flag, one meaning])."""
    found = given(ctx, names)
    if found:
        flags = ", ".join(_flag(ctx, name) for name in found)
        raise ConfigError(f"{flags}: {why}")


def parallel_config(ctx: click.Context, base: ParallelConfig | None = None, threads: int | None = None) -> ParallelConfig:
    """The checked configuration: ``base`` (default: ``ParallelConfig()``) with the flags the user gave."""
    changes: dict[str, Any] = {}
    for name in given(ctx, CONFIG_FLAGS):
        value = ctx.params[name]
        changes[CONFIG_FLAGS[name]] = _phases(value) if name == "phases_json" else value
    if threads is not None:
        changes["threads"] = threads
    return (base or ParallelConfig()).replace(**changes)


def _phases(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--phases must be JSON, e.g. '{{\"kind\": \"adaptive\", \"threshold\": 0.3}}' ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--phases must be a JSON object, got {text!r}")
    return value


def _flag(ctx: click.Context, name: str) -> str:
    for param in ctx.command.params:
        if param.name == name and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return name
