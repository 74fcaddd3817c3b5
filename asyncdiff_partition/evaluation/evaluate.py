"""Fidelity of asynchronous denoising against the sequential model: the ``eval`` command.

Example::

    result = evaluate("digits", devices=(2, 3), strides=(1,), warmups=(1, 3), steps=20, images=10,
                      out_dir="out/eval")
    print(result.markdown)           # one row per configuration; CSV, markdown and PNG in out/eval

Note [what eval measures]
~~~~~~~~~~~~~~~~~~~~~~~~~
For one model, one batch of samples (same seeds, same labels / conditioning) is drawn once
sequentially (the unsplit captured graph) and once per configuration with the asynchronous
schedule, in one process through :class:`~asyncdiff_partition.runtime.reference.ReferenceSchedule`.
The reference is the exact oracle of the distributed runtime (every runtime test asserts the
two are equal), so no processes are started. The fidelity of a given split does not depend on
the machine; where the ``auto`` plan cuts, and every predicted speedup, come from a profile
taken in the same run on this machine.

A configuration is (split, N, S, W): ``auto`` is :func:`~asyncdiff_partition.core.plan.make_plan`'s
latency-balanced split of one profile; ``hand`` cuts only between top-level blocks, AsyncDiff
style (:func:`hand_boundaries`); ``fidelity`` is the least stale split within a latency slack of
``auto``'s bottleneck (core/partition.py, Note [staleness objective]), after a calibration run on
another batch of the same model (other noise; fx/staleness.py), whose stale values are read
extrapolated with the λ that did best on that calibration batch at stride 1
(:meth:`FidelityBench.choose_extrapolation`, Note [extrapolation] in runtime/extrapolation.py).
Per configuration the table shows the mean PSNR, SSIM and
relative L2 of every asynchronous sample against its sequential twin, the plan's predicted speedup and the
ideal one, and for the ``digits`` model the bundled classifier's class accuracy (it says the
requested class) and the Fréchet distance of its features to real digits, both also for the
sequential row. Samples are the final x_0 of a DDIM loop, clipped to [-1, 1] and compared on
[0, 1]; for a latent model that is the latent itself (nothing is decoded).

W = 0 runs like W = 1 (the first step has nothing stale to read; schedule.py), so its
predicted and ideal speedups are computed with one warm-up step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.hybrid_plan import make_hybrid_plan
from asyncdiff_partition.core.phases import check_phases
from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import ASYNCDIFF_SD21_BOUNDARIES, PlanError, make_plan, module_boundaries
from asyncdiff_partition.evaluation.classifier import classify, features, real_digits
from asyncdiff_partition.evaluation.metrics import frechet_distance, psnr, ssim
from asyncdiff_partition.evaluation.report import (
    COLUMNS,
    ORACLE_NOTE,
    describe_row,
    format_markdown,
    write_fidelity,
)
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.fx.staleness import calibrate_staleness, injection_boundaries, spread_to_boundaries, transfer_staleness
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.pipelines.digits import CONFIG, digits_scheduler
from asyncdiff_partition.pipelines.wrap import denoise
from asyncdiff_partition.runtime.reference import ReferenceSchedule

__all__ = ["COLUMNS", "EXTRAPOLATION_GRID", "EvalResult", "FidelityBench", "evaluate", "format_markdown", "hand_boundaries"]

Row = dict[str, Any]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured and wrote.

    Attributes:
        rows: one dict per configuration (keys :data:`COLUMNS`), the sequential row first
            (after a ``real digits`` row of the metrics' floor, for the digits model).
        markdown: the table as markdown, with a header saying what was run.
        paths: ``{"csv", "markdown", "plot"}`` -> written file, when an ``out_dir`` was given.
        seconds: wall time of the whole evaluation.
    """

    rows: list[Row]
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate(
    model_spec: str | None = None,
    *,
    devices: Sequence[int] = (2, 3, 4),
    strides: Sequence[int] = (1, 2),
    warmups: Sequence[int] = (0, 1, 3, 5),
    steps: int = 20,
    images: int = 4,
    seed: int = 0,
    guidance: float = 2.0,
    hand_split: bool = True,
    latency_slacks: Sequence[float] = (0.03,),
    calibration_images: int = 1,
    out_dir: str | Path | None = None,
    profile_repeats: int = 2,
    echo: Callable[[str], None] | None = None,
    batch_parallel: Sequence[int] = (1,),
    phases: Sequence[dict[str, Any] | None] = (None,),
) -> EvalResult:
    """Sample sequentially and asynchronously per configuration and compare (Note [what eval measures]).

    Args:
        model_spec: zoo name or local diffusers directory (default :data:`zoo.DEFAULT_MODEL`).
        devices, strides, warmups: every combination of N, S and W is one configuration.
        steps: T, denoising steps of every run.
        images: samples per class for a class-conditional model (labels 0, 1, ... each
            ``images`` times), else samples in all; one batch.
        seed: seeds the weights of a zoo model, the conditioning and the initial noise.
        guidance: classifier-free guidance scale for a class-conditional model (its last class
            is the null class, as in :mod:`~asyncdiff_partition.pipelines.class_guided`); <= 1 for none.
            Other models are sampled without guidance, on their example conditioning.
        hand_split: also evaluate the block-boundary hand split at every N.
        latency_slacks: one ``fidelity`` split per value: the least stale plan within that
            slack of the optimal bottleneck (the profile is calibrated for staleness on a small
            calibration batch first); empty for none.
        calibration_images: like ``images``, for the calibration batch (drawn with other noise).
        out_dir: where to write ``fidelity.csv``, ``fidelity.md`` and ``fidelity.png``.
        profile_repeats: timed runs of the one profile the plans are made from.
        echo: progress lines go here (``print``, ``click.echo``); None for silence.
        batch_parallel: values of B; every B > 1 adds *hybrid* rows (B batch groups x the auto
            split at every N, S, W, sampled by the reference schedule on the batch slice).
        phases: switching policies (:mod:`~asyncdiff_partition.runtime.policy`); every one but
            None adds rows per B (B = 1 included), the policy named in the ``split`` column.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ValueError: empty or out-of-range settings, an unknown model.
    """
    _check_settings(devices, strides, warmups, steps, images)
    if any(not 0 <= x < math.inf for x in latency_slacks):
        raise ConfigError(f"latency slacks must be finite numbers >= 0 (0.03 = 3 %), got {list(latency_slacks)}")
    if latency_slacks and steps < 2:
        raise ConfigError(f"fidelity-aware splits are calibrated on stale steps and need steps >= 2, got {steps}; "
                         f"raise --steps or pass --latency-slack ''")
    say = echo or (lambda _line: None)
    begin = time.perf_counter()
    bench = FidelityBench(model_spec, steps=steps, images=images, seed=seed, guidance=guidance,
                          profile_repeats=profile_repeats, command="asyncdiff-partition eval")
    say(f"eval {bench.name}: {bench.describe()}; {ORACLE_NOTE}")
    rows = [bench.sequential]
    if bench.real_row is not None:
        rows.insert(0, bench.real_row)
        say("  " + describe_row(rows[0]))
    splits: list[tuple[str, float]] = [("auto", 0.0)] + ([("hand", 0.0)] if hand_split else [])
    if latency_slacks:  # calibrated on its own batch (other noise), never on the batch judged here
        calibration = FidelityBench(model_spec, steps=steps, images=calibration_images, seed=seed, guidance=guidance,
                                    profile_repeats=1, noise_seed=seed + 1000, command="asyncdiff-partition eval")
        bench.adopt(calibration.calibrate(warmup=1, progress=echo is not None), calibration.graph)
        say(f"calibrated staleness on {calibration.describe()} (noise seed {seed + 1000})")
        splits += [("fidelity", x) for x in latency_slacks]
    for split, slack in splits:
        for n in devices:
            try:
                hand = hand_boundaries(bench.model, bench.graph, n) if split == "hand" else None
                boundaries = bench.plan(n, boundaries=hand, latency_slack=slack).boundaries
            except ValueError as error:
                rows.append({**bench.base, "split": split, "n_devices": n, "note": f"skipped: {error}"})
                say(f"  {split} N={n}: skipped ({error})")
                continue
            # a fidelity-aware plan also reads its stale values extrapolated, λ chosen on the calibration batch
            factor = calibration.choose_extrapolation(bench, boundaries) if split == "fidelity" and n > 1 else 0.0
            for stride in strides:
                for warmup in warmups:
                    rows.append(_configuration(bench, split, n, stride, warmup, hand, slack, boundaries,
                                               factor if stride == 1 else 0.0))
                    say("  " + describe_row(rows[-1]))
    for b in batch_parallel:
        for policy in phases:
            if b > 1 or policy is not None:
                rows.extend({**bench.base, **row} for row in _hybrid_rows(
                    bench, b, policy, devices, strides, warmups, profile_repeats, say))
    seconds = time.perf_counter() - begin
    guide = f", guidance {guidance:g}" if bench.guided else ""
    markdown = format_markdown(rows, title=f"Fidelity of asynchronous denoising: {bench.name}, T={steps}, "
                               f"{bench.batch} samples (seed {seed}{guide}), {seconds:.0f} s")
    result = EvalResult(rows, markdown, seconds=seconds)
    if out_dir is not None:
        result.paths = write_fidelity(out_dir, rows, markdown)
        say("wrote " + ", ".join(str(p) for p in result.paths.values()))
    return result


