"""One configuration of a parallel run: devices, batch groups, stride, warm-up, phases, λ, slack, compile, timeout.

Example::

    config = ParallelConfig(devices=4, batch_parallel=2, warmup=2).checked()
    config.segments, config.world          # N = 2 segments per batch group, 4 ranks
    parallelize(pipe, config)              # or parallelize(pipe, devices=4, batch_parallel=2, warmup=2)

The same names are :func:`~asyncdiff_partition.pipelines.parallelize.parallelize`'s keywords, the
CLI's flags (``--devices``, ``--batch-parallel``, ``--stride``, ``--warmup``, ``--switch-warmup``,
``--phases``, ``--extrapolation``, ``--latency-slack``, ``--compile``, ``--timeout``) and the plan
file's fields; :meth:`ParallelConfig.checked` is the one set of rules.

Note [devices]
~~~~~~~~~~~~~~
``devices`` is D, every device (rank) a run uses, in every command. A run splits them into B
batch groups of N + S - 1 ranks each (N segments, stride S: one extra rank), so
N = D / B - S + 1. With B = 1 and S = 1, D = N.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.phases import PhaseError, check_phases

__all__ = ["AUTO", "ParallelConfig"]

AUTO = "auto"  # batch_parallel chosen by the planner from two profiles (core.hybrid_plan)


@dataclass(frozen=True)
class ParallelConfig:
    """What a parallel run is asked to do (Note [devices]); frozen, checked by :meth:`checked`.

    Attributes:
        devices: D, all ranks of the run.
        batch_parallel: B batch groups (guidance branches run side by side), or ``"auto"``.
        stride: S, 1 or 2 (AsyncDiff's stride denoising: one extra rank per group).
        warmup: exact warm-up steps, in inference steps.
        switch_warmup: exact steps where a second denoiser takes over (default ``warmup``).
        phases: the switching policy (``core.phases``), None: exact for the warm-up, then async.
        extrapolation: λ, how far stale values are extrapolated (stride 1 only).
        latency_slack: how much slower than the fastest split a less stale split may be.
        compile: run every segment through ``torch.compile``.
        timeout_s: bound on every wait for another rank.
        threads: threads per rank (None: the machine's cores / ranks, at least 1).
    """

    devices: int = 2
    batch_parallel: int | str = 1
    stride: int = 1
    warmup: int = 1
    switch_warmup: int | None = None
    phases: Mapping[str, Any] | None = field(default=None, hash=False)
    extrapolation: float = 0.0
    latency_slack: float = 0.0
    compile: bool = False
    timeout_s: float = 300.0
    threads: int | None = None

    @property
    def groups(self) -> int:
        """B (1 while ``batch_parallel`` is ``"auto"``: the planner decides)."""
        return self.batch_parallel if isinstance(self.batch_parallel, int) else 1

    @property
    def segments(self) -> int:
        """N = D / B - S + 1 (Note [devices])."""
        return self.devices // self.groups - self.stride + 1

    @property
    def world(self) -> int:
        """Ranks the run starts: D."""
        return self.devices

    def checked(self) -> ParallelConfig:
        """This configuration, after every rule; raises :class:`ConfigError` naming the field and the fix."""
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")

        whole("devices", self.devices, 1)
        whole("warmup", self.warmup, 0)
        if self.switch_warmup is not None:
            whole("switch_warmup", self.switch_warmup, 0)
        if self.batch_parallel != AUTO:
            whole("batch_parallel", self.batch_parallel, 1)
        if isinstance(self.stride, bool) or self.stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2 (2: stride denoising with one extra rank), got {self.stride!r}")
        if self.devices % self.groups:
            raise ConfigError(f"devices={self.devices} do not split into batch_parallel={self.batch_parallel} groups; "
                              f"use a multiple of {self.groups} devices")
        if self.segments < 1:
            raise ConfigError(f"devices={self.devices} leave no segment with batch_parallel={self.batch_parallel} and "
                              f"stride={self.stride} (N = D / B - S + 1 = {self.segments}); use more devices")
        if not (isinstance(self.extrapolation, (int, float)) and 0.0 <= self.extrapolation <= 1.0):
            raise ConfigError(f"extrapolation must be between 0 and 1, got {self.extrapolation!r}")
        if self.extrapolation and self.stride != 1:
            raise ConfigError("extrapolation needs stride 1 (stride 2 reads values two steps old); set one of them back")
        if not (isinstance(self.latency_slack, (int, float)) and self.latency_slack >= 0 and math.isfinite(self.latency_slack)):
            raise ConfigError(f"latency_slack must be a finite number >= 0, got {self.latency_slack!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.threads is not None:
            whole("threads", self.threads, 1)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        try:
            check_phases(self.phases)
        except PhaseError as error:
            raise ConfigError(str(error)) from None
        return self

    def replace(self, **changes: Any) -> ParallelConfig:
        """A checked copy with ``changes`` (unknown names are one error naming the known ones)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; ParallelConfig takes "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes).checked()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["phases"] = None if self.phases is None else dict(self.phases)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParallelConfig:
        return cls().replace(**dict(data))
