"""Shared test set-up: one thread per process (the suite shares 2 cores), tiny zoo models.

Ranks are started from a fork server (Note [forkserver] in runtime/launch.py) that imports
torch and diffusers once for the whole session, in this process and in the command-line runs
the tests start: the suite launches dozens of runs, each rank would import them again.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("ASYNCDIFF_START_METHOD", "forkserver")


@functools.cache
def tiny(name: str):
    """(model, ModelInputs) of a tiny zoo model, built once per test session."""
    from asyncdiff_partition.pipelines import zoo

    model = zoo.build_model(name)
    return model, zoo.example_inputs(model, batch=2)


@functools.cache
def tiny_captured(name: str):
    """A tiny zoo model captured once per test session."""
    from asyncdiff_partition.fx.capture import capture_model

    model, inputs = tiny(name)
    return capture_model(model, inputs.args, inputs.kwargs, latent=inputs.latent)


@pytest.fixture(scope="session")
def unet_captured():
    return tiny_captured("tiny-unet2d-condition")


@functools.cache
def tiny_profile(name: str = "tiny-unet2d-condition"):
    """A real (quick) profile of a tiny zoo model, made once per test session."""
    from asyncdiff_partition.fx.profiler import profile_model

    return profile_model(tiny_captured(name), model_name=name, warmup=1, repeats=2)