def _check_settings(devices: Sequence[int], strides: Sequence[int], warmups: Sequence[int], steps: int,
                    images: int) -> None:
    if not devices or any(n < 1 for n in devices):
        raise ConfigError(f"devices must be a non-empty list of N >= 1, got {list(devices)}")
    if not strides or any(s not in (1, 2) for s in strides):
        raise ConfigError(f"strides must be 1 and/or 2, got {list(strides)}")
    if not warmups or any(w < 0 for w in warmups):
        raise ConfigError(f"warmups must be a non-empty list of W >= 0, got {list(warmups)}")
    if steps < 1 or images < 1:
        raise ConfigError(f"need steps >= 1 and images >= 1, got steps={steps}, images={images}")


def _configuration(bench: FidelityBench, split: str, n: int, stride: int, warmup: int, hand: Sequence[str] | None,
                   slack: float, boundaries: Sequence[int], extrapolation: float = 0.0) -> Row:
    """One row: the asynchronous samples of (split, N, S, W) against the sequential ones."""
    effective = max(warmup, 1)  # Note [what eval measures]: W = 0 runs as W = 1
    plan = bench.plan(n, stride=stride, warmup=effective, boundaries=hand, latency_slack=slack,
                      extrapolation=extrapolation)
    row: Row = {**bench.base, "split": split, "n_devices": n, "stride": stride, "warmup": warmup,
                "world_size": plan.world_size, "latency_slack": slack if split == "fidelity" else "",
                "extrapolation": extrapolation if split == "fidelity" else "",
                "boundaries": ", ".join(s.first_module for s in plan.segments[1:]),
                "staleness": plan.predicted.get("staleness", ""),
                "predicted_speedup": plan.predicted["speedup"], "ideal_speedup": plan.predicted["ideal_speedup"],
                "imbalance": plan.predicted["imbalance"], "note": ""}
    try:
        return {**row, **bench.judge(boundaries, stride, warmup, extrapolation)}
    except ValueError as error:
        return {**row, "note": f"skipped: {error}"}


EXTRAPOLATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # λ tried by FidelityBench.choose_extrapolation


class FidelityBench:
    """One model, one batch of samples and its sequential twin: the fidelity of any split (Note [what eval measures]).

    Shared by ``eval`` and ``tune``. Example::

        bench = FidelityBench("digits", steps=20, images=2, seed=0, guidance=2.0)
        bench.calibrate()                                      # profile.staleness, same batch
        plan = bench.plan(2, latency_slack=0.03)
        bench.judge(plan.boundaries, stride=1, warmup=1)       # {"psnr_db": ..., "frechet_distance": ...}
    """

    def __init__(self, model_spec: str | None, *, steps: int, images: int, seed: int, guidance: float,
                 profile_repeats: int = 2, command: str = "", noise_seed: int | None = None):
        self.name = model_spec or zoo.DEFAULT_MODEL
        self.model = zoo.load_model(self.name, seed=seed)
        self.labels = _labels(self.model, images)
        self.batch = len(self.labels) if self.labels is not None else images
        self.guided = self.labels is not None and guidance > 1
        self.steps, self.guidance, self.command = steps, guidance, command
        noise = seed if noise_seed is None else noise_seed  # weights from seed, samples from noise_seed
        inputs = zoo.example_inputs(self.model, batch=2 * self.batch if self.guided else self.batch, seed=noise)
        self.captured = capture_model(self.model, inputs.args, inputs.kwargs, latent=inputs.latent)
        self.graph = build_op_graph(self.captured)
        self.profile = profile_model(self.captured, model_name=self.name, repeats=profile_repeats, command=command)
        self.sampler = _Sampler(self.captured, inputs, self.labels, steps=steps, seed=noise,
                                scheduler=_scheduler(self.name, self.model), guidance=guidance if self.guided else None)
        self.digits, real_row = _digit_metrics(self.model, self.labels, seed)
        self.base: Row = {"model": self.name, "steps": steps, "samples": self.batch}
        self.real_row = None if real_row is None else {**self.base, **real_row}
        self.reference = self.sampler.run(None)
        self.sequential: Row = {**self.base, "split": "sequential", "n_devices": 1, "stride": "", "warmup": "",
                                "world_size": 1, "boundaries": "", "psnr_db": math.inf, "ssim": 1.0,
                                "relative_l2": 0.0, "predicted_speedup": 1.0, "ideal_speedup": 1.0, "imbalance": 1.0,
                                **self.digits(self.reference), "note": "unsplit model"}
        self._segments: dict[tuple[int, ...], list[Any]] = {}
        self._judged: dict[tuple[tuple[int, ...], int, int, float], Row] = {}

    def describe(self) -> str:
        classes = (f" (classes {self.labels.min()}-{self.labels.max()}, guidance {self.guidance:g})"
                   if self.labels is not None else "")
        return f"{self.batch} samples{classes}, T={self.steps}"

    def calibrate(self, *, warmup: int = 1, progress: bool = False) -> dict[str, Any]:
        """Measure staleness on this batch into ``self.profile.staleness`` and return it (fx/staleness.py).

        ``per_node`` comes from one recorded sequential run; ``cut_error`` from one asynchronous
        run per injection boundary (Note [cut error]): the relative L2 of its samples.
        """
        from tqdm import tqdm
        staleness = calibrate_staleness(
            self.captured, self.graph, self.sampler.run, warmup=warmup, steps=self.steps, samples=self.batch,
            guidance=self.guidance if self.guided else None, command=self.command)
        n, fresh = len(self.graph), self.graph.fresh
        measured: dict[int, float] = {}
        for r in tqdm(injection_boundaries(self.graph), desc="cut errors", unit="cut", disable=not progress):
            if all(fresh[i] or self.graph.node(i)["kind"] != "op" for i in range(r)):
                measured[r] = 0.0  # nothing stale before it: no plan can cut there
                continue
            try:
                measured[r] = self.judge([0, r, n], 1, warmup)["relative_l2"]
            except ValueError:
                measured[r] = math.nan
        worst = max((v for v in measured.values() if math.isfinite(v)), default=0.0)
        staleness["cut_error"] = spread_to_boundaries(
            self.graph, {r: v if math.isfinite(v) else worst for r, v in measured.items()})
        self._segments.clear()  # one split per injection boundary: not worth keeping
        self.profile.staleness = staleness
        return staleness

    def adopt(self, staleness: dict[str, Any], graph: Any) -> None:
        """Use a calibration made on another batch of the same model (``graph``: its op graph)."""
        if graph.order != self.graph.order:
            staleness = transfer_staleness(staleness, graph, self.graph)
        self.profile.staleness = staleness

    def choose_extrapolation(self, judged: FidelityBench, boundaries: Sequence[int], *, warmup: int = 1,
                             factors: Sequence[float] = EXTRAPOLATION_GRID) -> float:
        """λ with the least relative L2 on *this* batch for ``judged``'s cuts at stride 1 (Note [extrapolation]).

        ``boundaries`` index ``judged``'s op graph; they are carried over to this bench's by the
        module each segment starts in when the two graphs differ in order.
        """
        cuts = list(boundaries)
        if judged.graph.order != self.graph.order:
            paths = [judged.graph.node(b)["module"] for b in cuts[1:-1]]
            cuts = [0, *module_boundaries(self.graph, paths), len(self.graph)]
        errors = {factor: self.judge(cuts, 1, warmup, factor)["relative_l2"] for factor in factors}
        return min(errors, key=lambda factor: (errors[factor], factor))

    def plan(self, n: int, **options: Any) -> Any:
        """:func:`~asyncdiff_partition.core.plan.make_plan` on this bench's profile, for T = its steps."""
        return make_plan(self.profile, n, steps=self.steps, **options)

    def judge(self, boundaries: Sequence[int], stride: int, warmup: int, extrapolation: float = 0.0) -> Row:
        """PSNR, SSIM, relative L2 (and digit metrics) of the asynchronous samples with these cuts.

        A (S, W) that runs like another (W = 0 like W = 1, every W >= T alike) is sampled once.
        ``extrapolation``: λ of the plan field (Note [extrapolation] in runtime/extrapolation.py).

        Raises:
            ValueError: a schedule the segments cannot run (e.g. stride 2 without a timestep input).
        """
        cuts = tuple(boundaries)
        key = (cuts, stride, min(max(warmup, 1), self.steps), extrapolation)
        if key not in self._judged:
            if cuts not in self._segments:
                self._segments[cuts] = split_graph(self.captured, place(self.graph, list(cuts)))
            schedule = ReferenceSchedule(self._segments[cuts], warmup=warmup, stride=stride,
                                         timestep_input=self.sampler.timestep_input, extrapolation=extrapolation)
            samples = self.sampler.run(schedule)
            pairs = list(zip(self.reference, samples))
            self._judged[key] = {
                "psnr_db": float(np.mean([psnr(a, b) for a, b in pairs])),
                "ssim": float(np.mean([ssim(a, b) for a, b in pairs])),
                "relative_l2": float(np.mean([np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12) for a, b in pairs])),
                **self.digits(samples)}
        return dict(self._judged[key])


