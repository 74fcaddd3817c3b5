"""The demo: the whole job on the bundled digits model, sequential beside asynchronous, on this machine's CPU.

Example::

    run_demo("out/demo")          # what `asyncdiff-partition demo` (and `make demo`) runs
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from asyncdiff_partition.app.api import capture_spec
from asyncdiff_partition.app.job import RunConfig, run_plan
from asyncdiff_partition.core.files import write_atomic
from asyncdiff_partition.core.plan import format_plan, ideal_speedup, make_plan
from asyncdiff_partition.core.summary import format_bytes, format_summary, summarize_model
from asyncdiff_partition.evaluation.metrics import psnr, ssim
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.pipelines import zoo
from asyncdiff_partition.pipelines.digits import NUM_CLASSES

__all__ = ["run_demo"]


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 20, guidance: float = 2.0,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The main job on the bundled digits model, end to end on this machine's CPU cores.

    capture -> op graph -> profile -> plan for 2 devices -> the plan run asynchronously on 2
    processes, and the same seeds run sequentially (the unsplit schedule: warm-up = all steps),
    one sample of every digit 0-9 (the denoiser sees 20 images: conditional + unconditional).
    Writes the profile, the plan, both runs' images and reports, and ``comparison.png`` (the
    sequential and asynchronous samples side by side, per digit); prints latency, speedup,
    ideal speedup and fidelity (PSNR and SSIM of each asynchronous sample against its
    sequential one).

    Example:
        >>> run_demo("out/demo")  # doctest: +SKIP

    Returns:
        Paths of what was written and the measured figures.
    """
    torch.set_num_threads(1)  # on CPU one thread stands for one device
    out = Path(out_dir)
    name = zoo.DEFAULT_MODEL
    echo(f"asyncdiff-partition demo: the bundled '{name}' model (a class-conditional UNet trained on "
         "scikit-learn's digits), CPU, 1 thread per device\n")
    _, captured = capture_spec(name, batch=2 * NUM_CLASSES)  # one image per digit, cond + uncond
    echo(format_summary(summarize_model(captured, build_op_graph(captured), model_name=name)))
    profiled = profile_model(captured, model_name=name, repeats=5, command="asyncdiff-partition demo")
    profile_path = profiled.save(out / f"{name}.cpu-1t.profile.json")
    echo(f"\nprofile: {len(profiled.costs)} nodes, eager {profiled.eager_ms['median']:.1f} ms, "
         f"sum of node medians {profiled.node_ms_sum:.1f} ms\n")
    planned = make_plan(profiled, 2, steps=steps, profile_path=str(profile_path))
    plan_path = planned.save(out / "plan-2.json")
    echo(format_plan(planned, title="plan for 2 devices"))
    common: dict[str, Any] = dict(model=None, plan=str(plan_path), steps=steps, guidance=guidance, progress=False)
    runs = {
        "sequential": run_plan(RunConfig(**common, warmup=steps, reference=True, out_dir=str(out / "sequential"))),
        "async": run_plan(RunConfig(**common, threads=1, out_dir=str(out / "async"))),
    }
    seq, asy = ([np.asarray(Image.open(p), dtype=np.float64) / 255.0 for p in runs[k]["images"]] for k in runs)
    fidelity = [(psnr(a, s), ssim(a, s)) for s, a in zip(seq, asy)]
    comparison = _comparison_png(out / "comparison.png", seq, asy, fidelity)
    warmup = planned.warmup
    rows = [("sequential, 1 process", runs["sequential"], None),
            ("asynchronous, 2 processes", runs["async"], ideal_speedup(steps, warmup, 2, 1))]
    echo(f"\n{steps} DDIM steps, guidance {guidance}, warm-up {warmup}; latency = the sampling call "
         "(denoising loop), step = median denoiser step")
    echo(f"{'run':<27}{'latency':>9}{'step':>10}{'speedup':>9}{'ideal':>8}{'plan':>8}")
    base = runs["sequential"]["wall_s"]
    for label, result, ideal in rows:
        step_ms = result["summary"]["step_ms"]["median"]
        extra = f"{ideal:>7.2f}x{planned.predicted['speedup']:>7.2f}x" if ideal else ""
        echo(f"{label:<27}{result['wall_s']:>8.2f}s{step_ms:>8.1f}ms{base / result['wall_s']:>8.2f}x{extra}")
    ranks = "; ".join(f"rank {r['rank']} compute {r['compute_ms']:.1f}, communication {r['comm_ms']:.1f}, "
                      f"wait {r['wait_ms']:.1f}" for r in runs["async"]["summary"]["per_rank"])
    sent = runs["async"]["summary"]["bytes_sent_per_step"]["median"]
    echo(f"asynchronous step, median ms: {ranks}; {format_bytes(int(sent))} sent per step")
    psnrs, ssims = [p for p, _ in fidelity], [s for _, s in fidelity]
    echo("\nfidelity, asynchronous vs sequential sample of each digit")
    echo("digit   " + "".join(f"{d:>7}" for d in range(len(fidelity))) + "   mean")
    echo("PSNR dB " + "".join(f"{p:>7.1f}" for p in psnrs) + f"{_mean(psnrs):>7.1f}")
    echo("SSIM    " + "".join(f"{s:>7.3f}" for s in ssims) + f"{_mean(ssims):>7.3f}")
    echo(f"\nwrote {comparison} (sequential above, asynchronous below), {profile_path}, {plan_path}, "
         f"{out / 'sequential'}/ and {out / 'async'}/ (images and report.json)")
    return {"profile": str(profile_path), "plan": str(plan_path), "comparison": str(comparison), "runs": runs,
            "psnr": psnrs, "ssim": ssims, "speedup": base / runs["async"]["wall_s"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")  # inf when a PSNR is (identical images)


def _comparison_png(path: Path, top: list[Any], bottom: list[Any], fidelity: list[tuple[float, float]],
                    *, scale: int = 8) -> Path:
    """Two labelled rows of images in [0, 1] (sequential above, asynchronous below), one column per digit."""
    try:
        font: Any = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    side, gap, left, head, foot = top[0].shape[0] * scale, 6, 120, 24, 40
    width = left + len(top) * (side + gap)
    sheet = Image.new("RGB", (width, head + 2 * (side + gap) + foot), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate((("sequential", top), ("asynchronous", bottom))):
        y = head + row * (side + gap)
        draw.text((6, y + side // 2 - 8), label, fill="black", font=font)
        for col, image in enumerate(images):
            tile = Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"))
            sheet.paste(tile.resize((side, side), Image.Resampling.NEAREST).convert("RGB"), (left + col * (side + gap), y))
    for col, (p, s) in enumerate(fidelity):
        x = left + col * (side + gap)
        draw.text((x + side // 2 - 4, 4), str(col), fill="black", font=font)
        draw.text((x, head + 2 * (side + gap)), f"{p:.1f} dB", fill="black", font=font)
        draw.text((x, head + 2 * (side + gap) + 18), f"SSIM {s:.3f}", fill="black", font=font)
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    return write_atomic(path, png.getvalue())
