"""Hybrid plans: every factorisation D = B x (N + S - 1) of the devices, costed, and the fastest within a fidelity budget.

Example::

    full, sliced = Profile.load("unet.b2.json"), Profile.load("unet.b1.json")   # batch 2, batch 1
    choice = make_hybrid_plan(full, 4, sliced=sliced, steps=20, bandwidth_gbps=10)
    print(format_candidates(choice)); choice.plan.save("plan.json")

Note [hybrid cost model]
~~~~~~~~~~~~~~~~~~~~~~~~
A candidate runs B batch groups of N segments (stride S) on the batch slice batch / B. Its
per-step costs come from the profile *measured at that slice* (``sliced``; a kernel on half the
rows is rarely half the time, so it is never divided): an asynchronous step costs the plan's
slowest segment at the slice (over S), an exact step the chain of all segments (the slice's
sequential step), and every step adds the ε all-gather across groups, ε bytes x (B - 1) / B over
the link bandwidth (free when no bandwidth is given). Steps that run exact are the phases'
(W warm-up steps, or a fixed window's complement). The ideal is B x AsyncDiff's ideal.
Fidelity is budgeted by *stale hops*, N S - 1: the number of one-step-stale hand-overs
between an async step's input and its ε (B groups and exact steps add none). The default
budget, 1, is the fidelity of N = 2 segments alone; the fastest candidate within it wins, a
tie (within 1 %) going to fewer stale hops, then to fewer weights per rank (the largest
segment's parameter bytes): less memory per rank, and on the 2-core machine the faster run too
(the SD 2.1 UNet's B1 N1 S2, every rank the whole model, was predicted 0.4 % faster than
B1 N2 S1 and ran 6-10 % slower in both repeats; benchmarks/hybrid/README.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from asyncdiff_partition.core.phases import PhaseError, check_phases
from asyncdiff_partition.core.plan import Plan, PlanError, format_plan, ideal_speedup, make_plan
from asyncdiff_partition.core.profile import Profile
from asyncdiff_partition.core.schedule import exact_mask, world_size
from asyncdiff_partition.core.summary import format_bytes

__all__ = ["Candidate", "HybridChoice", "format_candidates", "make_hybrid_plan", "plan_hybrid_file"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class Candidate:
    """One factorisation, costed (Note [hybrid cost model])."""

    batch_parallel: int
    n_devices: int
    stride: int
    plan: Plan
    step_ms: float  # an asynchronous step, all-gather included
    exact_step_ms: float  # an exact (chained) step, all-gather included
    gather_ms: float
    speedup: float
    ideal: float
    stale_hops: int
    fits: bool

    @property
    def name(self) -> str:
        return f"B{self.batch_parallel} N{self.n_devices} S{self.stride}"

    @property
    def weights_per_rank(self) -> int:
        """Parameter bytes of the largest segment: what the busiest rank holds."""
        return max(s.param_bytes for s in self.plan.segments)


@dataclass
class HybridChoice:
    plan: Plan  # the winner's, with batch_parallel, phases and the hybrid prediction
    candidates: list[Candidate]
    winner: Candidate
    why: str


def _batch(profile: Any) -> int:
    latent = next((i for i in profile.inputs if i.get("latent")), profile.inputs[0])
    return int(latent["shape"][0]) if latent["shape"] else 1


def _eps_bytes(profile: Any) -> int:
    latent = next((i for i in profile.inputs if i.get("latent")), profile.inputs[0])
    count = 1
    for d in latent["shape"]:
        count *= int(d)
    return count * _DTYPE_BYTES.get(str(latent["dtype"]).removeprefix("torch."), 4)


def make_hybrid_plan(
    profile: Any,
    devices: int,
    *,
    sliced: Any | None = None,
    batch_parallel: int | None = None,
    steps: int = 50,
    warmup: int = 1,
    phases: dict[str, Any] | None = None,
    max_stale_hops: int = 1,
    bandwidth_gbps: float | None = None,
    profile_path: str = "",
    sliced_path: str = "",
    **plan_options: Any,
) -> HybridChoice:
    """Cost every D = B x (N + S - 1) and pick (Note [hybrid cost model]).

    Args:
        profile: the profile at the full denoiser batch (B = 1 candidates).
        devices: D, all devices.
        sliced: the profile of the same model at batch / B (B > 1 candidates; B follows from
            the two batches); None: B = 1 only.
        batch_parallel: fix B (1, or the sliced profile's).
        steps, warmup, phases: T, W and the switching policy (a fixed window sets the exact steps).
        max_stale_hops: the fidelity budget (N S - 1 at most).
        bandwidth_gbps, plan_options: as for :func:`~asyncdiff_partition.core.plan.make_plan`.

    Raises:
        PlanError: a sliced profile of another model or of a batch that does not divide the
            full one, a B no profile allows, or no candidate at all.
    """
    full_batch = _batch(profile)
    groups = {1: profile}
    if sliced is not None:
        rows = _batch(sliced)
        if sliced.model != profile.model or len(sliced.costs) != len(profile.costs) or full_batch % rows or rows == full_batch:
            raise PlanError(
                f"the sliced profile must be the same model at a batch dividing {full_batch}; got {sliced.model} at "
                f"batch {rows} with {len(sliced.costs)} nodes (full: {profile.model}, {len(profile.costs)} nodes); "
                f"profile the model again with --batch {full_batch // 2}"
            )
        groups[full_batch // rows] = sliced
    if batch_parallel is not None:
        if batch_parallel not in groups:
            raise PlanError(f"--batch-parallel {batch_parallel} needs a profile at batch {full_batch} / {batch_parallel}; "
                            f"the profiles given allow B in {sorted(groups)} (pass --profile-sliced)")
        groups = {batch_parallel: groups[batch_parallel]}
    bandwidth = None if bandwidth_gbps is None else bandwidth_gbps * 1e6  # bytes per ms
    exact = exact_mask(steps, warmup=warmup, async_steps=(phases or {}).get("async_steps"))
    n_exact = sum([True, *exact[1:]])
    candidates = []
    sequential = None
    for b, prof in sorted(groups.items()):
        if devices % b:
            continue
        for stride in (1, 2):
            n = devices // b - stride + 1
            if n < 1:
                continue
            try:
                plan = make_plan(prof, n, stride=stride, warmup=warmup, steps=steps, bandwidth_gbps=bandwidth_gbps,
                                 profile_path=sliced_path if b > 1 else profile_path, **plan_options)
            except PlanError:
                continue  # N larger than this graph allows
            if b == 1:
                sequential = plan.predicted["sequential_step_ms"]
            gather = _eps_bytes(profile) * (b - 1) / b / bandwidth if bandwidth and b > 1 else 0.0
            step = plan.predicted["async_step_ms"] + gather
            exact_step = plan.predicted["sequential_step_ms"] + gather
            candidates.append(Candidate(b, n, stride, plan, step, exact_step, gather, 0.0,
                                        b * ideal_speedup(steps, n_exact, n, stride), n * stride - 1,
                                        n * stride - 1 <= max_stale_hops))
    if not candidates:
        raise PlanError(f"no factorisation of {devices} devices into B x (N + S - 1) fits this model; "
                        f"B in {sorted(groups)}")
    if sequential is None:
        sequential = make_plan(profile, 1, steps=steps, warmup=warmup).predicted["sequential_step_ms"]
    for c in candidates:
        total = n_exact * c.exact_step_ms + (steps - n_exact) * c.step_ms
        c.speedup = steps * sequential / total if total else float("nan")
    winner, why = _choose(candidates, max_stale_hops)
    plan = dataclasses.replace(
        winner.plan, batch_parallel=winner.batch_parallel, phases=phases,
        world_size=world_size(winner.n_devices, winner.stride, winner.batch_parallel),
        predicted={**winner.plan.predicted, "speedup": winner.speedup, "ideal_speedup": winner.ideal,
                   "gather_ms": winner.gather_ms, "full_sequential_step_ms": sequential},
    )
    return HybridChoice(plan, candidates, winner, why)


def _choose(candidates: list[Candidate], budget: int) -> tuple[Candidate, str]:
    fitting = [c for c in candidates if c.fits]
    pool = fitting or candidates
    best = max(c.speedup for c in pool)
    near = [c for c in pool if c.speedup >= 0.99 * best]
    winner = min(near, key=lambda c: (c.stale_hops, c.weights_per_rank, -c.speedup))
    why = f"{winner.name}: predicted {winner.speedup:.2f}x with {winner.stale_hops} stale hop(s)"
    if not fitting:
        why += f"; no candidate within the fidelity budget of {budget} stale hop(s), so the fastest of all"
    elif len(near) > 1:
        why += (f", the fewest stale hops, then the least weight per rank, among those within 1 % of the fastest "
                f"({', '.join(c.name for c in near)})")
    else:
        why += f", the fastest within the budget of {budget} stale hop(s)"
    faster = [c for c in candidates if not c.fits and c.speedup > winner.speedup]
    if faster and fitting:
        why += "; faster but over budget: " + ", ".join(f"{c.name} {c.speedup:.2f}x ({c.stale_hops} hops)" for c in faster)
    return winner, why


def format_candidates(choice: HybridChoice) -> str:
    """One row per candidate: predicted speedup beside the ideal, step costs, stale hops; then why."""
    rows = [("candidate", "world", "async step ms", "exact step ms", "all-gather ms", "predicted", "ideal",
             "stale hops", "weights/rank", "")]
    for c in sorted(choice.candidates, key=lambda c: -c.speedup):
        mark = "<- chosen" if c is choice.winner else ("" if c.fits else "over budget")
        rows.append((c.name, str(world_size(c.n_devices, c.stride, c.batch_parallel)), f"{c.step_ms:.1f}",
                     f"{c.exact_step_ms:.1f}", f"{c.gather_ms:.2f}", f"{c.speedup:.2f}x", f"{c.ideal:.2f}x",
                     str(c.stale_hops), format_bytes(c.weights_per_rank), mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 9) else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, f"why: {choice.why}"])


def plan_hybrid_file(profile_path: str, devices: int, *, sliced_path: str | None, batch_parallel: int | None,
                max_stale_hops: int, phases_json: str | None, warmup: int, steps: int,
                bandwidth_gbps: float | None, out_path: str) -> str:
    """The CLI's ``plan`` with batch groups: cost every D = B x (N + S - 1), save the winner; returns the printout.

    Raises:
        PhaseError: ``phases_json`` is not JSON or not a switching policy.
    """
    try:
        phases = check_phases(json.loads(phases_json)) if phases_json else None
    except json.JSONDecodeError as error:
        raise PhaseError(f"--phases must be JSON, e.g. '{{\"kind\": \"adaptive\", \"threshold\": 0.3}}' ({error})") from None
    choice = make_hybrid_plan(Profile.load(profile_path), devices,
                              sliced=Profile.load(sliced_path) if sliced_path else None, batch_parallel=batch_parallel,
                              steps=steps, warmup=warmup, phases=phases, max_stale_hops=max_stale_hops,
                              bandwidth_gbps=bandwidth_gbps, profile_path=profile_path, sliced_path=sliced_path or "")
    choice.plan.save(out_path)
    w = choice.winner
    title = f"{choice.plan.model}: {devices} device(s) as B={w.batch_parallel} group(s) x N={w.n_devices} S={w.stride}"
    return "\n".join([format_candidates(choice), "", format_plan(choice.plan, title=title), f"wrote {out_path}"])
