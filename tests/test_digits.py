"""The bundled digits model (shipped weights, training) and the class-conditional pipeline."""

from __future__ import annotations

import functools
import os
import re
import socket

import pytest
import torch

from asyncdiff_partition.core.errors import ConfigError
from asyncdiff_partition.core.files import FileFormatError
from asyncdiff_partition.pipelines import digits, zoo
from asyncdiff_partition.pipelines.class_guided import ClassGuidedPipeline


@functools.cache
def shipped() -> torch.nn.Module:
    return digits.load_digits_model()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the digits model must load without the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_weights_load_offline(no_network) -> None:
    assert (digits.WEIGHTS_DIR / digits.WEIGHTS_FILE).is_file()
    model = digits.load_digits_model()
    assert type(model).__name__ == "UNet2DModel" and not model.training
    cfg = model.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels, cfg.num_class_embeds) == (16, 1, 1, 11)
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    meta = digits.weights_metadata()
    assert int(meta["steps"]) > 0 and float(meta["final_loss"]) < 0.1
    # trained before the module moved from asyncdiff_partition/digits.py to pipelines/digits.py
    assert re.match(r"python -m asyncdiff_partition\.(pipelines\.)?digits train ", meta["command"])


def test_zoo_serves_the_trained_model_as_default() -> None:
    assert zoo.DEFAULT_MODEL == "digits" and "digits" in zoo.list_models()
    a, b = zoo.load_model("digits"), zoo.build_model("digits")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_output_is_deterministic_and_denoises_real_digits() -> None:
    model = shipped()
    images, labels = digits.load_digits_data()
    x0, y = images[:32], labels[:32]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.full((32,), 400)
    from diffusers import DDPMScheduler

    noisy = DDPMScheduler(**digits.SCHEDULER_CONFIG).add_noise(x0, noise, t)
    with torch.no_grad():
        first = model(noisy, t, class_labels=y).sample
        again = digits.load_digits_model()(noisy, t, class_labels=y).sample
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    # Untrained weights predict the noise with an error near 1; the trained model far below.
    assert torch.mean((first - noise) ** 2) < 0.15


def test_example_inputs_and_capture_take_integer_labels() -> None:
    from asyncdiff_partition.app.api import capture_spec

    inputs = zoo.example_inputs(shipped(), batch=2)
    labels = inputs.kwargs["class_labels"]
    assert labels.dtype == torch.long and labels.shape == (2,) and int(labels.max()) <= digits.NULL_CLASS
    name, captured = capture_spec(None)
    assert name == "digits"
    by_path = {spec.path: spec for spec in captured.inputs}
    assert by_path["class_labels"].dtype == "int64" and by_path["class_labels"].shape == (2,)


def count_calls(pipe: ClassGuidedPipeline) -> list[int]:
    """Record the denoiser batch of every call."""
    batches: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]),
                                        with_kwargs=True)
    return batches


def test_class_pipeline_one_image_per_label() -> None:
    pipe = ClassGuidedPipeline(unet=digits.load_digits_model(), scheduler=digits.digits_scheduler())
    batches = count_calls(pipe)
    images = pipe([3, 1, 4], guidance_scale=3.0, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 3 and all(im.mode == "L" and im.size == (16, 16) for im in images)
    assert batches == [6, 6]  # conditional + unconditional halves
    plain = pipe([3, 1, 4], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert plain.shape == (3, 16, 16, 1) and 0 <= plain.min() and plain.max() <= 1
    assert batches[2:] == [3, 3]
    with pytest.raises(ConfigError, match=r"class labels must be in \[0, 10\)"):
        pipe([10])


def test_build_pipeline_samples_every_digit_in_order() -> None:
    from asyncdiff_partition.pipelines.offline import build_pipeline

    built = build_pipeline("digits")
    assert built.kind == "class" and isinstance(built.pipe, ClassGuidedPipeline)
    assert built.images_for_batch(20, 3.0) == 10 and built.pipe.default_labels(10) == list(range(10))
    images = built(steps=2, guidance_scale=3.0, images=10)
    assert len(images) == 10 and images[0].size == (16, 16)


def test_train_writes_loadable_weights(tmp_path) -> None:
    result = digits.train(tmp_path / "w", steps=2, batch=4, command="test", log=lambda line: None)
    assert result.weights.is_file() and result.config.is_file() and result.steps == 2
    umask = os.umask(0)
    os.umask(umask)
    assert result.weights.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600: readable by all
    assert not list((tmp_path / "w").glob("*.tmp"))  # written atomically: no temp file left behind
    model = digits.load_digits_model(tmp_path / "w")
    assert model.config.num_class_embeds == 11
    assert digits.weights_metadata(tmp_path / "w")["command"] == "test"


def test_missing_weights_say_how_to_train(tmp_path) -> None:
    with pytest.raises(FileFormatError, match="python -m asyncdiff_partition.pipelines.digits train"):
        digits.load_digits_model(tmp_path)
    assert digits.main(["sample", "--weights", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 1
