"""Fidelity tables and plots: :func:`~asyncdiff_partition.evaluation.evaluate.evaluate`'s rows as CSV, markdown and PNG.

Example::

    paths = write_fidelity("out/eval", rows, format_markdown(rows, title="digits, T=20"))
    paths["plot"]                    # fidelity.png: PSNR, SSIM (, accuracy, Fréchet) vs speedup

A row is a dict with the keys of :data:`COLUMNS`; a configuration that could not run has only
``split``, ``n_devices`` (and maybe ``stride``, ``warmup``) and a ``note``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.files import write_atomic

__all__ = ["COLUMNS", "ORACLE_NOTE", "STYLES", "describe_row", "format_markdown", "split_label", "write_fidelity"]

Row = dict[str, Any]

COLUMNS = ("model", "split", "latency_slack", "extrapolation", "n_devices", "stride", "warmup", "world_size", "steps", "samples",
           "boundaries", "staleness", "psnr_db", "ssim", "relative_l2", "predicted_speedup", "ideal_speedup",
           "imbalance", "class_accuracy", "frechet_distance", "note")

STYLES = {"sequential": ("k", "*"), "auto": ("tab:blue", "o"), "hand": ("tab:orange", "s"),
          "fidelity": ("tab:green", "D")}

ORACLE_NOTE = ("asynchronous samples computed in one process by ReferenceSchedule, the exact oracle of the "
               "distributed runtime (tested equal to it), so no processes were started")


def split_label(row: Row) -> str:
    """``fidelity (+3%, λ 0.5)`` for a fidelity-aware row (slack, extrapolation), else the split's name."""
    slack, factor = row.get("latency_slack"), row.get("extrapolation")
    if row["split"] != "fidelity" or not isinstance(slack, float):
        return str(row["split"])
    return f"fidelity (+{100 * slack:g}%" + (f", λ {factor:g})" if isinstance(factor, float) and factor else ")")


def _cell(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def describe_row(row: Row) -> str:
    """One progress line for a row."""
    if row["split"] == "real digits":
        return (f"real digits: accuracy {row['class_accuracy']:.3f}, FD {row['frechet_distance']:.2f} "
                f"({row['note']})")
    if "psnr_db" not in row:
        return f"{row['split']} N={row['n_devices']} S={row.get('stride')} W={row.get('warmup')}: {row['note']}"
    extra = "" if row.get("class_accuracy") in ("", None) else (
        f", accuracy {row['class_accuracy']:.3f}, FD {row['frechet_distance']:.2f}")
    return (f"{split_label(row):<5} N={row['n_devices']} S={row['stride']} W={row['warmup']}: PSNR "
            f"{_cell(row['psnr_db'])} dB, SSIM {row['ssim']:.4f}, predicted {row['predicted_speedup']:.2f}x "
            f"(ideal {row['ideal_speedup']:.2f}x){extra}")


def format_markdown(rows: Sequence[Row], *, title: str = "Fidelity of asynchronous denoising") -> str:
    """The rows as a markdown table under ``title`` and the note on how they were computed."""
    header = ["split", "N", "S", "W", "world", "boundaries", "PSNR dB", "SSIM", "predicted", "ideal",
              "class acc.", "Fréchet"]
    note = f"PSNR / SSIM: each asynchronous sample against its sequential one (mean); {ORACLE_NOTE}."
    lines = [f"### {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "psnr_db" not in r:
            cells = [split_label(r), r["n_devices"], r.get("stride", ""), r.get("warmup", ""), "", r["note"]] + [""] * 4
            cells += [_cell(r.get("class_accuracy"), 3), _cell(r.get("frechet_distance"), 2)]
        else:
            cells = [split_label(r), r["n_devices"], r["stride"], r["warmup"], r["world_size"], r["boundaries"] or "-",
                     _cell(r["psnr_db"]), _cell(r["ssim"], 4), f"{_cell(r['predicted_speedup'])}x",
                     f"{_cell(r['ideal_speedup'])}x", _cell(r.get("class_accuracy"), 3),
                     _cell(r.get("frechet_distance"), 2)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    return buffer.getvalue()


def write_fidelity(out: str | Path, rows: Sequence[Row], markdown: str) -> dict[str, Path]:
    """Write ``fidelity.csv``, ``fidelity.md`` and ``fidelity.png`` into ``out`` (each atomically)."""
    out = Path(out)
    text = _csv_text(rows)
    return {"csv": write_atomic(out / "fidelity.csv", text),
            "markdown": write_atomic(out / "fidelity.md", markdown),
            "plot": write_atomic(out / "fidelity.png", _plot(rows))}


def _plot(rows: Sequence[Row]) -> bytes:
    """PSNR, SSIM (and for digits class accuracy and Fréchet distance) against predicted speedup, as PNG."""
    import matplotlib  # heavy (about a second): only `eval` pays for it, not the import of this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    done = [r for r in rows if "psnr_db" in r]
    panels = [("psnr_db", "PSNR vs sequential (dB)"), ("ssim", "SSIM vs sequential")]
    if any(r.get("class_accuracy") not in ("", None) for r in done):
        panels += [("class_accuracy", "class accuracy"), ("frechet_distance", "Fréchet distance to real digits")]
    finite = [r["psnr_db"] for r in done if math.isfinite(r["psnr_db"])]
    cap = (max(finite) if finite else 0.0) + 5.0  # identical samples (inf dB) drawn above the rest
    columns = min(2, len(panels))
    rows_n = (len(panels) + columns - 1) // columns
    fig, grid = plt.subplots(rows_n, columns, figsize=(5.0 * columns, 3.8 * rows_n), squeeze=False)
    axes = [list(grid.flat)]
    floor = next((r for r in rows if r["split"] == "real digits"), None)
    for ax, (key, label) in zip(axes[0], panels):
        for split, (color, marker) in STYLES.items():
            points = [r for r in done if r["split"] == split]
            ys = [cap if key == "psnr_db" and math.isinf(r[key]) else r[key] for r in points]
            ax.scatter([r["predicted_speedup"] for r in points], ys, c=color, marker=marker, label=split,
                       s=60 if split == "sequential" else 28, zorder=3 if split == "sequential" else 2)
            if split == "sequential" and key in ("class_accuracy", "frechet_distance") and ys:
                ax.axhline(ys[0], color="k", lw=0.6, ls="--", zorder=1)  # the baseline to stay near
            for r, y in zip(points, ys):
                twin = r["warmup"] == 0 and any(o["warmup"] == 1 and (o["n_devices"], o["stride"]) ==
                                                (r["n_devices"], r["stride"]) for o in points)
                if split != "sequential" and not twin:  # W = 0 runs as W = 1: one label for both
                    ax.annotate(f"N{r['n_devices']}S{r['stride']}W{r['warmup']}", (r["predicted_speedup"], y),
                                fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        if floor is not None and key in ("class_accuracy", "frechet_distance"):
            ax.axhline(floor[key], color="tab:green", lw=0.8, ls=":", zorder=1, label="real digits")
        if key == "psnr_db" and len(finite) < len(done):
            ax.axhline(cap, color="grey", lw=0.5, ls=":")
            ax.text(0.02, cap, " identical (inf)", fontsize=6, va="bottom", transform=ax.get_yaxis_transform())
        ax.set_xlabel("predicted speedup (x)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[0][:1] + axes[0][2:3]:
        ax.legend(fontsize=7)
    fig.suptitle(f"{done[0]['model']}: fidelity vs speedup, T={done[0]['steps']}" if done else "fidelity", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
