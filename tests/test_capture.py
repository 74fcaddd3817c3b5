"""Capture: every zoo model and the custom example are captured and match eager."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from conftest import tiny, tiny_captured

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.fx.capture import MODULE_KEY, CallError, CaptureError, capture_model
from asyncdiff_partition.pipelines import zoo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _eager(model, inputs):
    out = model(*inputs.args, **{**inputs.kwargs, "return_dict": False})
    return out[0]


@pytest.mark.parametrize("name", zoo.TINY_MODELS)
def test_capture_matches_eager_for_every_tiny_zoo_model(name):
    model, inputs = tiny(name)
    captured = tiny_captured(name)
    assert captured.method in ("fx", "export")
    assert captured.latent.path == inputs.latent
    with torch.no_grad():
        expected = _eager(model, inputs)
        torch.testing.assert_close(captured(*inputs.args, **inputs.kwargs), expected)
        # a fresh input of the same shapes through the flat graph
        fresh = [torch.randn_like(t) if t.is_floating_point() else t for t in captured.example]
        alt_args = list(inputs.args)
        latent_spec = captured.latent
        latent = fresh[captured.inputs.index(latent_spec)]
        if latent_spec.path in inputs.kwargs:
            alt_kwargs = {**inputs.kwargs, latent_spec.path: latent}
        else:
            alt_args[0] = latent
            alt_kwargs = inputs.kwargs
        torch.testing.assert_close(
            captured(*alt_args, **alt_kwargs), _eager(model, zoo.ModelInputs(tuple(alt_args), alt_kwargs, inputs.latent))
        )


def test_diffusers_unet_needs_export_and_says_why_fx_failed(unet_captured):
    # docs/design.md: symbolic_trace fails on diffusers UNets (iterating a Proxy).
    assert unet_captured.method == "export"
    (method, message), = unet_captured.attempts
    assert method == "fx" and "Proxy" in message and "unet_2d_condition.py" in message


def test_nodes_keep_their_module_path(unet_captured):
    paths = {node.meta[MODULE_KEY] for node in unet_captured.graph_module.graph.nodes}
    assert {"conv_in", "time_embedding.linear_1", "conv_out"} <= paths
    assert any(p.startswith("down_blocks.0.attentions.0.transformer_blocks.0") for p in paths)
    assert any(p.startswith("up_blocks.1.resnets.") for p in paths)


def test_graph_shares_the_models_parameters(unet_captured):
    model, _ = tiny("tiny-unet2d-condition")
    assert unet_captured.graph_module.get_parameter("conv_in.weight") is model.conv_in.weight


def test_nested_inputs_are_flattened_with_paths():
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, sample, timestep, added_cond_kwargs=None, scale: float = 1.0):
            extra = added_cond_kwargs["text_embeds"] + added_cond_kwargs["time_ids"]
            return self.proj(sample) * timestep[:, None] * scale + extra

    model = Nested().eval()
    args = (torch.randn(2, 4), torch.randn(2))
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 4), "time_ids": torch.randn(2, 4)}, "scale": 2.0}
    captured = capture_model(model, args, kwargs)
    assert captured.method == "fx"
    assert [s.path for s in captured.inputs] == [
        "sample", "timestep", "added_cond_kwargs['text_embeds']", "added_cond_kwargs['time_ids']"
    ]
    assert [s.name for s in captured.inputs][2:] == ["added_cond_kwargs_text_embeds", "added_cond_kwargs_time_ids"]
    assert captured.latent.name == "sample"
    torch.testing.assert_close(captured(*args, **kwargs), model(*args, **kwargs))
    with pytest.raises(CallError, match="captured as 2.0"):
        captured(*args, **{**kwargs, "scale": 3.0})


class _DataDependent(torch.nn.Module):
    """Branches on a tensor value: fx cannot trace it, export cannot either (no guard)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep):
        if sample.sum() > 0:
            return self.proj(sample)
        return sample * torch.nonzero(timestep).numel()


def test_capture_error_lists_every_method_with_source_line_and_hint():
    with pytest.raises(CaptureError) as info:
        capture_model(_DataDependent(), (torch.randn(2, 4), torch.randn(2)))
    text = str(info.value)
    assert "tried fx, export" in text
    assert "  - fx: " in text and "  - export: " in text
    assert text.count("test_capture.py") >= 2 and "if sample.sum() > 0" in text
    assert text.count("hint:") == 2


def test_graph_that_differs_from_eager_is_rejected():
    class ShapeBranch(torch.nn.Module):
        # Both tracers bake Python state at trace time; this counter changes the output after
        # tracing, so verification must reject every graph instead of returning a wrong one.
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, sample):
            self.calls += 1
            return sample * self.calls

    model = ShapeBranch()
    with pytest.raises(CaptureError, match="differs from eager"):
        capture_model(model, (torch.randn(2, 3),))


