"""Model zoo: diffusers denoisers built offline from configs, with example inputs.

``digits``, the default, is a trained class-conditional UNet whose weights ship inside the
package (:mod:`asyncdiff_partition.pipelines.digits`). Every other model is built from a config dict
written out below, with random weights: nothing is downloaded. The tiny models keep their
family's real structure (several resolution levels, cross-attention where the family has it)
at a size that runs in milliseconds on one CPU core; the full-size ones reproduce the
published checkpoints' architectures for benchmarks.

    model = build_model("tiny-unet2d-condition")
    inputs = example_inputs(model, batch=2)
    (eps,) = model(*inputs.args, **inputs.kwargs)

Batch 2 stands for the classifier-free-guidance pair (conditional, unconditional).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import diffusers
import torch

from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.pipelines.digits import load_digits_model
from asyncdiff_partition.pipelines.synthesis import ModelInputs, synthesize_inputs

Config = dict[str, Any]

# Note [zoo configs]
# Tiny configs mirror their family's block layout: tiny-unet2d-condition has SD 1.5/2.1's four
# levels (3 CrossAttnDownBlock2D + DownBlock2D and the mirror image going up), so the module
# names AsyncDiff's hand split refers to (down_blocks.0-3, up_blocks.1.attentions.2, ...) exist
# on it too. The full-size configs are the architecture keys of the published config.json files
# (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base,
# stabilityai/stable-diffusion-xl-base-1.0, all unet/config.json); keys left out equal the
# diffusers defaults, which those files also hold.

SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_CONFIGS: dict[str, tuple[str, Config]] = {
    # --- tiny: for tests and demos -------------------------------------------------------
    "tiny-unet2d-condition": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4),
        use_linear_projection=True,
    )),
    "tiny-unet2d": ("UNet2DModel", dict(  # DDPM-style pixel-space UNet
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )),
    "tiny-dit": ("DiTTransformer2DModel", dict(  # DiT-XL/2 layout, learned sigma (out = 2 x in)
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=6,
        num_attention_heads=4, attention_head_dim=16, num_embeds_ada_norm=1000,
    )),
    "tiny-sd3": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        num_attention_heads=4, attention_head_dim=16, caption_projection_dim=64,
        joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
    )),
    "tiny-svd": ("UNetSpatioTemporalConditionModel", dict(
        sample_size=16, in_channels=8, out_channels=4, num_frames=3, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), num_attention_heads=(2, 2, 4, 4),
        cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
    )),
    # --- full size: published architectures, random weights --------------------------------
    "sd15-unet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
        attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
        mid_block_scale_factor=1,
    )),
    "sd21-unet": ("UNet2DConditionModel", dict(  # 2.1-base (512 px); 2.1 (768 px) adds upcast
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    )),
    "sdxl-unet": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, act_fn="silu", norm_num_groups=32,
        norm_eps=1e-5, addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    )),
}

TRAINED_MODELS: tuple[str, ...] = ("digits",)  # shipped weights, loaded by digits.load_digits_model
TINY_MODELS: tuple[str, ...] = tuple(n for n in _CONFIGS if n.startswith("tiny-"))
FULL_MODELS: tuple[str, ...] = tuple(n for n in _CONFIGS if not n.startswith("tiny-"))
DEFAULT_MODEL = "digits"

class UnknownModelError(AsyncDiffError, ValueError):
    """A model spec that is neither a zoo name nor a local directory."""


class ModelFolderError(AsyncDiffError, ValueError):
    """A local model or pipeline directory that is missing or holds no loadable diffusers model."""


def list_models() -> list[str]:
    """All zoo names: the trained model first, then the tiny ones, then the full-size ones."""
    return [*TRAINED_MODELS, *_CONFIGS]


def _unknown(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}; known zoo names: {', '.join(list_models())}.{hint} "
        "A local diffusers model or pipeline directory also works."
    )


def build_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """Build a zoo model with random weights (seeded), in eval mode and float32.

    A trained model (``digits``) is loaded with its shipped weights instead; ``seed`` is unused.

    Raises:
        UnknownModelError: ``name`` is not in :func:`list_models`.
    """
    if name in TRAINED_MODELS:
        return load_digits_model()
    if name not in _CONFIGS:
        raise _unknown(name)
    class_name, config = _CONFIGS[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config)
    return model.float().eval()


def load_model(spec: str, *, seed: int = 0) -> torch.nn.Module:
    """Build a zoo model by name, or load a denoiser from a local diffusers directory.

    A directory is either a *model* folder (``config.json`` naming a diffusers model class
    in ``_class_name``) or a *pipeline* folder (``model_index.json``), from which the
    ``unet/`` or else the ``transformer/`` sub-folder is loaded. Nothing is fetched from a hub.

    Args:
        spec: a zoo name or a directory path.
        seed: weight seed for zoo models; ignored for directories.

    Raises:
        UnknownModelError: ``spec`` is neither a zoo name nor a path.
        ModelFolderError: the path is missing or holds no loadable model.
    """
    if spec in _CONFIGS or spec in TRAINED_MODELS:
        return build_model(spec, seed=seed)
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or "\\" in spec or spec.startswith((".", "~")):
            raise ModelFolderError(
                f"model directory {spec!r} does not exist; pass a zoo name "
                f"({', '.join(list_models())}) or a local diffusers model or pipeline directory "
                "(hub ids are not downloaded)"
            )
        raise _unknown(spec)
    if not path.is_dir():
        raise ModelFolderError(f"{spec!r} is a file; expected a diffusers model or pipeline directory")
    if (path / "config.json").is_file():
        return _load_model_folder(path)
    if (path / "model_index.json").is_file():
        for sub in ("unet", "transformer"):
            if (path / sub / "config.json").is_file():
                return _load_model_folder(path / sub)
        raise ModelFolderError(
            f"pipeline directory {str(path)!r} has no unet/ or transformer/ sub-folder with a "
            "config.json; expected the denoiser in one of those"
        )
    raise ModelFolderError(
        f"directory {str(path)!r} has neither config.json nor model_index.json; expected a "
        "diffusers model folder (config.json) or pipeline folder (model_index.json)"
    )


def _load_model_folder(path: Path) -> torch.nn.Module:
    config = json.loads((path / "config.json").read_text())
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    cls: Any = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ModelFolderError(
            f"{str(path / 'config.json')!r} names _class_name={class_name!r}, which is not a "
            "diffusers model class; expected e.g. UNet2DConditionModel"
        )
    loader: Any = cls  # a diffusers ModelMixin subclass
    model = loader.from_pretrained(str(path), local_files_only=True)
    return model.float().eval()


def check_sample_size(model: torch.nn.Module, size: int) -> None:
    """Reject latent sizes the model's down-sampling or patching cannot divide.

    Raises:
        ConfigError: ``size`` is not positive or not a multiple of the model's down-sampling factor.
    """
    config = getattr(model, "config", None)
    if size < 1:
        raise ConfigError(f"latent size must be positive, got {size}")
    if config is None:
        return
    factor = 1
    if "block_out_channels" in config and "down_block_types" in config:
        factor = 2 ** (len(config["down_block_types"]) - 1)
    elif config.get("patch_size"):
        factor = int(config["patch_size"])
    if size % factor:
        lower = max(factor, size - size % factor)
        raise ConfigError(
            f"latent size {size} does not fit {type(model).__name__}: it must be a multiple of "
            f"{factor}; try {lower} or {lower + factor}"
        )


def example_inputs(
    model: torch.nn.Module, *, batch: int = 2, sample_size: int | None = None, seed: int = 0
) -> ModelInputs:
    """Random inputs of the right shapes and dtypes for a denoiser, made from its signature and config.

    See :func:`~asyncdiff_partition.pipelines.synthesis.synthesize_inputs` (no class table).

    Args:
        model: a denoiser with a diffusers-style config.
        batch: batch size; 2 is one classifier-free-guidance pair.
        sample_size: latent height and width; defaults to ``model.config.sample_size``.
        seed: seed of the torch.Generator that draws every input.

    Raises:
        SynthesisError: an argument cannot be made from the config (one line naming it).
    """
    return synthesize_inputs(model, batch=batch, sample_size=sample_size, seed=seed)
