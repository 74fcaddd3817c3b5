"""Moving a rank's capture (fx.device_move): real weights move, weight stand-ins stay one element."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_captured

from asyncdiff_partition.core.plan import make_plan
from asyncdiff_partition.fx.device_move import move_captured, moved
from asyncdiff_partition.fx.profiler import profile_model
from asyncdiff_partition.fx.ready import ready_segments
from asyncdiff_partition.fx.shipping import is_stand_in, ship_segments

MODEL = "tiny-unet2d-condition"


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _shipped(tmp_path):
    captured = tiny_captured(MODEL)
    plan = make_plan(profile_model(captured, model_name=MODEL, warmup=0, repeats=1), 2)
    segments = ready_segments(captured, plan, world_size=2)
    return ship_segments(segments, tmp_path, captured), segments


def _weights(shell) -> list[torch.Tensor]:
    """The shell's tensors: its segment's module and the original model (the rest as stand-ins)."""
    tensors = [*shell.graph_module.parameters(), *shell.graph_module.buffers(), *shell.model.parameters(),
               *shell.model.buffers()]
    return list({id(t): t for t in tensors}.values())


def test_stand_ins_stay_one_element_when_moved_with_a_dtype_change(tmp_path):
    shipped, segments = _shipped(tmp_path)
    _, captured = shipped.load(0)
    weights = _weights(captured)
    stand_ins = [t for t in weights if is_stand_in(t)]
    real = [t for t in weights if not is_stand_in(t)]
    assert stand_ins and real
    before = {id(t): t.detach().clone() for t in real}
    own = _storage_bytes([*segments[0].module.parameters(), *segments[0].module.buffers()])

    kept = move_captured(captured, "cpu", torch.float64)

    assert all(t.dtype == torch.float64 for t in weights if t.is_floating_point())
    assert all(is_stand_in(t) and t.untyped_storage().nbytes() == 8 for t in stand_ins)  # one float64 element
    for t in real:
        torch.testing.assert_close(t, before[id(t)].to(t.dtype))
    assert kept == pytest.approx(2 * own, rel=0.01)  # fp32 -> fp64: the segment's weights, doubled, and no more
    model = captured.model  # shares its tensors with the graph: moved in place, once
    assert {id(p) for p in model.parameters()} <= {id(t) for t in weights}
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_module_to_would_expand_every_stand_in_to_full_size(tmp_path):
    # The behaviour fx.device_move replaces: Tensor.to of an expanded tensor allocates it dense.
    shipped, _ = _shipped(tmp_path)
    stand_ins = [t for t in _weights(shipped.load(0)[1]) if is_stand_in(t)]
    full = sum(t.numel() * 8 for t in stand_ins)
    assert _storage_bytes([t.to(torch.float64) for t in stand_ins]) == full
    assert _storage_bytes([moved(t, "cpu", torch.float64) for t in stand_ins]) == 8 * len(stand_ins)


def test_an_expanded_real_constant_keeps_its_value():
    t = torch.tensor(3.5).expand(4, 4)
    out = moved(t, "cpu", torch.float64)
    assert out.untyped_storage().nbytes() == 8 and torch.equal(out, torch.full((4, 4), 3.5, dtype=torch.float64))
    int_t = torch.arange(6).reshape(2, 3)
    assert moved(int_t, "cpu", torch.float16).dtype == torch.int64  # dtype applies to floating point only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_rank_on_cuda_holds_its_segment_not_a_replica(tmp_path):
    shipped, segments = _shipped(tmp_path)
    own = _storage_bytes([*segments[1].module.parameters(), *segments[1].module.buffers()])
    full = _storage_bytes([*tiny_captured(MODEL).graph_module.parameters()])
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    captured = shipped.load(1)
    move_captured(captured, "cuda")
    held = torch.cuda.max_memory_allocated() - start
    assert held < own + full / 4, (held, own, full)