def _hybrid_rows(bench: FidelityBench, b: int, policy: dict[str, Any] | None, devices: Sequence[int],
                 strides: Sequence[int], warmups: Sequence[int], repeats: int, say: Callable[[str], None]) -> list[Row]:
    """Rows of B batch groups x the auto split with a switching policy (issue 13), beside the segment-only rows."""
    sampler, profile, steps = bench.sampler, bench.profile, bench.steps
    label = f"hybrid B={b}" + ("" if policy is None else f" {check_phases(policy)['kind']}")
    batch = sampler.captured.latent.shape[0]
    if batch % b:
        say(f"  {label}: skipped (the denoiser batch of {batch} does not split into {b} groups)")
        return [{"split": label, "n_devices": 0, "note": f"skipped: batch {batch} does not split into B={b}"}]
    captured, sliced = sampler.captured, profile
    if b > 1:
        part = zoo.example_inputs(bench.model, batch=batch // b, seed=0)
        captured = capture_model(bench.model, part.args, part.kwargs, latent=part.latent)
        sliced = profile_model(captured, model_name=profile.model, repeats=repeats, command="asyncdiff-partition eval")
    graph = build_op_graph(captured)
    rows = []
    for n in devices:
        for stride in strides:
            for warmup in warmups:
                row: Row = {"split": label, "n_devices": n, "stride": stride, "warmup": warmup}
                try:
                    choice = make_hybrid_plan(profile, b * (n + stride - 1), sliced=sliced if b > 1 else None,
                                              batch_parallel=b, steps=steps, warmup=max(warmup, 1), phases=policy,
                                              max_stale_hops=n * stride)
                    c = next(c for c in choice.candidates if (c.n_devices, c.stride) == (n, stride))
                    segments = split_graph(captured, place(graph, make_plan(sliced, n).boundaries))
                    schedule = ReferenceSchedule(segments, warmup=warmup, stride=stride, phases=policy, batch_parallel=b,
                                                 timestep_input=sampler.timestep_input, latent_input=captured.latent.name)
                except (ValueError, StopIteration) as error:
                    rows.append({**row, "note": f"skipped: {error}"})
                    continue
                samples = sampler.run(schedule)
                modes = [r["mode"] for r in schedule.policy.record()]
                rows.append({**row, "world_size": b * (n + stride - 1),
                             "boundaries": ", ".join(s.first_module for s in c.plan.segments[1:]),
                             "predicted_speedup": c.speedup, "ideal_speedup": c.ideal,
                             "imbalance": c.plan.predicted["imbalance"],
                             "psnr_db": float(np.mean([psnr(x, y) for x, y in zip(bench.reference, samples)])),
                             "ssim": float(np.mean([ssim(x, y) for x, y in zip(bench.reference, samples)])),
                             **bench.digits(samples),
                             "note": f"{modes.count('async')} of {len(modes)} steps async"})
                say("  " + describe_row(rows[-1]))
    return rows


def hand_boundaries(model: torch.nn.Module, graph: Any, n_devices: int) -> list[str]:
    """AsyncDiff-style hand split: module paths where segments 2..N start, only between top-level blocks.

    An SD 2.1-like UNet (SD's four down and up block types, two layers per block) gets
    AsyncDiff's published boundaries (:data:`~asyncdiff_partition.core.plan.ASYNCDIFF_SD21_BOUNDARIES`).
    Any other model's blocks are the items of its top-level ``ModuleList`` s plus a
    ``mid_block``, in execution order (``down_blocks.0 … mid_block … up_blocks.3``,
    ``transformer_blocks.0 …``); segment j starts at block ``round(j * blocks / N)``, which
    splits the block list evenly.

    Raises:
        ValueError: fewer blocks than N.
    """
    config = getattr(model, "config", None) or {}
    sd21_like = (type(model).__name__ == "UNet2DConditionModel" and config.get("layers_per_block") == 2
                 and tuple(config.get("down_block_types", ())) == zoo.SD_DOWN_BLOCKS
                 and tuple(config.get("up_block_types", ())) == zoo.SD_UP_BLOCKS)
    if sd21_like and n_devices in ASYNCDIFF_SD21_BOUNDARIES:
        return list(ASYNCDIFF_SD21_BOUNDARIES[n_devices])
    names = [f"{top}.{i}" for top, child in model.named_children() if isinstance(child, torch.nn.ModuleList)
             for i in range(len(child))]
    names += [top for top, _ in model.named_children() if top == "mid_block"]
    placed = []
    for block in names:
        try:
            placed.append((module_boundaries(graph, [block])[0], block))
        except PlanError:  # a block with no op of its own in this graph
            continue
    blocks = [block for _, block in sorted(placed)]
    if n_devices > len(blocks):
        raise ConfigError(f"a hand split cuts only between top-level blocks; this model has {len(blocks)} "
                         f"({', '.join(blocks) or 'none'}), too few for N={n_devices}")
    return [blocks[int(j * len(blocks) / n_devices + 0.5)] for j in range(1, n_devices)]


class _Sampler:
    """One DDIM sampling loop, the same seeds and conditioning every run (pipeline.denoise)."""

    def __init__(self, captured: Any, inputs: zoo.ModelInputs, labels: np.ndarray | None, *, steps: int,
                 seed: int, scheduler: Any, guidance: float | None):
        flat = captured.flatten(*inputs.args, **inputs.kwargs)
        specs = captured.inputs
        self.timestep_input = next((s.name for s in specs if s.path.split(".")[-1] == "timestep"), "timestep")
        self.cond = {s.name: t for s, t in zip(specs, flat) if not s.is_latent and s.name != self.timestep_input}
        for s in specs:
            if labels is not None and s.path == "class_labels":
                given = torch.as_tensor(labels)
                if guidance is not None:  # pipeline.denoise's batch order: unconditional half first
                    given = torch.cat([torch.full_like(given, int(labels.max()) + 1), given])
                self.cond[s.name] = given.to(getattr(torch, s.dtype))
        latent = captured.latent.shape
        images = latent[0] // 2 if guidance is not None else latent[0]
        self.noise = torch.randn(images, *latent[1:], generator=torch.Generator().manual_seed(seed + 1))
        self.captured, self.scheduler, self.steps, self.guidance = captured, scheduler, steps, guidance

    def run(self, denoiser: Any) -> np.ndarray:
        """Samples as float images in [0, 1], (batch, H, W, C); ``denoiser`` None = the unsplit graph."""
        if denoiser is None:
            from asyncdiff_partition.runtime.reference import UnsplitDenoiser

            denoiser = UnsplitDenoiser(self.captured)
        self.scheduler.set_timesteps(self.steps)
        with torch.no_grad():
            x = denoise(denoiser, self.captured, scheduler=self.scheduler, latents=self.noise * self.scheduler.init_noise_sigma,
                        timesteps=self.scheduler.timesteps, cond=self.cond, timestep_input=self.timestep_input,
                        guidance_scale=self.guidance)
        pixels = ((x.clamp(-1, 1) + 1) / 2).double().numpy()
        pixels = pixels.reshape(pixels.shape[0], -1, *pixels.shape[-3:])  # (batch, frames or 1, C, H, W)
        return np.moveaxis(pixels, 2, -1).reshape(pixels.shape[0], -1, pixels.shape[-1], pixels.shape[2])


def _scheduler(spec: str, model: torch.nn.Module) -> Any:
    """DDIM: the digits model's training betas, a pipeline directory's ``scheduler/``, else the defaults."""

    if _is_digits(model):
        return digits_scheduler()
    folder = Path(spec) / "scheduler"
    if spec not in zoo.list_models() and (folder / "scheduler_config.json").is_file():
        return diffusers.DDIMScheduler.from_pretrained(str(folder))
    return diffusers.DDIMScheduler()


def _labels(model: torch.nn.Module, per_class: int) -> np.ndarray | None:
    """Class labels 0..C-2, each ``per_class`` times, for a class-conditional UNet; else None.

    The last class embedding is the null class of classifier-free guidance (class_pipeline.py).
    """
    classes = getattr(getattr(model, "config", None), "num_class_embeds", None)
    if not classes or classes < 2:
        return None
    return np.repeat(np.arange(classes - 1), per_class)


def _is_digits(model: torch.nn.Module) -> bool:
    """A model shaped like the bundled digits model: 16 x 16, one channel, 10 classes + null."""
    config = dict(getattr(model, "config", None) or {})
    return all(config.get(key) == CONFIG[key] for key in ("in_channels", "sample_size", "num_class_embeds"))


def _digit_metrics(model: torch.nn.Module, labels: np.ndarray | None,
                   seed: int) -> tuple[Callable[[np.ndarray], Row], Row | None]:
    """Class accuracy and Fréchet distance to all real digits, for the digits model's samples.

    Also returns the row of a floor to read them against: as many real digits per class as
    there are samples (drawn with ``seed``), through the same two metrics.
    """
    if labels is None or not _is_digits(model):
        return (lambda _samples: {"class_accuracy": "", "frechet_distance": ""}), None
    images, classes = real_digits()
    real = features(images)

    def judge(pictures: np.ndarray, wanted: np.ndarray) -> Row:
        return {"class_accuracy": float(np.mean(classify(pictures) == wanted)),
                "frechet_distance": frechet_distance(features(pictures), real)}

    rng = np.random.default_rng(seed)
    drawn = np.concatenate([rng.choice(np.flatnonzero(classes == c), size=int(np.sum(labels == c)), replace=False)
                            for c in np.unique(labels)])
    floor = {"split": "real digits", "n_devices": "", **judge(images[drawn], classes[drawn]),
             "note": f"{len(drawn)} real digits (same classes) against all {len(images)}: the metrics' floor"}
    return (lambda samples: judge(samples[..., 0] * 2 - 1, labels)), floor
