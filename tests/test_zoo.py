"""Tests of the model zoo: offline builds, example inputs, loading from local directories."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.pipelines.zoo import (
    DEFAULT_MODEL,
    FULL_MODELS,
    TINY_MODELS,
    TRAINED_MODELS,
    ModelFolderError,
    ModelInputs,
    UnknownModelError,
    build_model,
    check_sample_size,
    example_inputs,
    list_models,
    load_model,
)


@functools.cache
def tiny(name: str) -> torch.nn.Module:
    return build_model(name)


def run(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs.args, **inputs.kwargs)
    assert isinstance(out, tuple)  # return_dict=False
    return out[0]


def expected_out_shape(model: torch.nn.Module, latent: torch.Tensor) -> tuple[int, ...]:
    """The latent's shape with the channel axis set to out_channels (DiT, SVD change it)."""
    shape = list(latent.shape)
    channel_axis = 2 if latent.dim() == 5 else 1  # SVD latents are (B, F, C, H, W)
    shape[channel_axis] = model.config.out_channels or model.config.in_channels
    return tuple(shape)


def test_names() -> None:
    assert list_models() == [*TRAINED_MODELS, *TINY_MODELS, *FULL_MODELS]
    assert set(TINY_MODELS) == {"tiny-unet2d-condition", "tiny-unet2d", "tiny-dit", "tiny-sd3", "tiny-svd"}
    assert set(FULL_MODELS) == {"sd15-unet", "sd21-unet", "sdxl-unet"}
    assert TRAINED_MODELS == ("digits",) and DEFAULT_MODEL == "digits"  # shipped weights: tests/test_digits.py


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_forward(name: str) -> None:
    model = tiny(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    inputs = example_inputs(model)
    latent = inputs.args[0]
    assert inputs.latent in ("sample", "hidden_states")
    assert latent.shape[0] == 2
    assert latent.shape[-1] == model.config.sample_size
    out = run(model, inputs)
    assert out.shape == expected_out_shape(model, latent)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_and_sample_size_are_honoured(name: str) -> None:
    model = tiny(name)
    inputs = example_inputs(model, batch=3, sample_size=8)
    latent = inputs.args[0]
    assert latent.shape[0] == 3 and latent.shape[-2:] == (8, 8)
    for value in inputs.kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            assert value.shape[0] == 3
    assert run(model, inputs).shape == expected_out_shape(model, latent)


def test_example_inputs_are_seeded() -> None:
    model = tiny("tiny-sd3")
    a, b, c = (example_inputs(model, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.args[0], b.args[0])
    assert not torch.equal(a.args[0], c.args[0])
    torch.testing.assert_close(run(model, a), run(model, b), rtol=0, atol=0)


def test_build_model_is_seeded() -> None:
    a, b, c = (build_model("tiny-dit", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_timestep_shared_by_the_cfg_pair() -> None:
    for name in TINY_MODELS:
        t = example_inputs(tiny(name)).kwargs["timestep"]
        assert t.shape == (2,) and t[0] == t[1]


def test_sdxl_style_added_conditions() -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()
    inputs = example_inputs(model)
    added = inputs.kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 16)
    assert added["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    assert run(model, inputs).shape == (2, 4, 8, 8)


def test_class_conditional_unet2d() -> None:
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
    ).eval()
    inputs = example_inputs(model)
    labels = inputs.kwargs["class_labels"]
    assert labels.dtype == torch.long and labels.shape == (2,) and int(labels.max()) < 10
    assert run(model, inputs).shape == (2, 3, 8, 8)


def test_unsupported_class_says_how_to_capture() -> None:
    with pytest.raises(TypeError, match=r"Linear.*capture_model\(model, args, kwargs\)"):
        example_inputs(torch.nn.Linear(2, 2))


def test_check_sample_size_names_the_factor_and_neighbours() -> None:
    unet = build_model("tiny-unet2d-condition")  # four levels: a multiple of 8
    check_sample_size(unet, 24)
    with pytest.raises(ConfigError, match=r"multiple of 8; try 8 or 16"):
        check_sample_size(unet, 10)
    with pytest.raises(ConfigError, match="must be positive"):
        check_sample_size(unet, 0)
    with pytest.raises(ConfigError, match="multiple of 2"):
        check_sample_size(build_model("tiny-dit"), 15)  # patch size 2


# --- load_model -------------------------------------------------------------------------


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    inputs = example_inputs(a, seed=3)
    torch.testing.assert_close(run(b, inputs), run(a, inputs), rtol=0, atol=0)


def test_load_model_by_name() -> None:
    assert_same_model(load_model("tiny-dit", seed=0), build_model("tiny-dit", seed=0))


def test_load_model_folder(tmp_path) -> None:
    model = tiny("tiny-unet2d-condition")
    model.save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"))
    assert not loaded.training
    assert_same_model(model, loaded)


@pytest.mark.parametrize("name,sub", [("tiny-unet2d-condition", "unet"), ("tiny-dit", "transformer")])
def test_load_pipeline_folder(tmp_path, name: str, sub: str) -> None:
    model = tiny(name)
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / sub)
    index = {"_class_name": "SomePipeline", sub: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    assert_same_model(model, load_model(str(pipe)))


def test_unknown_name() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model("tiny-unet")
    message = str(info.value)
    assert "'tiny-unet'" in message
    assert all(name in message for name in list_models())
    assert "directory" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError, match="known zoo names"):
        build_model("sd3-medium")


def test_missing_directory(tmp_path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelFolderError, match="does not exist") as info:
        load_model(missing)
    assert not isinstance(info.value, UnknownModelError)
    assert missing in str(info.value)
    # A hub id looks like a path and is never downloaded.
    with pytest.raises(ModelFolderError, match="not downloaded"):
        load_model("stabilityai/stable-diffusion-2-1-base")


def test_directory_with_neither_config(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match=r"neither config\.json nor model_index\.json"):
        load_model(str(tmp_path))


def test_pipeline_without_denoiser(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    (tmp_path / "vae").mkdir()
    with pytest.raises(ModelFolderError, match=r"no unet/ or transformer/"):
        load_model(str(tmp_path))


def test_config_of_a_non_model(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ModelFolderError, match="not a diffusers model class"):
        load_model(str(tmp_path))


def test_path_to_a_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="is a file"):
        load_model(str(tmp_path / "config.json"))


# --- full size: minutes and ~11 GB; run with ASYNCDIFF_SLOW=1 -------------------------------

PUBLISHED_PARAMS = {"sd15-unet": 859_520_964, "sd21-unet": 865_910_724, "sdxl-unet": 2_567_463_684}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ASYNCDIFF_SLOW"), reason="full-size model; set ASYNCDIFF_SLOW=1")
@pytest.mark.parametrize("name", FULL_MODELS)
def test_full_size_parameter_count(name: str) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    inputs = example_inputs(model, batch=1, sample_size=16)
    assert run(model, inputs).shape == (1, 4, 16, 16)
