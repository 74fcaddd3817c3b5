"""The bundled digits model: a class-conditional UNet trained on scikit-learn's digits.

A small diffusers ``UNet2DModel`` (about 0.57 M parameters) that denoises 16x16 grayscale
digits, conditioned on the class 0-9; class 10 is the null class of classifier-free guidance.
Its trained weights ship inside the package (``weights/digits-unet.safetensors``), so the demo
samples real digits with no download and no training:

    model = load_digits_model()                        # eval mode, float32
    python -m asyncdiff_partition.pipelines.digits train --out DIR --steps 2400
    python -m asyncdiff_partition.pipelines.digits sample --out grid.png

Data: ``sklearn.datasets.load_digits`` (1,797 images of 8x8, values 0..16, bundled with
scikit-learn), upsampled bilinearly to 16x16 and scaled to [-1, 1]. Training is DDPM's
epsilon-prediction loss (Ho et al., 2020, eq. 14) on the linear beta schedule that diffusers'
DDPMScheduler and DDIMScheduler use by default, with the label dropped to the null class 10 %
of the time (Ho & Salimans, 2022, classifier-free guidance). The weights saved are an
exponential moving average of the trained ones.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image
from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.files import FileFormatError, write_atomic
from asyncdiff_partition.pipelines.class_guided import ClassGuidedPipeline

__all__ = [
    "CONFIG",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SCHEDULER_CONFIG",
    "WEIGHTS_DIR",
    "TrainResult",
    "build_digits_unet",
    "digits_scheduler",
    "load_digits_data",
    "load_digits_model",
    "save_digits_model",
    "save_grid",
    "train",
    "weights_metadata",
]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the last class embedding: "no label", for classifier-free guidance
GUIDANCE = 2.0  # the guidance scale it samples best with (model card); 5, the SD default, spoils digits
SIZE = 16
WEIGHTS_DIR = Path(__file__).parent.parent / "weights"
WEIGHTS_FILE = "digits-unet.safetensors"
CONFIG_FILE = "digits-unet.json"

# Three levels (16, 8, 4 px); self-attention only at 4x4 and in the middle block.
CONFIG: dict[str, Any] = dict(
    sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 32, 48), norm_num_groups=8, attention_head_dim=16,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
)
# diffusers' default DDPM betas; the sampling pipeline's DDIMScheduler uses the same ones.
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="linear",
                                        beta_start=1e-4, beta_end=0.02)


def digits_scheduler() -> DDIMScheduler:
    """DDIM on the betas the digits model was trained with (deterministic, eta 0)."""
    return DDIMScheduler(**SCHEDULER_CONFIG)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote and measured."""

    weights: Path
    config: Path
    steps: int
    final_loss: float  # mean training loss over the last 10 % of the steps
    seconds: float
    meta: dict[str, str]


def load_digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(images (N, 1, 16, 16) in [-1, 1], labels (N,) int64)``."""
    from sklearn.datasets import load_digits  # about a second to import: only training and `eval` need it

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def build_digits_unet(seed: int = 0) -> torch.nn.Module:
    """The digits UNet with fresh random weights (seeded)."""
    torch.manual_seed(seed)
    return UNet2DModel(**CONFIG).float()


def train(
    out_dir: str | Path,
    *,
    steps: int = 2400,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    label_dropout: float = 0.1,
    ema_decay: float = 0.999,
    command: str = "",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the digits UNet from scratch and write its weights and config to ``out_dir``.

    AdamW with a linear warm-up (100 steps) and a cosine decay; every batch is drawn with a
    generator seeded by ``seed``, so a run is reproducible on one machine and thread count.

    Example:
        >>> train("my-weights", steps=100)  # doctest: +SKIP

    Args:
        out_dir: folder for ``digits-unet.safetensors`` and ``digits-unet.json``.
        steps: optimizer steps.
        batch: images per step.
        lr: peak learning rate.
        seed: seeds the weights, the batches, the noise and the label dropout.
        label_dropout: share of labels replaced by the null class.
        ema_decay: decay of the weight average that is saved.
        command: the command line, recorded in the weights' metadata.
        log: receives a progress line every few hundred steps.

    Raises:
        ConfigError: a setting out of range.
    """
    if steps < 1 or batch < 1 or lr <= 0 or not 0 <= label_dropout < 1 or not 0 <= ema_decay < 1:
        raise ConfigError(f"need steps >= 1, batch >= 1, lr > 0, label_dropout and ema_decay in [0, 1); got "
                         f"steps={steps}, batch={batch}, lr={lr}, label_dropout={label_dropout}, ema_decay={ema_decay}")
    images, labels = load_digits_data()
    model = build_digits_unet(seed).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    begin = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=gen)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch, generator=gen) < label_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        predicted = model(noise_scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (step + 1) / (step + 10))  # short memory at first
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    ema[name].lerp_(value, 1 - decay)
                else:
                    ema[name].copy_(value)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            recent = losses[-250:]
            log(f"step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - begin:.0f} s)")
    seconds = time.perf_counter() - begin
    tail = losses[-max(1, steps // 10):]
    final_loss = sum(tail) / len(tail)
    model.load_state_dict(ema)
    meta = {"steps": str(steps), "batch": str(batch), "lr": str(lr), "seed": str(seed),
            "label_dropout": str(label_dropout), "ema_decay": str(ema_decay), "final_loss": f"{final_loss:.4f}",
            "train_seconds": f"{seconds:.1f}", "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "data": "sklearn.datasets.load_digits, 1797 images, 8x8 -> 16x16 bilinear, [-1, 1]",
            "command": command}
    weights, config = save_digits_model(model, out_dir, meta)
    return TrainResult(weights, config, steps, final_loss, seconds, meta)


def save_digits_model(model: torch.nn.Module, out_dir: str | Path, meta: dict[str, str]) -> tuple[Path, Path]:
    """Write ``digits-unet.safetensors`` (with ``meta`` in its header) and ``digits-unet.json``."""
    out = Path(out_dir)
    weights, config = out / WEIGHTS_FILE, out / CONFIG_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, safetensors.torch.save(state, metadata=meta))
    write_atomic(config, model.to_json_string())  # type: ignore[operator]  # a diffusers ModelMixin
    return weights, config


def load_digits_model(directory: str | Path | None = None) -> torch.nn.Module:
    """The trained digits UNet (the shipped weights by default), in eval mode; no network.

    Raises:
        FileFormatError: the folder lacks the weights or config, or they do not fit each other.
    """
    folder = Path(directory) if directory is not None else WEIGHTS_DIR
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise FileFormatError(f"the digits model needs {path}, which is missing; train it with "
                             f"'python -m asyncdiff_partition.pipelines.digits train --out {folder}'")
    model = UNet2DModel.from_config(json.loads(config.read_text()))
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights)))
    except RuntimeError as error:
        raise FileFormatError(f"{weights} does not fit {config}: {str(error).splitlines()[0]}") from None
    return model.float().eval()


