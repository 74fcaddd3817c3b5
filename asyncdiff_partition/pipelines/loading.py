"""Loading a saved diffusers pipeline folder: its own class, offline, every component in its saved dtype.

Example::

    pipe = load_pipeline("path/to/pipeline")        # what save_pretrained wrote; nothing is downloaded
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["LoadError", "load_pipeline", "saved_dtypes"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class LoadError(AsyncDiffError, ValueError):
    """A folder that is not a saved pipeline."""


def saved_dtypes(folder: str | Path) -> dict[str, torch.dtype]:
    """Each component's dtype as saved (read from its ``.safetensors`` header), by component name."""
    found: dict[str, torch.dtype] = {}
    for weights in sorted(Path(folder).glob("*/*.safetensors")):
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        kinds = [v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] in _DTYPES]
        if kinds:
            found.setdefault(weights.parent.name, _DTYPES[max(set(kinds), key=kinds.count)])
    return found


def load_pipeline(folder: str | Path, *, device: torch.device | str = "cpu") -> Any:
    """The folder's own pipeline class, offline, every component in its saved dtype (never upcast).

    Raises:
        LoadError: not a pipeline folder (no ``model_index.json``).
    """
    from diffusers import DiffusionPipeline

    path = Path(folder).expanduser()
    if not (path / "model_index.json").is_file():
        what = "a model folder (config.json)" if (path / "config.json").is_file() else "not a pipeline folder"
        raise LoadError(f"--prompt needs a diffusers pipeline folder (model_index.json), but {str(path)!r} is "
                               f"{what}; pass the folder save_pretrained wrote for the whole pipeline, or drop --prompt "
                               "to sample a bare model")
    dtypes = saved_dtypes(path)
    with _quiet():
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtypes or None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading progress bars or advice (install accelerate, ...): the CLI prints one line per fact."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
