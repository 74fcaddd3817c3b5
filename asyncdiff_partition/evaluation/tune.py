"""Search N, S, W and the cut slack for a latency or fidelity target: the ``tune`` command.

Example::

    result = tune("digits", devices=2, max_fd_ratio=1.5, steps=20, out_dir="out/tune")
    result.chosen["n_devices"], result.paths["plan"]       # the plan file to `run`

Note [what tune scores]
~~~~~~~~~~~~~~~~~~~~~~~
One :class:`~asyncdiff_partition.evaluation.evaluate.FidelityBench` (a small calibration batch,
its sequential samples and a profile taken here) is calibrated for staleness (fx/staleness.py);
then every configuration with world size N + S - 1 <= the device count -- N, S, W and the cut's
latency slack (0: the latency-optimal split; > 0: the least stale split within that slack,
core/partition.py) -- is planned and scored:

* latency: the plan's predicted end-to-end denoising time, T x sequential step / predicted
  speedup (the cost model of core/plan.py, from the profile; nothing is timed per configuration);
* fidelity: its samples from the reference schedule (the runtime's exact oracle) against the
  sequential ones: PSNR, SSIM, relative L2; on the digits model also class accuracy and the
  Fréchet distance over the sequential one (``fd_ratio``). A stride-1 configuration reads its
  stale values extrapolated with the λ that gives the least relative L2 on this batch
  (``extrapolation``; Note [extrapolation] in runtime/extrapolation.py), which costs no latency.

The Pareto front (no other configuration is at least as fast and at least as faithful, and
better in one) is marked in the table and the plot. The chosen configuration is the most
faithful one within ``max_latency_ms``, or the fastest one with ``psnr_db >= min_psnr`` or
``fd_ratio <= max_fd_ratio``; with no target, the fastest one (ties: the more faithful). The
batch-parallel degree B is not searched yet: ``eval --batch-parallel`` scores hybrid plans, and
``plan --profile-sliced`` picks B by predicted latency within a stale-hop budget.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.files import write_atomic
from asyncdiff_partition.evaluation.evaluate import FidelityBench

__all__ = ["TUNE_COLUMNS", "TuneError", "TuneResult", "pareto_front", "tune"]

Row = dict[str, Any]

TUNE_COLUMNS = ("n_devices", "stride", "warmup", "latency_slack", "extrapolation", "world_size", "boundaries", "latency_ms",
                "predicted_speedup", "staleness", "psnr_db", "ssim", "relative_l2", "class_accuracy",
                "frechet_distance", "fd_ratio", "pareto", "chosen")


class TuneError(AsyncDiffError, ValueError):
    """Bad tune settings, or no configuration meets the target."""


@dataclass
class TuneResult:
    """What :func:`tune` scored and wrote: one row per configuration, the chosen one, the files."""

    rows: list[Row]
    chosen: Row
    plan: Any
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)


def tune(
    model_spec: str | None = None,
    *,
    devices: int,
    max_latency_ms: float | None = None,
    min_psnr: float | None = None,
    max_fd_ratio: float | None = None,
    steps: int = 20,
    images: int = 1,
    seed: int = 0,
    guidance: float = 2.0,
    strides: Sequence[int] = (1, 2),
    warmups: Sequence[int] = (1,),
    slacks: Sequence[float] = (0.0, 0.03, 0.1),
    out_dir: str | Path | None = None,
    profile_repeats: int = 2,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> TuneResult:
    """Score every configuration that fits ``devices`` and pick one for the target (Note [what tune scores]).

    Args:
        model_spec: zoo name or local diffusers directory (default: the bundled model).
        devices: D, the devices (ranks) available; configurations need N + S - 1 <= D.
        max_latency_ms, min_psnr, max_fd_ratio: the target, at most one (``max_fd_ratio``:
            digits model only).
        steps, images, seed, guidance: the calibration batch (as for ``eval``).
        strides, warmups, slacks: the values of S, W and latency slack searched.
        out_dir: where ``tune.csv``, ``tune.md``, ``tune.png``, ``profile.json`` (calibrated)
            and ``plan.json`` (the chosen one) go.
        profile_repeats: timed runs of the profile the plans are made from.
        progress: show progress bars (tqdm) for the calibration and the configurations.
        echo: summary lines go here; None for silence.

    Raises:
        TuneError: bad settings, two targets, or no configuration meets the target (the
            table and plot are written first).
    """
    from tqdm import tqdm

    targets = {k: v for k, v in (("max_latency_ms", max_latency_ms), ("min_psnr", min_psnr),
                                 ("max_fd_ratio", max_fd_ratio)) if v is not None}
    if len(targets) > 1:
        raise TuneError(f"give at most one target, got {', '.join(f'{k}={v}' for k, v in targets.items())}")
    if devices < 1 or steps < 2 or images < 1:
        raise TuneError(f"need devices >= 1, steps >= 2 and images >= 1, got {devices}, {steps}, {images}")
    if any(s not in (1, 2) for s in strides) or any(w < 0 for w in warmups) or any(
            not 0 <= x < math.inf for x in slacks):
        raise TuneError(f"strides must be 1 or 2, warmups >= 0 and slacks finite >= 0; got {list(strides)}, "
                        f"{list(warmups)}, {list(slacks)}")
    say = echo or (lambda _line: None)
    bench = FidelityBench(model_spec, steps=steps, images=images, seed=seed, guidance=guidance,
                          profile_repeats=profile_repeats, command="asyncdiff-partition tune")
    if max_fd_ratio is not None and bench.real_row is None:
        raise TuneError(f"--max-fd-ratio needs the digits model's classifier; {bench.name!r} has none: "
                        f"use --min-psnr or --max-latency-ms")
    say(f"tune {bench.name} for {devices} device(s): {bench.describe()}")
    bench.calibrate(progress=progress)
    configs = [(1, 1, warmups[0], 0.0)] + [(n, s, w, x) for n in range(2, devices + 1) for s in strides
                                           for w in warmups for x in slacks if n + s - 1 <= devices]
    rows = [_score(bench, *config) for config in tqdm(configs, desc="configurations", unit="config",
                                                      disable=not progress)]
    key = "fd_ratio" if max_fd_ratio is not None else "psnr_db"
    for i in pareto_front([(r["latency_ms"], _loss(r, key)) for r in rows]):
        rows[i]["pareto"] = True
    chosen = _choose(rows, key, targets)
    if chosen is not None:
        chosen["chosen"] = True
    markdown = _markdown(bench, rows, key, targets)
    paths = {} if out_dir is None else _write(Path(out_dir), bench, rows, key, markdown)
    if chosen is None:
        best = min(rows, key=lambda r: (r["latency_ms"], _loss(r, key)))
        raise TuneError(f"no configuration for {devices} device(s) meets {_target_text(targets)}: the fastest is "
                        f"{best['latency_ms']:.1f} ms predicted (N={best['n_devices']} S={best['stride']}); raise "
                        f"the target or add devices (table in {paths.get('markdown', 'the result')})")
    plan = bench.plan(chosen["n_devices"], stride=chosen["stride"], warmup=max(chosen["warmup"], 1),
                      latency_slack=chosen["latency_slack"], extrapolation=chosen["extrapolation"],
                      profile_path=str(paths.get("profile", "")))
    if out_dir is not None:
        paths["plan"] = plan.save(Path(out_dir) / "plan.json")
    say(markdown)
    fd = f", FD ratio {chosen['fd_ratio']:.2f}" if chosen["fd_ratio"] != "" else ""
    say(f"chosen: N={chosen['n_devices']} S={chosen['stride']} W={chosen['warmup']} slack {chosen['latency_slack']:g} "
        f"λ {chosen['extrapolation']:g}"
        f" -> {chosen['latency_ms']:.1f} ms predicted ({chosen['predicted_speedup']:.2f}x), PSNR "
        f"{_cell(chosen['psnr_db'])} dB{fd}")
    if paths:
        say("wrote " + ", ".join(str(p) for p in paths.values()))
    return TuneResult(rows, chosen, plan, markdown, paths)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates are costs: lower is better).

    Of equal points only the first is kept.

    Example:
        >>> pareto_front([(1, 5), (2, 3), (2, 4), (3, 3), (1, 5)])
        [0, 1]
    """
    front = []
    for i, (a, b) in enumerate(points):
        beaten = any((c <= a and d <= b and (c, d) != (a, b)) or ((c, d) == (a, b) and j < i)
                     for j, (c, d) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def _score(bench: FidelityBench, n: int, stride: int, warmup: int, slack: float) -> Row:
    plan = bench.plan(n, stride=stride, warmup=max(warmup, 1), latency_slack=slack)
    factor = 0.0
    if n == 1:
        judged = {k: bench.sequential[k] for k in ("psnr_db", "ssim", "relative_l2", "class_accuracy",
                                                  "frechet_distance")}
    else:
        if stride == 1:
            factor = bench.choose_extrapolation(bench, plan.boundaries, warmup=max(warmup, 1))
        judged = bench.judge(plan.boundaries, stride, warmup, factor)
    fd, base = judged.get("frechet_distance", ""), bench.sequential.get("frechet_distance", "")
    return {"n_devices": n, "stride": stride, "warmup": warmup, "latency_slack": slack, "extrapolation": factor,
            "world_size": plan.world_size, "boundaries": ", ".join(s.first_module for s in plan.segments[1:]) or "-",
            "latency_ms": bench.steps * plan.predicted["sequential_step_ms"] / plan.predicted["speedup"],
            "predicted_speedup": plan.predicted["speedup"], "staleness": plan.predicted.get("staleness", 0.0),
            **judged, "fd_ratio": fd / base if fd != "" and base else "", "pareto": False, "chosen": False}


def _loss(row: Row, key: str) -> float:
    """Fidelity as a cost (lower is better): -PSNR (identical samples: -inf) or the FD ratio."""
    return -row["psnr_db"] if key == "psnr_db" else row["fd_ratio"]


def _choose(rows: list[Row], key: str, targets: dict[str, float]) -> Row | None:
    if "max_latency_ms" in targets:
        ok = [r for r in rows if r["latency_ms"] <= targets["max_latency_ms"]]
        return min(ok, key=lambda r: (_loss(r, key), r["latency_ms"]), default=None)
    if "min_psnr" in targets:
        ok = [r for r in rows if r["psnr_db"] >= targets["min_psnr"]]
    elif "max_fd_ratio" in targets:
        ok = [r for r in rows if r["fd_ratio"] <= targets["max_fd_ratio"]]
    else:
        ok = rows
    return min(ok, key=lambda r: (r["latency_ms"], _loss(r, key)), default=None)


def _target_text(targets: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in targets.items()) or "no target (the fastest)"


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _markdown(bench: FidelityBench, rows: list[Row], key: str, targets: dict[str, float]) -> str:
    header = ["N", "S", "W", "slack", "λ", "world", "boundaries", "latency ms", "speedup", "PSNR dB", "SSIM", "rel. L2"]
    digits = bench.real_row is not None
    header += ["class acc.", "FD ratio"] if digits else []
    header += ["Pareto", "chosen"]
    lines = [f"### tune {bench.name}: {bench.describe()}; target: {_target_text(targets)}; front on {key}", "",
             "latency: predicted by the cost model from the profile; fidelity: reference schedule against the "
             "sequential samples of the same batch.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: r["latency_ms"]):
        cells = [r["n_devices"], r["stride"], r["warmup"], f"{100 * r['latency_slack']:g}%", f"{r['extrapolation']:g}",
                 r["world_size"],
                 r["boundaries"], f"{r['latency_ms']:.1f}", f"{r['predicted_speedup']:.2f}x", _cell(r["psnr_db"]),
                 f"{r['ssim']:.4f}", f"{r['relative_l2']:.4f}"]
        cells += [_cell(r["class_accuracy"]), _cell(r["fd_ratio"])] if digits else []
        cells += [_cell(r["pareto"]), "**yes**" if r["chosen"] else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, bench: FidelityBench, rows: list[Row], key: str, markdown: str) -> dict[str, Path]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TUNE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    png = io.BytesIO()
    _plot(bench.name, rows, key, png)
    return {"csv": write_atomic(out / "tune.csv", text),
            "markdown": write_atomic(out / "tune.md", markdown),
            "plot": write_atomic(out / "tune.png", png.getvalue()),
            "profile": bench.profile.save(out / "profile.json")}


def _plot(name: str, rows: list[Row], key: str, handle: Any) -> None:
    """Fidelity against predicted latency, one point per configuration, the front joined, the choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r[key] for r in rows if math.isfinite(r[key])]
    cap = (max(finite) + 3 if key == "psnr_db" else 0) if finite else 0.0
    y = {id(r): cap if key == "psnr_db" and math.isinf(r[key]) else r[key] for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n in sorted({r["n_devices"] for r in rows}):
        points = [r for r in rows if r["n_devices"] == n]
        for stride, marker in ((1, "o"), (2, "s")):
            chosen_points = [r for r in points if r["stride"] == stride]
            if chosen_points:
                ax.scatter([r["latency_ms"] for r in chosen_points], [y[id(r)] for r in chosen_points], marker=marker,
                           s=26, label=f"N={n} S={stride}" if n > 1 else "sequential", zorder=2)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [y[id(r)] for r in front], color="grey", lw=0.8, ls="--",
            label="Pareto front", zorder=1)
    for r in rows:
        if r["chosen"]:
            ax.scatter([r["latency_ms"]], [y[id(r)]], marker="*", s=260, facecolors="none", edgecolors="red",
                       linewidths=1.5, label="chosen", zorder=3)
        if r["pareto"]:
            ax.annotate(f"N{r['n_devices']}S{r['stride']}W{r['warmup']} +{100 * r['latency_slack']:g}%",
                        (r["latency_ms"], y[id(r)]), fontsize=6, alpha=0.8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("predicted latency of the denoising loop (ms)")
    ax.set_ylabel("PSNR vs sequential (dB; identical drawn on top)" if key == "psnr_db"
                  else "Fréchet distance / sequential")
    ax.set_title(f"tune {name}: fidelity against latency", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
