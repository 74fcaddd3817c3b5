"""Every family of tests/tiny_families.py: it builds, samples deterministically and runs its denoiser(s).

For each family: build it, sample twice at 3 steps (more where the family needs it: ``STEPS``),
check that both outputs are identical and finite, and that the denoiser module(s) named in
``DENOISERS`` ran as often as ``expected_calls`` says (at least once per step, each denoiser at
least once). No library code is involved: these are the fixtures the parallelize tests of the
new families will build on.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import DENOISERS, NEW_FAMILIES, STEPS, build, expected_calls, sample

STEPS_DEFAULT = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_family_samples_deterministically_through_its_denoiser(family, folder):
    steps = STEPS.get(family, STEPS_DEFAULT)
    pipe, kwargs = build(family, folder)
    calls = dict.fromkeys(DENOISERS[family], 0)
    handles = []
    for name in calls:
        module = getattr(pipe, name)
        assert isinstance(module, torch.nn.Module), f"{family}: pipe.{name} is {type(module).__name__}"

        def count(_module, _args, name=name):
            calls[name] += 1

        handles.append(module.register_forward_pre_hook(count))
    first = sample(pipe, kwargs, steps)
    for handle in handles:
        handle.remove()
    second = sample(pipe, kwargs, steps)

    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert all(n > 0 for n in calls.values()), f"{family}: a denoiser never ran: {calls}"
    assert sum(calls.values()) == expected_calls(family, steps), calls
    assert sum(calls.values()) >= (2 if family == "kandinsky22_img2img" else steps)


def test_same_seed_same_pipeline(folder):
    """Two builds with one seed are the same model (ranks build their own); another seed is not."""
    a, kwargs = build("wan_t2v", folder, seed=0)
    b, _ = build("wan_t2v", folder, seed=0)
    c, _ = build("wan_t2v", folder, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.transformer.state_dict().values(), b.transformer.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.transformer.state_dict().values(), c.transformer.state_dict().values()))
    assert torch.equal(sample(a, kwargs, 2), sample(b, kwargs, 2))
