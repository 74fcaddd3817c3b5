"""Compiled segments (fx.compile): equal to eager within tolerance on CPU, a clear fallback
without a C++ compiler, compiled-cost profiles; CUDA graphs where CUDA exists."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

from asyncdiff_partition.core.placement import place
from asyncdiff_partition.core.plan import make_plan
from asyncdiff_partition.core.profile import Profile
from asyncdiff_partition.fx.capture import capture_model
from asyncdiff_partition.fx.compile import (
    CompiledSegment,
    CompileError,
    CompileUnavailable,
    compile_mode,
    compile_profile,
    compile_segment,
    cpp_compiler,
)
from asyncdiff_partition.fx.opgraph import build_op_graph
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.split import split_graph
from asyncdiff_partition.runtime.reference import ReferenceSchedule

NO_COMPILER = "torch.compile on CPU needs a C++ compiler"
needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason=f"{NO_COMPILER}; none found here")
TIMESTEPS = [900, 600, 300]
# Inductor fuses ops and reassociates reductions (a fused conv + bias + SiLU, a reordered sum):
# each op rounds differently at the fp32 ulp level (~1e-7 relative); through the few dozen ops of
# this model and three steps of the schedule that stays well under 1e-5 relative, so
# rtol 1e-4 / atol 1e-5 catches a wrong kernel (errors of order 1) without flaking on rounding.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


class SkipNet(torch.nn.Module):
    """Conv, a time embedding, a long skip: the smallest graph with what UNets send across a cut."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = (torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                        torch.nn.Conv2d(8, 4, 3, padding=1))
        self.time = torch.nn.Linear(1, 8)

    def forward(self, sample, timestep):
        h = torch.nn.functional.silu(self.inp(sample))
        emb = self.time(timestep.float()[:, None] / 1000)[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.mid(h + emb)) + h)


@functools.cache
def _captured():
    model = SkipNet().eval()
    return capture_model(model, (torch.randn(2, 4, 8, 8), torch.full((2,), 900)), methods=("fx",))


@functools.cache
def _segments():
    captured = _captured()
    plan = make_plan(profile_model(captured, model_name="skipnet", warmup=0, repeats=1), 2)
    return split_graph(captured, place(build_op_graph(captured), plan.boundaries))


def _loop(schedule):
    captured = _captured()
    feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    x, history = feed["sample"].clone(), []
    schedule.reset(TIMESTEPS)
    with torch.no_grad():
        for t in TIMESTEPS:
            eps = schedule({**feed, "sample": x, "timestep": torch.full_like(feed["timestep"], t)})
            history.append(eps.clone())
            x = x - 0.1 * eps
    return history


@needs_compiler
def test_compiled_reference_schedule_equals_eager():
    eager = _loop(ReferenceSchedule(_segments(), warmup=1))
    schedule = ReferenceSchedule(_segments(), warmup=1, compile=True)
    assert all(isinstance(s.module, CompiledSegment) and s.module.mode == "default" for s in schedule.segments)
    assert all(not isinstance(s.module, CompiledSegment) for s in _segments())  # the given segments are untouched
    compiled = _loop(schedule)
    for step, (got, want) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"step {step}")


@needs_compiler
def test_compiled_segment_keeps_the_segments_parameters():
    segment = _segments()[0]
    compiled = compile_segment(segment.module, "cpu")
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in segment.module.parameters()}
    assert compile_segment(compiled, "cpu") is compiled  # compiling twice is a no-op


def test_without_a_cpp_compiler_the_segment_stays_eager_with_one_warning():
    import torch._inductor.config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):  # inductor's own search finds nothing
            assert cpp_compiler() is None
            module = _segments()[0].module
            with pytest.warns(CompileUnavailable, match=re.escape(NO_COMPILER)):
                assert compile_segment(module, "cpu") is module
    finally:
        cpp_compiler_search.cache_clear()
    assert cpp_compiler() is not None


def test_bad_modes_are_refused_with_the_rule():
    with pytest.raises(CompileError, match="one of auto, default"):
        compile_mode("cpu", "fast")
    with pytest.raises(CompileError, match="needs a CUDA device"):
        compile_mode("cpu", "reduce-overhead")
    assert compile_mode("cpu", "eager") is None


@needs_compiler
def test_a_compiled_profile_scales_every_cost_by_the_measured_ratio(tmp_path):
    captured = _captured()
    eager = profile_model(captured, model_name="skipnet", warmup=0, repeats=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileUnavailable)
        compiled = compile_profile(eager, captured, warmup=0, repeats=2)
    ratio = compiled.compiled["ratio"]
    assert ratio == pytest.approx(compiled.compiled["compiled_ms"]["median"] / compiled.compiled["eager_ms"]["median"])
    assert compiled.costs == pytest.approx([c * ratio for c in eager.costs])
    assert compiled.fingerprint == eager.fingerprint and eager.compiled is None
    assert Profile.load(compiled.save(tmp_path / "p.json")) == compiled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_segment_outputs_survive_the_next_call():
    segment = _segments()[0]
    module = segment.module.to("cuda")
    compiled = compile_segment(module, "cuda")
    assert compiled.mode == "reduce-overhead"
    feed = {spec.name: t.cuda() for spec, t in zip(_captured().inputs, _captured().example)}
    args = [feed[n] for n in segment.inputs]
    with torch.no_grad():
        first = compiled(*args)
        kept = [t.clone() for t in first]
        compiled(*[a + 1 if a.is_floating_point() else a for a in args])
        for a, b in zip(first, kept):
            torch.testing.assert_close(a, b)  # not overwritten by the replay
        for a, b in zip(compiled(*args), module(*args)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    module.to("cpu")
