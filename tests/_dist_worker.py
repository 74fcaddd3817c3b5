"""Worker entry points of tests/test_runtime.py: module-level functions that spawn can find."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
import weakref
from typing import Any

import torch

from asyncdiff_partition.core.schedule import slot_segment
from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.runtime import comm
from asyncdiff_partition.runtime.denoiser import AsyncDenoiser, segment_for_rank


class ChunkNet(torch.nn.Module):
    """A cut right after ``torch.chunk`` sends a tuple of tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.t = torch.nn.Linear(8, 8), torch.nn.Linear(4, 4), torch.nn.Linear(1, 4)

    def forward(self, sample, timestep):
        parts = torch.chunk(self.a(sample), 2, dim=-1)
        return torch.cat([self.b(parts[0]) * parts[1] + self.t(timestep.float()[:, None])] * 2, dim=-1)


def sample(denoiser, feed: dict[str, torch.Tensor], latent: str, timesteps: list[int]):
    """The test's denoising loop: x <- x - 0.1 eps (learned-sigma channels dropped); (eps list, x)."""
    x = feed[latent].clone()
    denoiser.reset(timesteps)
    history = []
    for t in timesteps:
        inputs = dict(feed, **{latent: x, "timestep": torch.full_like(feed["timestep"], t)})
        eps = denoiser(inputs)
        history.append(eps.clone())
        x = x - 0.1 * eps[:, : x.shape[1]]
    return history, x


def make_denoiser(captured, plan, **options) -> AsyncDenoiser:
    """This rank compiles the plan itself (as under an outside torchrun) and keeps its segment."""
    segment = segment_for_rank(ready_segments(captured, plan, world_size=comm.world_size()))
    return AsyncDenoiser(segment, plan, input_names=[s.name for s in captured.inputs], latent=captured.latent.name,
                         example=dict(zip((s.name for s in captured.inputs), captured.example)), **options)


def alive_bytes(refs: list[weakref.ref]) -> int:
    """Bytes of the tensors behind ``refs`` that are still alive (shared storage once)."""
    gc.collect()
    storages = {}
    for ref in refs:
        t = ref()
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def run_jobs(blobs: dict[str, bytes], jobs: list[dict[str, Any]], timesteps: list[int]) -> dict[str, Any]:
    """Per job: build one AsyncDenoiser (from a fresh copy of the captured model), measure how much
    of the model's weights stay alive once the copy is dropped, then sample once per case.
    Jobs with "expect_error" record the message a bad plan raises; a job may give rank 1 a
    plan of its own ("plan_rank1")."""
    torch.set_num_threads(1)
    rank, _, _ = comm.init()
    out: dict[str, Any] = {}
    for job in jobs:
        captured = pickle.loads(blobs[job["model"]])
        if job.get("expect_error"):
            try:
                make_denoiser(captured, job["plan"] if rank != 1 else job.get("plan_rank1", job["plan"]))
            except ValueError as error:
                out[job["key"]] = f"{type(error).__name__}: {error}"
            else:
                out[job["key"]] = "no error"
            continue
        feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
        latent = captured.latent.name
        gm = captured.graph_module
        weights = [weakref.ref(t) for t in [*gm.parameters(), *gm.buffers()]]
        full = alive_bytes(weights)
        denoiser = make_denoiser(captured, job["plan"])
        del captured, gm
        kept = alive_bytes(weights)  # what of the model this rank still holds
        runs = []
        for case in job["cases"]:
            denoiser.warmup, denoiser.time_shift = case["warmup"], case["time_shift"]
            denoiser.extrapolation = case.get("extrapolation", 0.0)  # like warmup, takes effect at reset
            eps, x = sample(denoiser, feed, latent, timesteps)
            runs.append({"case": case, "eps": eps, "x": x, "report": denoiser.report(), "spans": denoiser.spans()})
        segment = slot_segment(rank, job["plan"].n_devices)
        out[job["key"]] = {"rank": rank, "segment": segment, "resident_full": full, "resident": kept, "runs": runs}
        del denoiser
    return out


def fail_at(blob: bytes, plan, timesteps: list[int], rank_to_fail: int, step_to_fail: int, how: str = "raise") -> None:
    """Sample, with rank ``rank_to_fail``'s segment failing at step ``step_to_fail``: it raises,
    hangs (``how="hang"``) or its process is killed (``how="kill"``, SIGKILL: no clean-up)."""
    torch.set_num_threads(1)
    rank, _, _ = comm.init()
    captured = pickle.loads(blob)
    feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    denoiser = make_denoiser(captured, plan)
    if rank == rank_to_fail:
        module, calls = denoiser._segment.module, []

        def failing(*args):
            calls.append(1)
            if len(calls) > step_to_fail:
                if how == "hang":
                    time.sleep(600)
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure in segment {denoiser._segment.index}")
            return module(*args)

        denoiser._segment.module = failing
    sample(denoiser, feed, captured.latent.name, timesteps)


class Unloadable:
    """Pickles fine, fails to unpickle: a worker that dies before its entry point runs."""

    def __reduce__(self):
        return _refuse, ("this argument cannot be loaded in a worker",)


def _refuse(message: str):
    raise RuntimeError(message)
