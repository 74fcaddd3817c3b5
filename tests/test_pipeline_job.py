"""app/pipeline_job and pipelines/loading: saved pipeline folders keep their dtype; outputs are the pipeline's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import build

from asyncdiff_partition.app.pipeline_job import (
    PipelineJobError,
    PipelineRun,
    call_arguments,
    run_pipeline,
    write_output,
)
from asyncdiff_partition.pipelines.loading import load_pipeline, saved_dtypes


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    pipe, _ = build("sd", root / "tokenizers")
    pipe.to(torch.bfloat16).save_pretrained(root / "sd")
    return root / "sd"


def test_bf16_weights_stay_bf16_and_run_on_cpu(bf16_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_CACHE", str(tmp_path / "cache"))
    assert saved_dtypes(bf16_folder)["unet"] == torch.bfloat16
    pipe = load_pipeline(bf16_folder)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16  # diffusers alone gives float32
    result = run_pipeline(PipelineRun(model=str(bf16_folder), prompt="a red cube", size=16, steps=2, reference=True,
                                      out_dir=str(tmp_path / "out")))
    assert "unet: 1 call(s) per step" in result["denoisers"][0]
    pixels = np.asarray(Image.open(result["images"][0]))
    assert pixels.shape == (16, 16, 3) and pixels.std() > 0


def test_an_option_the_pipeline_does_not_take_names_it(bf16_folder):
    pipe = load_pipeline(bf16_folder)
    with pytest.raises(PipelineJobError, match="StableDiffusionPipeline takes no image, so --image cannot be used"):
        call_arguments(pipe, PipelineRun(model="x", prompt="a", image=__file__))
    assert call_arguments(pipe, PipelineRun(model="x", prompt="a", size=16, guidance=3.0)) == {
        "prompt": "a", "height": 16, "width": 16, "guidance_scale": 3.0}


def test_video_frames_are_written_as_pngs_and_a_gif(tmp_path):
    class Output:
        frames = [[Image.new("RGB", (8, 8), (40 * f, 0, 0)) for f in range(3)]]

    written = write_output(Output(), tmp_path)
    assert len(written["frames"]) == 3 and written["videos"] == [str(tmp_path / "video-0.gif")]
    gif = Image.open(written["videos"][0])
    assert gif.n_frames == 3 and Image.open(written["frames"][2]).getpixel((0, 0)) == (80, 0, 0)