def test_bad_arguments_are_project_value_errors():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="unknown capture method"):
        capture_model(model, (torch.randn(1, 3),), methods=["jit"])
    with pytest.raises(CallError, match="no tensor input"):
        capture_model(_NoTensor(), (3,))
    with pytest.raises(CallError, match="do not fit"):
        capture_model(model, (torch.randn(1, 3), torch.randn(1)))
    with pytest.raises(ConfigError, match="latent 'z' is not a tensor input"):
        capture_model(model, (torch.randn(1, 3),), latent="z")


class _NoTensor(torch.nn.Module):
    def forward(self, n):
        return torch.zeros(n)


def test_custom_example_model_is_captured_and_matches_eager():
    spec = importlib.util.spec_from_file_location("custom_model", ROOT / "examples" / "custom_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_uvit(seed=0)
    args, kwargs = module.example_inputs(batch=2, seed=0)
    captured = capture_model(model, args, kwargs)
    assert captured.method == "fx"  # plain PyTorch: symbolic_trace works, no fallback needed
    with torch.no_grad():
        torch.testing.assert_close(captured(*args, **kwargs), model(*args, **kwargs))


def _cogvideox(rotary: bool):
    """A tiny CogVideoXTransformer3DModel and the call CogVideoXPipeline makes, at a size other than
    the config's sample size (so that patch_embed builds its positional embeddings on the fly)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=5, temporal_compression_ratio=4, use_rotary_positional_embeddings=rotary).eval()
    frames, height, width = 3, 12, 16
    rotary_emb = None
    if rotary:  # as CogVideoXPipeline._prepare_rotary_positional_embeddings (CogVideoX 1.0)
        grid = (height // 2, width // 2)
        rotary_emb = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), grid), grid_size=grid,
                                             temporal_size=frames)
    kwargs = {"hidden_states": torch.randn(2, frames, 4, height, width), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.tensor(500).expand(2), "image_rotary_emb": rotary_emb, "attention_kwargs": None,
              "return_dict": False}
    return model, kwargs


@pytest.mark.parametrize("rotary", [False, True], ids=["sincos-on-the-fly", "rotary-tuple"])
def test_cogvideox_is_captured_as_its_pipeline_calls_it_and_splits_exactly(rotary):
    from asyncdiff_partition.core.placement import place
    from asyncdiff_partition.fx.opgraph import build_op_graph
    from asyncdiff_partition.fx.split import run_segments, split_graph, verify_segments

    model, kwargs = _cogvideox(rotary)
    captured = capture_model(model, (), kwargs)
    # fx stops at len(timesteps.shape); export now follows patch_embed's joint.data[...].copy_(pos)
    assert captured.method == "export" and "'len' is not supported" in captured.attempts[0][1]
    assert "module 'time_proj' (Timesteps)" in captured.attempts[0][1]
    assert captured.latent.path == "hidden_states"
    if rotary:
        assert [s.path for s in captured.inputs][-2:] == ["image_rotary_emb[0]", "image_rotary_emb[1]"]
    with torch.no_grad():
        torch.testing.assert_close(captured(**kwargs), model(**kwargs)[0], rtol=0, atol=0)
    graph = build_op_graph(captured)
    assert rotary or any(graph.node(w)["module"] == "patch_embed" for w in graph.writes)
    n = len(graph)
    stale = [i for i, name in enumerate(graph.order) if graph.node(name)["kind"] == "op" and not graph.fresh[i]]
    feed = {spec.name: t for spec, t in zip(captured.inputs, captured.example)}
    with torch.no_grad():
        expected = captured.graph_module(*captured.example)
    for boundaries in ([0, stale[len(stale) // 2], n], [0, stale[len(stale) // 4], stale[3 * len(stale) // 4], n]):
        segments = split_graph(captured, place(graph, boundaries))
        verify_segments(captured, segments)
        with torch.no_grad():
            torch.testing.assert_close(run_segments(segments, feed), expected, rtol=0, atol=0)


class _Branchy(torch.nn.Module):
    """Captures as far as ``block.inner``, whose forward branches on a tensor value."""

    def __init__(self):
        super().__init__()
        self.pre = torch.nn.Linear(4, 4)
        self.block = torch.nn.Module()
        self.block.inner = _DataDependent()

    def forward(self, sample, timestep):
        return self.block.inner(self.pre(sample), timestep)


def test_capture_error_names_the_operation_and_the_module_path_for_every_method():
    with pytest.raises(CaptureError) as info:
        capture_model(_Branchy().eval(), (torch.randn(2, 4), torch.randn(2)))
    lines = {line.split(":", 1)[0].strip(" -"): line for line in str(info.value).splitlines() if line.startswith("  - ")}
    assert lines.keys() == {"fx", "export"}
    for method, line in lines.items():
        assert f"  - {method}: module 'block.inner' (_DataDependent), operation " in line, line
        assert "in forward: if sample.sum() > 0" in line
    assert "operation torch.fx.Proxy.__bool__ (a Python branch" in lines["fx"]
    assert "operation torch.Tensor.__bool__: " in lines["export"]
