"""Class-conditional pixel-space sampling with classifier-free guidance.

diffusers has no pipeline for a class-conditional ``UNet2DModel`` (``DDIMPipeline`` is
unconditional, ``DiTPipeline`` wants a transformer and a VAE); this one is DiTPipeline's loop in
pixel space. With guidance the denoiser sees a conditional + unconditional batch, as in
text-to-image: the requested labels first, then as many null labels, and the two halves of its
output are mixed as ``uncond + scale * (cond - uncond)`` (Ho & Salimans, 2022).

    pipe = ClassGuidedPipeline(unet=load_digits_model(), scheduler=digits_scheduler())   # pipelines/digits.py
    images = pipe([0, 1, 2], guidance_scale=2.0, num_inference_steps=20).images   # PIL, mode "L"

By convention the model's last class embedding (``num_class_embeds - 1``) is the null class:
the digits model is trained that way (:mod:`asyncdiff_partition.pipelines.digits`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from asyncdiff_partition.core.errors import ConfigError

__all__ = ["ClassGuidedPipeline", "to_pil"]


def to_pil(images: Tensor) -> list[Any]:
    """(N, C, H, W) in [-1, 1] → 8-bit PIL images (mode "L" for one channel, else "RGB")."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


class ClassGuidedPipeline(DiffusionPipeline):
    """Sample one image per class label from a class-conditional ``UNet2DModel``.

    Args:
        unet: a ``UNet2DModel`` with ``num_class_embeds``; its last class is the null class.
        scheduler: a diffusers scheduler (DDIM on the training betas for the digits model).
    """

    def __init__(self, unet: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    def default_labels(self, images: int) -> list[int]:
        """The labels a run of ``images`` images samples: every class in turn (0, 1, ..., 0, 1, ...)."""
        return [i % self.null_class for i in range(images)]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor,
        *,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        """Denoise one image per label.

        Args:
            class_labels: classes in ``[0, num_class_embeds - 1)``.
            guidance_scale: > 1 runs the cond + uncond batch; otherwise the labels alone.
            num_inference_steps: scheduler steps.
            generator: draws the initial noise (and the scheduler's, if it takes one).
            output_type: "pil" (8-bit images), "np" (float (N, H, W, C) in [0, 1]) or "pt"
                (the final sample in [-1, 1]).

        Raises:
            ConfigError: a label out of range, no labels, or an unknown ``output_type``.
        """
        device = self._execution_device
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= self.null_class:
            raise ConfigError(f"class labels must be in [0, {self.null_class}) and at least one; got "
                             f"{labels.tolist()} (class {self.null_class} is the unconditional one)")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        guided = guidance_scale > 1
        model_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        sample = randn_tensor((labels.numel(), cfg.in_channels, h, w), generator=generator, device=device,
                              dtype=self.unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = {"generator": generator} if "generator" in _step_params(self.scheduler) else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if guided else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            eps = self.unet(model_in, t, class_labels=model_labels, return_dict=False)[0]
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(eps, t, sample, **extra, return_dict=False)[0]
        self.maybe_free_model_hooks()
        if output_type == "pt":
            images: Any = sample
        elif output_type == "np":
            images = ((sample.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float32)
        else:
            images = to_pil(sample)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _step_params(scheduler: Any) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
