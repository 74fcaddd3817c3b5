"""The public names are enough: capture, profile, plan, finished segments, the reference and 2 ranks.

Only ``from asyncdiff_partition import ...`` is used (and a diffusers scheduler): a small network of
our own is captured, profiled and planned; its ready segments run as the reference schedule (W >= T:
the model exactly) and on 2 ranks started by ``launch`` (equal to the reference at W = 1).
"""

from __future__ import annotations

import torch

import asyncdiff_partition as api
from asyncdiff_partition import (
    AsyncDenoiser,
    ReferenceSchedule,
    capture_model,
    denoise,
    launch,
    make_plan,
    profile_model,
    ready_segments,
)

STEPS = 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1), \
            torch.nn.Conv2d(16, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)

    def forward(self, x, t):
        h = torch.relu(self.inp(x)) + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        return self.out(torch.relu(self.mid(h)) + h)


def _example():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999, 999])


def _sample(denoiser, captured):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    return denoise(denoiser, captured, scheduler=scheduler, latents=_example()[0], timesteps=scheduler.timesteps,
                   cond={}, timestep_input="t")


def _parts(plan=None):
    captured = capture_model(Net().eval(), _example(), latent="x")
    plan = plan or make_plan(profile_model(captured, repeats=1), 2)  # the ranks take the launching process's
    return captured, plan, ready_segments(captured, plan)


def test_the_top_level_names_are_the_public_api():
    assert len(api.__all__) == 17 and all(hasattr(api, name) for name in api.__all__)


def test_reference_and_ranks_from_public_names_only():
    captured, plan, segments = _parts()
    with torch.no_grad():
        unsplit = _sample(lambda inputs: captured.graph_module(inputs["x"], inputs["t"]), captured)
        exact = _sample(ReferenceSchedule(segments, warmup=STEPS, timestep_input="t"), captured)
        stale = _sample(ReferenceSchedule(segments, warmup=1, timestep_input="t"), captured)
    assert torch.equal(exact, unsplit)
    ranks = launch(_rank, (plan,), nproc=2, timeout_s=60)
    torch.testing.assert_close(ranks[0], stale, rtol=0, atol=0)
    torch.testing.assert_close(ranks[1], stale, rtol=0, atol=0)


def _rank(plan):
    torch.set_num_threads(1)
    captured, plan, segments = _parts(plan)
    denoiser = AsyncDenoiser(segments, plan, input_names=["x", "t"], latent="x", warmup=1, timestep_input="t")
    with torch.no_grad():
        return _sample(denoiser, captured)
