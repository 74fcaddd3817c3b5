"""The bundled digit classifier: class accuracy and Fréchet features for the digits model's samples.

A small CNN trained on the same data as the digits model (scikit-learn's digits, 8x8 upsampled
to 16x16, values in [-1, 1]: :func:`asyncdiff_partition.pipelines.digits.load_digits_data`) with a fixed
seed. Its weights ship as ``weights/digits-classifier.safetensors``; their header records the
held-out accuracy (see ``weights/CLASSIFIER.md``):

    labels = classify(images)        # images (N, 16, 16) or (N, 1, 16, 16) in [-1, 1]
    feats = features(images)         # (N, 32): penultimate activations, for frechet_distance
    python -m asyncdiff_partition.evaluation.classifier train --out asyncdiff_partition/weights

It plays the role Inception-v3 plays for FID (Heusel et al., 2017) on a data set small enough
to be trained here in seconds.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from asyncdiff_partition.core.files import FileFormatError, write_atomic
from asyncdiff_partition.evaluation.metrics import MetricError
from asyncdiff_partition.pipelines.digits import load_digits_data

__all__ = ["FEATURES", "WEIGHTS", "DigitClassifier", "classify", "features", "load_classifier", "real_digits",
           "train_classifier"]

FEATURES = 32
WEIGHTS = Path(__file__).parent.parent / "weights" / "digits-classifier.safetensors"
HELD_OUT = 0.2  # share of the 1,797 digits kept out of training, to measure accuracy on


class DigitClassifier(nn.Module):
    """conv 3x3 (16) -> pool -> conv 3x3 (32) -> pool -> linear (32, the features) -> linear (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _batch(images: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 16, 16):
        raise MetricError(f"expected digit images of shape (N, 16, 16) or (N, 1, 16, 16) in [-1, 1]; "
                         f"got {tuple(x.shape)}")
    return x


@functools.lru_cache(maxsize=2)
def load_classifier(path: str | None = None) -> DigitClassifier:
    """The trained classifier (the shipped weights by default), in eval mode.

    Raises:
        FileFormatError: the weights file is missing.
    """
    file = Path(path) if path is not None else WEIGHTS
    if not file.is_file():
        raise FileFormatError(f"the digit classifier needs {file}, which is missing; train it with "
                         f"'python -m asyncdiff_partition.evaluation.classifier train --out {file.parent}'")
    model = DigitClassifier()
    model.load_state_dict(safetensors.torch.load_file(str(file)))
    return model.eval()


def classify(images: Any, *, path: str | None = None) -> np.ndarray:
    """The digit (0-9) the classifier sees in each image (N, 16, 16) in [-1, 1]."""
    with torch.no_grad():
        return load_classifier(path)(_batch(images)).argmax(1).numpy()


def features(images: Any, *, path: str | None = None) -> np.ndarray:
    """Penultimate activations (N, :data:`FEATURES`) of images (N, 16, 16) in [-1, 1]."""
    with torch.no_grad():
        return load_classifier(path).features(_batch(images)).double().numpy()


@functools.lru_cache(maxsize=1)
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 real digits as the digits model sees them: images (N, 16, 16) in [-1, 1], labels (N,)."""
    images, labels = load_digits_data()
    return images[:, 0].numpy(), labels.numpy()


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = round(n * (1 - HELD_OUT))
    return order[:cut], order[cut:]


def train_classifier(out: str | Path = WEIGHTS, *, epochs: int = 30, seed: int = 0, command: str = "",
                     log: Any = print) -> dict[str, str]:
    """Train on 80 % of the digits (fixed seed), measure on the other 20 %, save the weights.

    Every batch is shifted by up to one pixel at random (the generated digits are not always
    centred like the data). Adam, learning rate 2e-3, batch 64.

    Returns:
        The metadata written into the weights file's header (held-out accuracy, settings).
    """
    torch.manual_seed(seed)
    images, labels = load_digits_data()
    train_idx, test_idx = _split(len(images), seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    begin = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(images[index], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean())
    meta = {"held_out_accuracy": f"{accuracy:.4f}", "held_out": str(len(test_idx)), "trained_on": str(len(train_idx)),
            "epochs": str(epochs), "seed": str(seed), "seconds": f"{time.perf_counter() - begin:.1f}",
            "torch": torch.__version__, "command": command,
            "data": "sklearn.datasets.load_digits via asyncdiff_partition.pipelines.digits.load_digits_data, [-1, 1]"}
    path = Path(out)
    path = path / WEIGHTS.name if path.suffix != ".safetensors" else path
    write_atomic(path, safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta))
    load_classifier.cache_clear()
    log(f"held-out accuracy {accuracy:.4f} on {len(test_idx)} digits; wrote {path}")
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m asyncdiff_partition.evaluation.classifier train [--out DIR] [--epochs E] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m asyncdiff_partition.evaluation.classifier", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train the digit classifier and write its weights")
    fit.add_argument("--out", default=str(WEIGHTS.parent), help="folder (or .safetensors file) to write")
    fit.add_argument("--epochs", type=int, default=30)
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m asyncdiff_partition.evaluation.classifier " + shlex.join(sys.argv[1:] if argv is None else argv)
    train_classifier(args.out, epochs=args.epochs, seed=args.seed, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
