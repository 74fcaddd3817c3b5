"""Worker entry point of tests/test_hybrid.py: a module-level function that spawn can find."""

from __future__ import annotations

import pickle
from typing import Any

import torch
from _dist_worker import sample

from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.hybrid import HybridDenoiser, segment_for_hybrid_rank


def run_hybrid(blobs: dict[str, bytes], feed: dict[str, torch.Tensor], jobs: list[dict[str, Any]],
               timesteps: list[int]) -> dict[str, Any]:
    """Per job and case: one HybridDenoiser, one sampling run on the full-batch ``feed``; ε of every
    step, the phase report and the per-step report. A job with ``batch`` records the error a batch
    that does not split raises."""
    torch.set_num_threads(1)
    comm.init()
    out: dict[str, Any] = {}
    for job in jobs:
        captured = pickle.loads(blobs[job["model"]])
        latent = captured.latent.name
        plan = job["plan"]
        segment = segment_for_hybrid_rank(ready_segments(captured, plan, world_size=comm.world_size()), plan)
        denoiser = HybridDenoiser(segment, plan, input_names=[s.name for s in captured.inputs], latent=latent,
                                  warmup=1)  # set-up once per job
        for i, case in enumerate(job["cases"]):
            denoiser.phases = case.get("phases")
            if job.get("batch"):
                bad = {k: v[: job["batch"]] if v.dim() else v for k, v in feed.items()}
                denoiser.reset(timesteps)
                try:
                    sample(denoiser, bad, latent, timesteps)
                except ValueError as error:
                    out[job["key"]] = f"{type(error).__name__}: {error}"
                continue
            eps, x = sample(denoiser, feed, latent, timesteps)
            out[f"{job['key']} case {i}"] = {"eps": eps, "x": x, "phases": denoiser.phase_report(),
                                             "report": denoiser.report()}
    comm.barrier("done")
    return out
