"""When the asynchronous phase runs: a fixed step range from the plan, or the guidance delta measured while sampling.

Example::

    policy = PhasePolicy({"kind": "adaptive", "threshold": 0.3}, warmup=1, stride=1)
    policy.reset(len(timesteps))
    for s, t in enumerate(timesteps):
        table = make_schedule(n, len(timesteps), warmup=1, exact=policy.mask)   # steps <= s fixed
        eps = ...                                                                 # step s
        policy.observe(s, eps)                                                    # fixes a later step
    policy.record()     # per step: mode, measured delta, why

Note [adaptive phases]
~~~~~~~~~~~~~~~~~~~~~~
Hybridiff (Jung et al., CVPR 2026, arXiv 2602.21760, Sec. 4) turns pipelining on only where the
guidance branches' predictions differ little: the relative mean absolute difference
``delta(s) = mean|ε_c - ε_u| / mean|ε_u|`` between the conditional and unconditional ε of step
s. Early steps (large delta, global structure) run exactly; the asynchronous phase starts once
delta falls under ``threshold``. Ours, per step s:

* delta is measured on the full ε every rank holds (after the all-gather), so every rank takes
  the same decision from the same bytes, with no extra message;
* the decision made after step s fixes step s + 1 + :func:`~asyncdiff_partition.core.schedule.
  decided_ahead` (Note [phases]: the runtime must know that far ahead who reads what), so the
  switch lags the measurement by 2 (stride 1) or 4 (stride 2) steps; delta moves slowly;
* hysteresis: ``patience`` consecutive steps under ``threshold`` switch async on; a delta above
  ``exit`` (default: never) switches it off again; the last ``final_exact`` steps are exact
  (fine detail), and so are the first W (the plan's warm-up).

With more than two branches (InstructPix2Pix) delta is the largest over branches 1.. against
branch 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from asyncdiff_partition.core.phases import KINDS, PhaseError, check_phases
from asyncdiff_partition.core.schedule import decided_ahead, exact_mask

__all__ = ["KINDS", "PhaseError", "PhasePolicy", "check_phases", "guidance_delta"]  # the spec: core.phases

def guidance_delta(eps: Tensor, branches: int) -> float | None:
    """Relative mean absolute difference of the guidance branches' ε (Note [adaptive phases]).

    None when the batch does not split into ``branches`` equal parts.
    """
    if branches < 2 or eps.shape[0] % branches:
        return None
    parts = eps.detach().float().chunk(branches, dim=0)
    base = parts[0].abs().mean().clamp_min(1e-12)
    return max(float((part - parts[0]).abs().mean() / base) for part in parts[1:])


class PhasePolicy:
    """Decides the exactness mask of Note [phases], step by step; every rank holds one.

    Args:
        phases: the plan's ``phases`` spec (:func:`check_phases`).
        warmup: W; steps before it are always exact.
        stride: the schedule's stride (how far ahead decisions must be fixed).
        branches: guidance branches in the batch, for the measured delta (default 2).
    """

    def __init__(self, phases: Mapping[str, Any] | None, *, warmup: int, stride: int, branches: int = 2):
        self.spec = check_phases(phases)
        self.warmup, self.stride, self.branches = warmup, stride, branches
        self.reset(0)

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def reset(self, steps: int) -> None:
        """Start a run of ``steps`` steps: the mask as far as it is known before any step."""
        self.steps = steps
        self._deltas: list[float | None] = []
        self._on, self._under = False, 0
        if self.kind == "adaptive":
            ahead = decided_ahead(self.stride)
            self.mask = [True] * steps
            self._why = ["start" if s <= ahead else "" for s in range(steps)]
        else:
            window = self.spec.get("async_steps")
            self.mask = exact_mask(steps, warmup=self.warmup, async_steps=window)
            self.mask[:1] = [True] * min(steps, 1)
            where = f"[{window[0]}, {window[1]})" if window else f"[W={self.warmup}, T)"
            self._why = [f"{self.kind} async window {where}"] * steps

    def observe(self, step: int, eps: Tensor) -> None:
        """Measure step ``step``'s ε; an adaptive policy fixes a later step's mode from it.

        Raises:
            PhaseError: an adaptive policy on a batch without ``branches`` equal branches.
        """
        delta = guidance_delta(eps, self.branches)
        self._deltas.append(delta)
        if self.kind != "adaptive":
            return
        if delta is None:
            raise PhaseError(
                f"the adaptive policy measures the difference of {self.branches} guidance branches, but the "
                f"denoiser batch is {eps.shape[0]}; sample with guidance (a batch of {self.branches} x images) or "
                f"use fixed phases"
            )
        spec = self.spec
        threshold, exit_ = spec["threshold"], spec["exit"]
        self._under = self._under + 1 if delta < threshold else 0
        if not self._on and self._under >= spec["patience"]:
            self._on = True
        elif self._on and exit_ is not None and delta > exit_:
            self._on, self._under = False, 0
        target = step + 1 + decided_ahead(self.stride)
        if target >= self.steps:
            return
        if target < self.warmup:
            self._why[target] = "warm-up"
        elif target >= self.steps - spec["final_exact"]:
            self._why[target] = "final exact steps"
        else:
            self.mask[target] = not self._on
            rule = (f"delta {delta:.3g} {'<' if delta < threshold else '>='} threshold {threshold:g}"
                    + (f", {self._under} step(s) under" if self._on else ""))
            self._why[target] = f"{'async' if self._on else 'exact'}: at step {step} {rule}"

    def record(self) -> list[dict[str, Any]]:
        """Per step of the run so far: ``step``, ``mode`` (exact/async), ``delta`` measured, ``reason``."""
        return [{"step": s, "mode": "exact" if self.mask[s] else "async",
                 "delta": self._deltas[s] if s < len(self._deltas) else None, "reason": self._why[s]}
                for s in range(self.steps)]