def weights_metadata(directory: str | Path | None = None) -> dict[str, str]:
    """The training record stored in the weights file's header (steps, final loss, command, ...)."""
    path = (Path(directory) if directory is not None else WEIGHTS_DIR) / WEIGHTS_FILE
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_grid(model: torch.nn.Module, path: str | Path, *, per_class: int = 10, steps: int = 20,
              guidance: float = 2.0, seed: int = 0, scale: int = 4) -> Path:
    """Sample ``per_class`` images of every digit and save them as a grid (one row per class)."""
    pipe = ClassGuidedPipeline(unet=model, scheduler=digits_scheduler())
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    pictures = pipe(labels, guidance_scale=guidance, num_inference_steps=steps, generator=generator).images
    side, step = SIZE * scale, SIZE * scale + scale  # one source pixel of grey between tiles
    grid = Image.new("L", (per_class * step, NUM_CLASSES * step), 128)
    for i, picture in enumerate(pictures):
        grid.paste(picture.resize((side, side), Image.Resampling.NEAREST), ((i % per_class) * step, (i // per_class) * step))
    png = io.BytesIO()
    grid.save(png, format="PNG")
    return write_atomic(path, png.getvalue())


def main(argv: list[str] | None = None) -> int:
    """``python -m asyncdiff_partition.pipelines.digits train|sample``."""
    parser = argparse.ArgumentParser(prog="python -m asyncdiff_partition.pipelines.digits", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train the digits UNet from scratch and write its weights")
    fit.add_argument("--out", required=True, help="folder for digits-unet.safetensors and digits-unet.json")
    fit.add_argument("--steps", type=int, default=2400)
    fit.add_argument("--batch", type=int, default=64)
    fit.add_argument("--lr", type=float, default=2e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    fit.add_argument("--grid", default=None, help="also save a grid of samples to this PNG")
    draw = commands.add_parser("sample", help="save a grid of samples, one row per digit")
    draw.add_argument("--out", required=True, help="PNG to write")
    draw.add_argument("--weights", default=None, help="folder of the weights (default: the shipped ones)")
    draw.add_argument("--steps", type=int, default=20)
    draw.add_argument("--guidance", type=float, default=2.0)
    draw.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            if args.threads:
                torch.set_num_threads(args.threads)
            command = "python -m asyncdiff_partition.pipelines.digits " + shlex.join(sys.argv[1:] if argv is None else argv)
            result = train(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, command=command)
            print(f"trained {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f}; "
                  f"wrote {result.weights} and {result.config}")
            if args.grid:
                print(f"wrote {save_grid(load_digits_model(args.out), args.grid)}")
        else:
            model = load_digits_model(args.weights)
            path = save_grid(model, args.out, steps=args.steps, guidance=args.guidance, seed=args.seed)
            print(f"wrote {path}")
    except (AsyncDiffError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
