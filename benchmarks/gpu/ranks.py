"""One rank of the device check's step 3: its shipped segment on the device, the schedule run, memory measured.

Kept in a module of its own so that spawned ranks import it by name (``check.py`` puts this
folder on ``sys.path``, which spawn hands to its children).
"""

from __future__ import annotations

import gc
from typing import Any

import torch


def run_rank(shipped: Any, plan: Any, device: str, feed: dict[str, torch.Tensor], timesteps: list[int],
             warmup: int, timeout_s: float) -> dict[str, Any]:
    """Join the group (gloo; staged through host memory when ``device`` is CUDA), load this rank's
    segment file, move it to ``device`` keeping stand-ins small, run the loop; figures back on CPU."""
    from asyncdiff_partition.core.schedule import slot_segment
    from asyncdiff_partition.fx.device_move import move_captured
    from asyncdiff_partition.runtime import comm
    from asyncdiff_partition.runtime.denoiser import AsyncDenoiser

    rank, _, dev = comm.init(backend="gloo", device=device, timeout_s=timeout_s)
    cuda = dev.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        segment, captured = shipped.load(slot_segment(rank, plan.n_devices))  # the segment and its shell
        real_bytes = move_captured(captured, dev)
        latent = captured.latent.name
        denoiser = AsyncDenoiser(segment, plan, input_names=[s.name for s in captured.inputs], latent=latent,
                                 warmup=warmup, timeout_s=timeout_s)
        module = denoiser._segment.module
        segment_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                            [*module.parameters(), *module.buffers()]}.values())
        del captured, segment
        gc.collect()
        setup = {"allocated": int(torch.cuda.memory_allocated(dev)), "peak": int(torch.cuda.max_memory_allocated(dev))} \
            if cuda else {}
        history, x = sample(denoiser, {k: v.to(dev) for k, v in feed.items()}, latent, timesteps)
        memory = {"segment_param_bytes": segment_bytes, "real_bytes_after_move": real_bytes, "staged": comm._state["staged"]}
        if cuda:
            memory.update(setup_allocated=setup["allocated"], setup_peak=setup["peak"],
                          run_peak=int(torch.cuda.max_memory_allocated(dev)))
        report = denoiser.report()
        return {"rank": rank, "eps": [e.cpu() for e in history], "x": x.cpu(), "memory": memory,
                "compute_ms": [r["compute_ms"] for r in report], "comm_ms": [r["comm_ms"] for r in report],
                "wait_ms": [r["wait_ms"] for r in report]}
    finally:
        comm.shutdown()


def sample(denoiser: Any, feed: dict[str, torch.Tensor], latent: str, timesteps: list[int]) -> tuple[list, Any]:
    """The check's loop: DDIM over ``timesteps`` (same in every rank and the reference); (eps list, x)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(len(timesteps))
    assert [int(t) for t in scheduler.timesteps] == list(timesteps), (scheduler.timesteps, timesteps)
    x = feed[latent].clone()
    denoiser.reset(list(timesteps))
    history = []
    with torch.no_grad():
        for t in timesteps:
            inputs = dict(feed, **{latent: x, "timestep": torch.full_like(feed["timestep"], t)})
            eps = denoiser(inputs)
            history.append(eps.clone())
            x = scheduler.step(eps[:, : x.shape[1]], t, x).prev_sample
    return history, x
