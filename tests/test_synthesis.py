"""Example inputs from a bare model's forward signature and config: families no code names."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_pipelines import build

from asyncdiff_partition.cli.main import main
from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.pipelines.synthesis import FRAMES, SynthesisError, synthesize_inputs


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """Saved bare denoiser folders of families that no code in the package names."""
    root = tmp_path_factory.mktemp("bare")
    tokenizers = str(root / "tokenizers")
    pixart, _ = build("pixart", tokenizers)
    pixart.transformer.save_pretrained(root / "pixart")
    animatediff, _ = build("animatediff", tokenizers)
    animatediff.unet.save_pretrained(root / "motion")  # a UNetMotionModel
    flux, _ = build("flux", tokenizers)
    flux.transformer.save_pretrained(root / "flux")
    return root


def test_a_motion_unet_gets_frames_and_a_context_per_frame(bare):
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_pretrained(str(bare / "motion"), local_files_only=True).eval()
    inputs = synthesize_inputs(model, batch=2, sample_size=8)
    assert inputs.args[0].shape == (2, 4, FRAMES, 8, 8) and inputs.latent == "sample"
    assert inputs.kwargs["encoder_hidden_states"].shape == (2 * FRAMES, 77, 32)
    (eps,) = model(*inputs.args, **inputs.kwargs)
    assert eps.shape == inputs.args[0].shape


def test_pixart_gets_its_caption_width_and_no_class_labels(bare):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(str(bare / "pixart"), local_files_only=True).eval()
    inputs = synthesize_inputs(model, batch=2)
    assert inputs.kwargs["encoder_hidden_states"].shape == (2, 77, model.config.caption_channels)
    assert "class_labels" not in inputs.kwargs and inputs.kwargs["timestep"].dtype == torch.long
    (eps,) = model(*inputs.args, **inputs.kwargs)
    assert eps.shape[0] == 2 and torch.isfinite(eps).all()


@pytest.mark.parametrize("family", ["pixart", "motion"])
def test_inspect_and_profile_take_a_bare_folder(bare, family, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["--threads", "1", "inspect", "--model", str(bare / family), "--size", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["op_nodes"] > 10
    out = tmp_path / "bare.profile.json"
    result = runner.invoke(main, ["--threads", "1", "profile", "--model", str(bare / family), "--size", "8",
                                  "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_what_only_the_pipeline_defines_is_one_line_naming_the_argument(bare):
    result = CliRunner().invoke(main, ["inspect", "--model", str(bare / "flux")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "FluxTransformer2DModel's argument 'img_ids'" in line and "--model PIPELINE_DIR --prompt TEXT" in line


def test_a_model_without_a_config_says_how_to_capture():
    with pytest.raises(SynthesisError, match=r"Linear.*capture_model\(model, args, kwargs\)") as error:
        synthesize_inputs(torch.nn.Linear(2, 2))
    assert isinstance(error.value, AsyncDiffError)
