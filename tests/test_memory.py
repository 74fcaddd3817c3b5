"""Each rank holds only what it runs: its segment's weights, read by name from the pipeline folder, as saved.

A tiny SD pipeline saved as a folder (float32, and bfloat16). parallelize(pipe, devices=2) in a
plain process: after the call structure is prepared and handed to the ranks, and before any
activation exists, each rank's live tensors are its segment's weights (counted: every storage the
rank holds, against the weights of that segment as the launching process split them), no other
weight of the denoiser is there (the rank never loads the pipeline), the weights came from the
folder's safetensors files by name (nothing but their names was shipped) in the saved dtype, and
the output equals the single-process reference schedule.
"""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import build, sample

from asyncdiff_partition.fx.pickling import is_stand_in
from asyncdiff_partition.pipelines.loading import load_pipeline
from asyncdiff_partition.pipelines.parallelize import parallelize, warm

STEPS = 3


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    pipe, kwargs = build("sd", root / "tokenizers")
    pipe.to(getattr(torch, request.param)).save_pretrained(root / "sd")
    return str(root / "sd"), kwargs, getattr(torch, request.param)


def test_each_rank_holds_its_segment_read_by_name_as_saved(folder, tmp_path):
    path, kwargs, dtype = folder
    reference = parallelize(load_pipeline(path), devices=2, warmup=1, reference=True, cache_dir=tmp_path)
    expected = sample(reference, kwargs, STEPS)
    segments = next(iter(vars(reference)["_asyncdiff_parallel"].compiled.values())).segments  # same plan (cache)

    pipe = parallelize(load_pipeline(path), devices=2, warmup=1, cache_dir=tmp_path)
    warm(pipe, **kwargs, num_inference_steps=STEPS)
    engine = vars(pipe)["_asyncdiff_parallel"]
    weights = {id(t) for t in (*pipe.unet.parameters(), *pipe.unet.buffers())}
    assert set(engine.sources["unet"]) == weights  # every weight is read by name from the folder, none shipped
    engine.start()
    held = engine.command(("memory",))
    for rank, report in held.items():
        own = {name: t for name, t in (*segments[rank].module.named_parameters(), *segments[rank].module.named_buffers())
               if not is_stand_in(t)}
        mine = sum(t.numel() * t.element_size() for t in own.values())
        assert set(report["weights"]) == set(own) and report["param_bytes"] == mine  # its segment's, counted
        assert {d for d, _ in report["weights"].values()} == {str(dtype).removeprefix("torch.")}  # as saved
        assert report["live_tensor_bytes"] <= mine + 4096  # nothing else of the denoiser is held
    output = sample(pipe, kwargs, STEPS)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    pipe.close()
